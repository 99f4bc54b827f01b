from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    # /toot/callbacks, where publishers deliver events, and /toot/subscriptions.
    path("toot/", include("toot.urls")),
]
