from django.urls import path, re_path

from . import views

urlpatterns = [
    path("articles/<int:pk>/", views.article),
    path("articles/latest/", views.latest),
    path("articles/<slug:slug>/", views.by_slug),
    re_path(r"^archive/(?P<year>[0-9]{4})/$", views.archive),
]
