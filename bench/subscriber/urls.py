from __future__ import annotations

from django.urls import path

from bench.subscriber.views import noop
from example_project.urls import urlpatterns as example_urlpatterns

urlpatterns = [path("bench/noop", noop), *example_urlpatterns]
