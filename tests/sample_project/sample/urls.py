from __future__ import annotations

from django.urls import include, path

from accounts import views

urlpatterns = [
    path("signup", views.signup),
    path("orders", views.place_order),
    path("toot/", include("toot.urls")),
]
