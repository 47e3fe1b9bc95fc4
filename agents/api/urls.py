from django.urls import path

from agents.api import events_endpoint, views

urlpatterns = [
    path("agents/", views.AgentListView.as_view(), name="agent-list"),
    path("agents/<str:name>/", views.AgentDetailView.as_view(), name="agent-detail"),
    path("runs/", views.RunListCreateView.as_view(), name="run-list"),
    path("runs/batch/", views.RunBatchView.as_view(), name="run-batch"),
    path("runs/<uuid:run_id>/", views.RunDetailView.as_view(), name="run-detail"),
    path("runs/<uuid:run_id>/cancel/", views.RunCancelView.as_view(), name="run-cancel"),
    path("runs/<uuid:run_id>/signal/", views.RunSignalView.as_view(), name="run-signal"),
    path("runs/<uuid:run_id>/tree/", views.RunTreeView.as_view(), name="run-tree"),
    path("stats/", views.StatsView.as_view(), name="stats"),
    path("events/", events_endpoint.events_redirect, name="events"),
]
