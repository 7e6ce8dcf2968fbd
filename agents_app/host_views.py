"""The hosts page: hosts, their pinned keys and the operations run on them. Everyone logged in watches;
operators (the same permission as for runs) start operations and confirm host keys.

The operations panel refreshes itself (htmx, every 2 s) only while an operation is queued or running: host
operations are not scheduler events on the live websocket, and a page with nothing in progress costs nothing.
"""

from __future__ import annotations

from datetime import timedelta

from django.contrib.auth.decorators import login_required
from django.shortcuts import render
from django.utils import timezone

from tasks_app.views import OPERATE, _actor, _answer, _operator_only

from .host_jobs import ACTIVE, abandon_stale_operations, start_operations
from .host_models import Host, HostOperation, HostOperationKind, HostOperationState
from .host_trust import confirm_offered_key

RECENT_OPERATIONS = 30
BADGE = {"queued": "ag-offline", "running": "ag-busy", "succeeded": "ag-idle", "failed": "ag-disabled"}
# A job the cluster has not picked up after this long probably has no cluster to pick it up.
QUEUE_PATIENCE_S = 10


def operations_context() -> dict:
    abandon_stale_operations()
    ops = list(HostOperation.objects.select_related("host").order_by("-created_at")[:RECENT_OPERATIONS])
    waiting_since = timezone.now() - timedelta(seconds=QUEUE_PATIENCE_S)
    for op in ops:
        op.badge = BADGE[op.state]
        op.waiting_long = op.state == HostOperationState.QUEUED and op.created_at < waiting_since
    return {"operations": ops, "operations_active": any(op.state in ACTIVE for op in ops)}


def hosts_context() -> dict:
    hosts = list(Host.objects.order_by("name"))
    last = {}
    for op in HostOperation.objects.filter(host__in=hosts).order_by("host_id", "-created_at").distinct("host_id"):
        op.badge = BADGE[op.state]
        last[op.host_id] = op
    for host in hosts:
        host.last_operation = last.get(host.pk)
    return {"hosts": hosts, "operation_kinds": HostOperationKind.values}


@login_required
def hosts_page(request):
    context = {**hosts_context(), **operations_context(), "page": "hosts"}
    context["perms_operate"] = request.user.has_perm(OPERATE)
    return render(request, "dashboard/hosts.html", context)


@login_required
def operations_panel(request):
    return render(request, "dashboard/panels/host_operations.html", operations_context())


@_operator_only
def operate_hosts(request):
    kind = request.POST.get("operation", "")
    if kind not in HostOperationKind.values:
        return _answer(request, f"Unknown operation {kind!r}.", ok=False, back="/hosts/")
    ids = [i for i in request.POST.getlist("host") if i.isdigit()]
    hosts = list(Host.objects.filter(pk__in=ids).order_by("name"))
    if not hosts:
        return _answer(request, "Select at least one host.", ok=False, back="/hosts/")
    start_operations(kind, hosts, _actor(request))
    names = ", ".join(h.name for h in hosts)
    return _answer(request, f"{kind.capitalize()} queued for {names}.", back="/hosts/")


@_operator_only
def confirm_host_key(request, host_id: int):
    host = confirm_offered_key(host_id, request.POST.get("fingerprint", ""), _actor(request))
    return _answer(request, f"{host.name}: host key {host.host_key_fingerprint} pinned.", back="/hosts/")
