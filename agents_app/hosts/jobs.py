"""Host operations as django-q2 jobs: one job runs a batch (the same operation on many hosts) concurrently
with asyncio, each host bounded by its own timeouts, so one slow or failing host delays or stops no other.
Progress and output are written to the HostOperation rows as they happen; the hosts page shows them.

`start_operations` is the one entry point (dashboard, admin, `manage.py hosts`); `run_batch_job` is what the
q cluster (or the command, in the foreground) executes.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from control_plane.http_api import db_call
from tasks_app.errors import ActionError
from tasks_app.notify import Changes

from ..models import Agent, AgentStatus, EnrollmentToken
from ..registry import create_enrollment_token
from .keys import UnusableKey, check_private_key, normalize_host_key
from .models import Host, HostOperation, HostOperationKind, HostOperationState
from .secrets import SecretUnavailable, decrypt_private_key

if TYPE_CHECKING:
    from . import provision

# provision (and asyncssh with it, ~130 ms) is imported by the functions that run an operation, not here: the
# admin and the hosts' pages import this module for start_operations in every process of the server.
log = logging.getLogger(__name__)
DAEMON = Path(__file__).resolve().parent.parent / "cp_agent.py"
OUTPUT_KEEP_CHARS = 64 * 1024
# Operations that write a fresh enrollment token to the host and start agents with it.
STARTS_AGENTS = (HostOperationKind.DEPLOY, HostOperationKind.RESTART, HostOperationKind.UPGRADE)
# Each agent may enroll twice with one token (e.g. again after the server forgot it); restart and upgrade
# write a fresh token anyway, so an old one on the host is worth little.
TOKEN_USES_PER_AGENT = 2
TOKEN_LIFETIME = timedelta(hours=24)
ACTIVE = (HostOperationState.QUEUED, HostOperationState.RUNNING)
QUEUE_PATIENCE = timedelta(minutes=15)
STALE_OPERATIONS_SCHEDULE = "fail host operations that will never finish"


class HostBusy(ActionError):
    code = "host_busy"


def start_operations(kind: str, hosts, actor: str, *, background: bool = True) -> list[HostOperation]:
    """One HostOperation per host, run by one django-q2 job (or here and now when not `background`)."""
    if kind not in HostOperationKind.values:
        raise ValueError(f"unknown host operation {kind!r}; one of {', '.join(HostOperationKind.values)}")
    abandon_stale_operations()
    batch = uuid.uuid4()
    with transaction.atomic():
        # Locking the hosts' rows serialises starts: two operations at once on one host (a deploy and an
        # uninstall, say) would undo each other's work there.
        locked = list(Host.objects.select_for_update().filter(pk__in=[h.pk for h in hosts]).order_by("pk"))
        busy = HostOperation.objects.filter(host__in=locked, state__in=ACTIVE).select_related("host")
        if busy:
            doing = "; ".join(f"{op.host.name} has a {op.kind} {op.state}" for op in busy)
            raise HostBusy(f"{doing}: wait for it to finish (nothing was started)")
        ops = [HostOperation.objects.create(batch=batch, host=h, kind=kind, requested_by=actor) for h in locked]
        announce()
    ids = [str(op.id) for op in ops]
    if not ids:
        return []
    if background:
        from django_q.tasks import async_task

        task_id = async_task("agents_app.hosts.jobs.run_batch_job", ids, task_name=f"hosts {kind}", group="hosts")
        HostOperation.objects.filter(batch=batch).update(q_task_id=task_id)
    else:
        run_batch_job(ids)
    return list(HostOperation.objects.filter(batch=batch).select_related("host").order_by("host__name"))


def run_batch_job(operation_ids: list[str]) -> dict:
    """Run the still-queued operations among `operation_ids` (a retried job does not redo finished ones)."""
    claimed = _claim(operation_ids)
    if claimed:
        asyncio.run(_run_all(claimed))
    states = HostOperation.objects.filter(pk__in=operation_ids).values_list("host__name", "state")
    return dict(states)


def _claim(operation_ids) -> list[HostOperation]:
    with transaction.atomic():
        ops = list(
            HostOperation.objects.select_for_update(skip_locked=True)
            .select_related("host")
            .filter(pk__in=operation_ids, state=HostOperationState.QUEUED)
        )
        HostOperation.objects.filter(pk__in=[op.pk for op in ops]).update(
            state=HostOperationState.RUNNING, started_at=timezone.now(), message="starting"
        )
        announce()
    return ops


async def _run_all(ops: list[HostOperation]) -> None:
    # Every host at once, not in rounds: then the whole batch ends within one operation's time limit (under
    # the q cluster's job timeout), and "running since" measures each host's own run. return_exceptions: a
    # bug in one host's run must not cancel the others'.
    await asyncio.gather(*(run_one(op) for op in ops), return_exceptions=True)


async def run_one(op: HostOperation) -> None:
    """Run one operation to a final state; every failure ends up in the row, none escapes."""
    from . import provision

    recorder = Recorder(op.pk)
    try:
        target, daemon, token = await db_call(prepare)(op)
        result = await asyncio.wait_for(
            provision.run_operation(op.kind, target, recorder.report, daemon=daemon, token=token),
            settings.CP_HOST_OPERATION_TIMEOUT_S,
        )
        if op.kind in STARTS_AGENTS:
            # The old processes are gone by now (stop checked), so any contact from now on is a new one's.
            since = timezone.now()
            await recorder.report(0.9, "waiting for the agents to come online")
            names = target.agent_names
            online = await wait_online(names, since)
            result["online"] = online
            if len(online) < len(names):
                missing = ", ".join(n for n in names if n not in online)
                raise provision.ProvisionError(
                    f"{op.host.name}: {missing} not online within {settings.CP_HOST_ENROLL_WAIT_S:.0f} s; is "
                    f"{target.server_url} reachable from the host? The agents' last log lines are above."
                )
            await recorder.report(output=f"{len(online)} agents online\n")
        if op.kind == HostOperationKind.SCAN:
            await db_call(record_offered_key)(op.host_id, result["offered_host_key"])
        await recorder.finish(HostOperationState.SUCCEEDED, "done", result=result)
        await db_call(settle_tokens)(op.pk, succeeded=True)
        return
    except provision.HostKeyChanged as exc:
        log.error("%s", exc)
        if exc.offered:
            await db_call(record_offered_key)(op.host_id, exc.offered)
        await recorder.finish(HostOperationState.FAILED, "host key changed: refused", error=str(exc))
    except (provision.ProvisionError, UnusableKey, SecretUnavailable) as exc:
        await recorder.finish(HostOperationState.FAILED, "failed", error=str(exc))
    except TimeoutError:
        error = f"{op.host.name}: gave up after {settings.CP_HOST_OPERATION_TIMEOUT_S:.0f} s"
        await recorder.finish(HostOperationState.FAILED, "timed out", error=error)
    except Exception as exc:
        log.exception("host operation %s on %s", op.kind, op.host.name)
        await recorder.finish(HostOperationState.FAILED, "failed", error=f"unexpected error: {exc!r}")
    await db_call(settle_tokens)(op.pk, succeeded=False)


def settle_tokens(op_id, succeeded: bool) -> None:
    """A host keeps one working enrollment token: the one its last successful start wrote there. A failed
    operation's token is revoked unless an agent enrolled with it; a success revokes the host's older ones.
    (Revoking an enrollment token does not touch the agents that enrolled with it.)"""
    op = HostOperation.objects.filter(pk=op_id).values("host_id", "enrollment_token_id").first()
    if op is None or op["enrollment_token_id"] is None:
        return
    live = EnrollmentToken.objects.filter(revoked_at__isnull=True)
    if succeeded:
        older = live.filter(host_operation__host_id=op["host_id"]).exclude(pk=op["enrollment_token_id"])
        older.update(revoked_at=timezone.now())
    else:
        live.filter(pk=op["enrollment_token_id"], uses=0).update(revoked_at=timezone.now())


def abandon_stale_operations() -> int:
    """Fail operations that will never finish, so their hosts can be operated on again: still `running` long
    after any run could have ended (the worker died; a retried job only picks up `queued` ones), or still
    `queued` after QUEUE_PATIENCE (no q cluster ran; should one start later, it skips them)."""
    now = timezone.now()
    limit = settings.CP_HOST_OPERATION_TIMEOUT_S + settings.CP_HOST_ENROLL_WAIT_S + 60
    ops = HostOperation.objects
    died = ops.filter(state=HostOperationState.RUNNING, started_at__lt=now - timedelta(seconds=limit)).update(
        state=HostOperationState.FAILED,
        message="abandoned",
        error="the worker running this operation stopped before it finished; run it again",
        finished_at=now,
    )
    never = ops.filter(state=HostOperationState.QUEUED, created_at__lt=now - QUEUE_PATIENCE).update(
        state=HostOperationState.FAILED,
        message="never started",
        error="no django-q2 cluster picked this operation up; start one (./run manage qcluster) and run it again",
        finished_at=now,
    )
    if died + never:
        announce()
    return died + never


def ensure_schedule(**kwargs) -> None:
    """The cluster's backstop for abandon_stale_operations, for when no server process is up to run it."""
    from django_q.models import Schedule

    Schedule.objects.update_or_create(
        name=STALE_OPERATIONS_SCHEDULE,
        defaults={"func": "agents_app.hosts.jobs.abandon_stale_operations", "schedule_type": Schedule.MINUTES,
                  "minutes": 1, "repeats": -1},
    )  # fmt: skip


