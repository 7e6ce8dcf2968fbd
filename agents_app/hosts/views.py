"""The hosts page: hosts, their pinned keys and the operations run on them. Everyone logged in watches;
operators (the same permission as for runs) start operations and confirm host keys.

The operations panel is live like the other pages: every change a job makes to an operation is a NOTIFY
(hosts/jobs.announce), and the page's websocket pushes the panel and each host's last-operation cell. Only
while an operation waits in the queue does the panel also ask every 5 s: "not picked up yet" is a matter of
time passing, which no event announces. An operator's action answers with the flash and both panels, so
the page shows its effect at once; the hosts panel is not refreshed otherwise, which would clear the
operator's selection.
"""

from __future__ import annotations

from datetime import timedelta

from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import render
from django.template.loader import render_to_string
from django.utils import timezone

from control_plane.web import OPERATE, actor_of, answer, operator_only

from .jobs import ACTIVE, start_operations
from .models import Host, HostOperation, HostOperationKind, HostOperationState
from .trust import confirm_offered_key

RECENT_OPERATIONS = 30
BADGE = {"queued": "ag-offline", "running": "ag-busy", "succeeded": "ag-idle", "failed": "ag-disabled"}
# A job the cluster has not picked up after this long probably has no cluster to pick it up.
QUEUE_PATIENCE_S = 10


def operations_context() -> dict:
    ops = list(HostOperation.objects.select_related("host").order_by("-created_at")[:RECENT_OPERATIONS])
    waiting_since = timezone.now() - timedelta(seconds=QUEUE_PATIENCE_S)
    for op in ops:
        op.badge = BADGE[op.state]
        op.waiting_long = op.state == HostOperationState.QUEUED and op.created_at < waiting_since
    return {
        "operations": ops,
        "operations_active": any(op.state in ACTIVE for op in ops),
        "operations_queued": any(op.state == HostOperationState.QUEUED for op in ops),
    }


def hosts_context() -> dict:
    hosts = list(Host.objects.order_by("name"))
    last = {}
    for op in HostOperation.objects.filter(host__in=hosts).order_by("host_id", "-created_at").distinct("host_id"):
        op.badge = BADGE[op.state]
        last[op.host_id] = op
    for host in hosts:
        host.last_operation = last.get(host.pk)
    return {"hosts": hosts, "operation_kinds": HostOperationKind.values}


def live_context() -> dict:
    """What the live hosts page pushes (tasks_app.dashboard.pages.add_page)."""
    return {**hosts_context(), **operations_context()}


def add_live_page() -> None:
    """The hosts page on the dashboard's websocket: the operations panel and each host's last-operation cell,
    not the hosts table, whose checkboxes hold the operator's selection; pushed on host notifications."""
    from tasks_app.dashboard.pages import Panel, add_page

    panels = [Panel("panel-host-operations", "dashboard/panels/host_operations_live.html")]
    add_page("hosts", panels, live_context, lambda event: bool(event.get("hosts")))


def page_context(request) -> dict:
    return {**hosts_context(), **operations_context(), "perms_operate": request.user.has_perm(OPERATE)}


@login_required
def hosts_page(request):
    return render(request, "dashboard/hosts.html", {**page_context(request), "page": "hosts", "ws_path": "/ws/hosts/"})


def _answer_with_panels(request, text: str, selected=()):
    """The flash and, for htmx, both panels as out-of-band swaps showing what the action changed (the hosts
    the operator had selected stay selected)."""
    if not request.headers.get("HX-Request"):
        return answer(request, text, back="/hosts/")
    context = {**page_context(request), "oob": True, "selected": set(selected)}
    html = render_to_string("dashboard/flash.html", {"text": text, "ok": True})
    for template in ("dashboard/panels/hosts.html", "dashboard/panels/host_operations.html"):
        html += render_to_string(template, context, request=request)
    return HttpResponse(html)


@login_required
def operations_panel(request):
    """The operations panel, and each host's last-operation cell out of band (the rest of the hosts panel
    stays as it is, selection included)."""
    context = page_context(request)
    html = render_to_string("dashboard/panels/host_operations.html", context, request=request)
    for host in context["hosts"]:
        html += render_to_string("dashboard/panels/host_last_operation.html", {"host": host, "oob": True})
    return HttpResponse(html)


@operator_only
def operate_hosts(request):
    kind = request.POST.get("operation", "")
    if kind not in HostOperationKind.values:
        return answer(request, f"Unknown operation {kind!r}.", ok=False, back="/hosts/")
    ids = [i for i in request.POST.getlist("host") if i.isdigit()]
    hosts = list(Host.objects.filter(pk__in=ids).order_by("name"))
    if not hosts:
        return answer(request, "Select at least one host.", ok=False, back="/hosts/")
    start_operations(kind, hosts, actor_of(request))
    names = ", ".join(h.name for h in hosts)
    return _answer_with_panels(request, f"{kind.capitalize()} queued for {names}.", [h.pk for h in hosts])


@operator_only
def confirm_host_key(request, host_id: int):
    host = confirm_offered_key(host_id, request.POST.get("fingerprint", ""), actor_of(request))
    return _answer_with_panels(request, f"{host.name}: host key {host.host_key_fingerprint} pinned.")
