from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import path

from agents_app import api as agent_api  # noqa: F401  (declares the agents' endpoints)
from agents_app.hosts import views as host_views
from control_plane import api_docs, api_spec, login, metrics
from tasks_app import api as run_api  # noqa: F401  (declares the run endpoints)
from tasks_app.dashboard import views

urlpatterns = [
    path("", views.overview, name="overview"),
    path("runs/<uuid:run_id>/", views.run_page, name="run"),
    path("runs/", views.runs_page, name="runs"),
    path("runs/<uuid:run_id>/tasks/", views.run_tasks_page, name="run-tasks"),
    path("runs/<uuid:run_id>/tasks/<str:key>/", views.run_task_by_key, name="run-task"),
    path("runs/<uuid:run_id>/timeline/", views.run_timeline_page, name="run-timeline"),
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
    path("docs/api/", api_docs.api_page, name="api-docs"),  # not under /api/: every answer there is JSON
    # Every /api/v1/ route, from the endpoints the two API modules declare (control_plane/api_spec.py).
    *api_spec.url_patterns(),
]

handler400 = "control_plane.errors.bad_request"
handler403 = "control_plane.errors.permission_denied"
handler404 = "control_plane.errors.not_found"
handler500 = "control_plane.errors.server_error"