def announce() -> None:
    """Tell the live hosts pages of every server process that operations changed (NOTIFY: sent when the
    caller's transaction commits, at once outside one)."""
    with connection.cursor() as cur:
        Changes(hosts=True).send(cur)


def _update_operation(op_id, **fields) -> None:
    with transaction.atomic():
        HostOperation.objects.filter(pk=op_id).update(**fields)
        announce()


def prepare(op: HostOperation) -> tuple[provision.Target, str, str]:
    """The Target (private key decrypted in memory only), the daemon's source and, for operations that
    start agents, a fresh enrollment token tied to this operation (so its agents are known as this host's)."""
    from . import provision

    host = op.host
    target = target_of(host, with_key=op.kind != HostOperationKind.SCAN)
    token = ""
    if op.kind in STARTS_AGENTS:
        if not target.server_url:
            raise provision.ProvisionError(
                f"{host.name}: no server URL for the agents: set the host's server URL or CP_PUBLIC_URL"
            )
        token, record = create_enrollment_token(
            note=f"host {host.name}: {op.kind}",
            uses=TOKEN_USES_PER_AGENT * max(1, host.agent_count),
            expires=TOKEN_LIFETIME,
        )
        HostOperation.objects.filter(pk=op.pk).update(enrollment_token=record)
    daemon = DAEMON.read_text() if op.kind in (HostOperationKind.DEPLOY, HostOperationKind.UPGRADE) else ""
    return target, daemon, token


