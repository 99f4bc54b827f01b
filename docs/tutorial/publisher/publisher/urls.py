from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    # /toot/subscriptions, where subscribers register, and /toot/callbacks.
    path("toot/", include("toot.urls")),
]
