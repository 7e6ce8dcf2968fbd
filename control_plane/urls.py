from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import path

from agents_app import api as agent_api
from agents_app.hosts import views as host_views
from control_plane import login, metrics
from tasks_app import api as run_api
from tasks_app.dashboard import views

api = "api/v1/"
urlpatterns = [
    path("", views.overview, name="overview"),
    path("runs/<uuid:run_id>/", views.run_page, name="run"),
    path("runs/", views.runs_page, name="runs"),
    path("runs/<uuid:run_id>/tasks/", views.run_tasks_page, name="run-tasks"),
    path("runs/<uuid:run_id>/rerun/", views.rerun, name="rerun"),
    path("runs/<uuid:run_id>/retry-failed/", views.retry_failed, name="retry-failed"),
    path("runs/<uuid:run_id>/<str:operation>/", views.operate_run, name="operate-run"),
    path("workflows/<path:name>/runs/", views.workflow_runs_page, name="workflow-runs"),  # a name may hold a /
    path("tasks/<uuid:task_id>/", views.task_page, name="task"),
    path("tasks/<uuid:task_id>/retry/", views.retry_task, name="retry-task"),
    path("tasks/<uuid:task_id>/decide/", views.decide_task, name="decide-task"),
    path("input-requests/<uuid:request_id>/answer/", views.answer_input, name="answer-input"),
    path("agents/", views.agents_page, name="agents"),
    path("agents/<uuid:agent_id>/<str:operation>/", views.operate_agent, name="operate-agent"),
    path("hosts/", host_views.hosts_page, name="hosts"),
    path("hosts/operations/", host_views.operations_panel, name="host-operations"),
    path("hosts/operate/", host_views.operate_hosts, name="operate-hosts"),
    path("hosts/<int:host_id>/confirm-key/", host_views.confirm_host_key, name="confirm-host-key"),
    path("accounts/login/", login.ThrottledLoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("accounts/link/<str:uidb64>/<str:token>/", login.login_with_link, name="login-link"),
    path("admin/login/", login.admin_login),
    path("admin/", admin.site.urls),
    path("metrics", metrics.metrics_view),
    path(f"{api}health", run_api.health),
    path(f"{api}agents/register", agent_api.register),
    path(f"{api}agents/claim", agent_api.claim),
    path(f"{api}agents/heartbeat", agent_api.heartbeat),
    path(f"{api}agents/preflight", agent_api.report_preflight),
    path(f"{api}agents/goodbye", agent_api.goodbye),
    path(f"{api}attempts/<str:attempt_id>/progress", agent_api.progress),
    path(f"{api}attempts/<str:attempt_id>/complete", agent_api.complete),
    path(f"{api}attempts/<str:attempt_id>/artifacts", agent_api.upload_artifact),
    path(f"{api}attempts/<str:attempt_id>/input-requests", agent_api.create_input_request),
    path(f"{api}input-requests/<str:request_id>/wait", agent_api.wait_input_request),
    path(f"{api}runs", run_api.runs),
    path(f"{api}runs/<str:run_id>", run_api.run_detail),
    path(f"{api}runs/<str:run_id>/cancel", run_api.cancel_run),
    path(f"{api}runs/<str:run_id>/pause", run_api.pause_run),
    path(f"{api}runs/<str:run_id>/resume", run_api.resume_run),
    path(f"{api}runs/<str:run_id>/rerun", run_api.rerun),
    path(f"{api}runs/<str:run_id>/retry-failed", run_api.retry_failed),
    path(f"{api}tasks/<str:task_id>/retry", run_api.retry_task),
    path(f"{api}tasks/<str:task_id>", run_api.task_detail),
    path(f"{api}tasks/<str:task_id>/log", run_api.task_log),
    path(f"{api}workflows/<str:name>/runs", run_api.start_workflow),
    path(f"{api}agents", run_api.agents),
    path(f"{api}tasks/<str:task_id>/approve", run_api.approve_task),
    path(f"{api}input-requests/<str:request_id>/answer", run_api.answer_input_request),
    path(f"{api}tasks/<str:task_id>/reject", run_api.reject_task),
    path(f"{api}artifacts/<str:artifact_id>", run_api.artifact),
]

handler404 = "control_plane.errors.not_found"
handler500 = "control_plane.errors.server_error"