def target_of(host: Host, with_key: bool = True) -> provision.Target:
    from . import provision

    return provision.Target(
        name=host.name,
        address=host.address,
        port=host.port,
        user=host.user,
        host_key=host.host_key,
        private_key=private_key_of(host) if with_key else None,
        python=host.remote_python,
        remote_dir=host.remote_dir,
        server_url=(host.server_url or settings.CP_PUBLIC_URL).rstrip("/"),
        ca_bundle=host.ca_bundle,
        agent_names=tuple(host.agent_names),
        labels=tuple(host.agent_labels),
        executors=tuple(host.agent_executors),
        capacity=host.agent_capacity,
        connect_timeout_s=settings.CP_SSH_CONNECT_TIMEOUT_S,
        stop_grace_s=settings.CP_HOST_STOP_GRACE_S,
    )


def private_key_of(host: Host):
    from . import provision

    if host.key_encrypted:
        return check_private_key(decrypt_private_key(host.key_encrypted))
    if host.key_path:
        try:
            text = Path(host.key_path).expanduser().read_text()
        except OSError as exc:
            raise provision.ProvisionError(f"{host.name}: cannot read the key file {host.key_path}: {exc}") from None
        return check_private_key(text)
    raise provision.ProvisionError(f"{host.name}: no private key: set a key file path or store a key")


def record_offered_key(host_id: int, offered: str) -> None:
    Host.objects.filter(pk=host_id).update(offered_host_key=normalize_host_key(offered), offered_at=timezone.now())


async def wait_online(names, since) -> list[str]:
    """Which of the agents `names` have been in touch since `since`, waiting up to CP_HOST_ENROLL_WAIT_S for
    all. A fresh agent enrolls with the operation's token; a restarted one re-uses its saved identity."""
    deadline = time.monotonic() + settings.CP_HOST_ENROLL_WAIT_S
    check = db_call(_online)
    while True:
        online = await check(names, since)
        if len(online) >= len(names) or time.monotonic() >= deadline:
            return online
        await asyncio.sleep(0.5)


def _online(names, since) -> list[str]:
    agents = Agent.objects.filter(
        name__in=names, retired_at__isnull=True, status=AgentStatus.ONLINE, last_seen_at__gte=since
    )
    return sorted(agents.values_list("name", flat=True))


class Recorder:
    """Writes one operation's progress, message and output to its row as they come."""

    def __init__(self, op_id):
        self.op_id = op_id
        self.output = ""

    async def report(self, progress: float | None = None, message: str = "", output: str = "") -> None:
        if message:
            self.output += message + "\n"
        self.output = (self.output + output)[-OUTPUT_KEEP_CHARS:]
        fields: dict = {"output": self.output}
        if progress is not None:
            fields["progress"] = progress
        if message:
            fields["message"] = message[:1000]
        await db_call(_update_operation)(self.op_id, **fields)

    async def finish(self, state: str, message: str, result: dict | None = None, error: str = "") -> None:
        if error:
            self.output = (self.output + "ERROR: " + error + "\n")[-OUTPUT_KEEP_CHARS:]
        await db_call(_update_operation)(
            self.op_id,
            state=state,
            message=message,
            error=error,
            result=result or {},
            output=self.output,
            progress=1.0,
            finished_at=timezone.now(),
        )
