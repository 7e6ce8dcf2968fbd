"""Agent identities and tokens: enrollment, authentication, retirement, operator switches, pre-flights.

The agents' actions: every change of an agent's status, switches or offered executors is a function here
that checks the status table (tasks_app.states.AGENT_TRANSITIONS) and writes an Event naming its actor, in
the change's own transaction. Two changes run as SQL elsewhere and follow the same table: the sweep marks
silent agents offline (tasks_app.actions.sweep, queries.SILENT_AGENTS; the sweep cannot call in here, as
this module uses tasks_app.actions), and an attempt's completion holds an executor back on its agent
(actions._hold_executor, a usage limit or a lost login, in the completion's lock order).
"""

from __future__ import annotations

import hmac
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from tasks_app import queries as q
from tasks_app.actions import lose_attempts
from tasks_app.audit import EventLog
from tasks_app.errors import ActionError, NotFound
from tasks_app.models import Event
from tasks_app.notify import CHANNEL, Changes
from tasks_app.states import AttemptState, check_transition

from . import preflight, tokens
from .models import Agent, AgentStatus, ApiToken, EnrollmentToken

# What TOUCH_AGENT announces when an agent comes back online: the agents' panels redraw.
_BACK_ONLINE = {"channel": CHANNEL, "payload": Changes(agents=True).payload()}


class AuthError(ActionError):
    status = 401
    code = "unauthorized"


class Forbidden(ActionError):
    status = 403
    code = "forbidden"


def create_enrollment_token(note: str = "", uses: int | None = None, expires: timedelta | None = None, user=None):
    token, digest, prefix = tokens.mint(tokens.ENROLLMENT)
    record = EnrollmentToken.objects.create(
        token_hash=digest,
        prefix=prefix,
        note=note,
        max_uses=uses,
        expires_at=timezone.now() + expires if expires else None,
        created_by=user,
    )
    return token, record


def create_api_token(user, note: str = ""):
    token, digest, prefix = tokens.mint(tokens.API)
    return token, ApiToken.objects.create(user=user, token_hash=digest, prefix=prefix, note=note)


def authenticate_agent(token: str | None) -> dict:
    """The calling agent (and its call counted as contact, which brings an agent the sweep marked offline
    back online, with its Event), or AuthError / Forbidden. One statement, two when the last contact
    recorded is over a second old."""
    if not token:
        raise AuthError("an agent token is required (Authorization: Bearer <token>)")
    with connection.cursor() as cur:
        cur.execute(q.AUTH_AGENT, {"token_hash": tokens.hash_token(token)})
        row = cur.fetchone()
        if row is None:
            raise _refusal_of(tokens.hash_token(token))
        *fields, stale = row
        if stale:
            cur.execute(q.TOUCH_AGENT, {"agent_id": row[0], **_BACK_ONLINE})
    keys = ("id", "name", "labels", "executors", "capacity", "enabled", "draining", "shutdown_requested")
    agent = dict(zip(keys, fields, strict=True))
    if not agent["enabled"]:
        raise Forbidden("this agent is disabled", "agent_disabled")
    return agent


def _refusal_of(token_hash: str) -> AuthError:
    """Why a token no longer works, so the agent can tell "stop" from "register again": a revoked or
    replaced identity must stop (registering again would undo the operator's revocation or fight the
    newer registration), while an unknown token (a server with a new database) may enroll again."""
    retired = Agent.objects.filter(token_hash=token_hash).values("id", "revoked_at").first()
    if retired is None:
        return AuthError("unknown agent token")
    if retired["revoked_at"] is not None:
        return AuthError("this agent's token was revoked by an operator", "agent_revoked")
    if _was_forgotten(retired["id"]):
        # Forgotten after a long silence, not taken over: as unknown, so a daemon with an enrollment token
        # enrolls again as a new agent rather than stopping for good.
        return AuthError("this agent was forgotten after a long time offline; register again")
    return AuthError("this agent identity was replaced: its name was registered again", "agent_replaced")


def authenticate_user(token: str | None):
    """The Django user behind an API token, or AuthError / Forbidden."""
    if not token:
        raise AuthError("an API token is required (Authorization: Bearer <token>)")
    record = (
        ApiToken.objects.select_related("user")
        .filter(token_hash=tokens.hash_token(token), revoked_at__isnull=True)
        .first()
    )
    if record is None:
        raise AuthError("unknown or revoked API token")
    if not record.user.is_active:
        raise Forbidden("this user is inactive", "user_inactive")
    ApiToken.objects.filter(pk=record.pk).update(last_used_at=timezone.now())
    return record.user


def register_agent(enrollment: str | None, info: dict) -> tuple[Agent, str]:
    """Enroll an agent. A name whose agent is online is taken (409); an offline or disabled one is retired
    (its token stops working, its live attempts are lost) and the name goes to the newcomer."""
    if not enrollment:
        raise AuthError("an enrollment token is required (Authorization: Bearer <token>)")
    now = timezone.now()
    with transaction.atomic():
        record = (
            EnrollmentToken.objects.select_for_update()
            .filter(token_hash=tokens.hash_token(enrollment), revoked_at__isnull=True)
            .first()
        )
        if record is None:
            raise AuthError("unknown or revoked enrollment token")
        if record.expires_at and record.expires_at <= now:
            raise AuthError("this enrollment token has expired", "token_expired")
        if record.max_uses is not None and record.uses >= record.max_uses:
            raise AuthError("this enrollment token has been used up", "token_used_up")
        old = Agent.objects.select_for_update().filter(name=info["name"], retired_at__isnull=True).first()
        retired_attempts = []
        events = EventLog(f"agent:{info['name']}")
        if old is not None:
            silent_since = now - timedelta(seconds=settings.CP_OFFLINE_AFTER_S)
            # Online in name only when nobody swept since it went silent: it is offline in fact.
            if (
                old.status == AgentStatus.ONLINE
                and old.enabled
                and old.last_seen_at
                and old.last_seen_at > silent_since
                and not _proves_identity(old, info.get("replaces_token"))
            ):
                raise ActionError(f"an agent named {old.name!r} is online", "name_taken")
            retired_attempts = _retire(old, now, events, "re-registered")
        token, digest, _prefix = tokens.mint(tokens.AGENT)
        report = info.get("preflight") or {}
        agent = Agent.objects.create(
            name=info["name"],
            labels=info["labels"],
            executors=preflight.usable(info["executors"], report),
            executor_versions=preflight.versions(report) if report else info.get("executor_versions") or {},
            preflight=report,
            preflight_at=now if report else None,
            capacity=info["capacity"],
            hostname=info.get("hostname") or "",
            version=info.get("version") or "",
            token_hash=digest,
            enrollment_token=record,
            last_seen_at=now,
        )
        EnrollmentToken.objects.filter(pk=record.pk).update(uses=F("uses") + 1, last_used_at=now)
        events.add("agent", "", AgentStatus.ONLINE, agent=agent.id, detail={"labels": agent.labels})
        with connection.cursor() as cur:
            events.write(cur)
            Changes(agents=True).send(cur)
    if retired_attempts:
        lose_attempts(retired_attempts, "agent re-registered", f"agent:{agent.name}")
    return agent, token


def _proves_identity(agent: Agent, token: str | None) -> bool:
    """The registering agent holds `agent`'s current token: it is re-enrolling itself (rotating its token),
    not a second agent taking a name in use."""
    return bool(token) and hmac.compare_digest(tokens.hash_token(token), agent.token_hash)


def _retire(agent: Agent, now, events: EventLog, reason: str, **fields) -> list:
    """Retire `agent` for good (its row locked by the caller's transaction): its token stops working and its
    name is free. Returns its live attempts, for the caller to lose once the transaction has committed."""
    check_transition("agent", agent.status, AgentStatus.RETIRED)
    live = list(agent.attempts.filter(state__in=AttemptState.LIVE).values_list("id", flat=True))
    events.add("agent", agent.status, AgentStatus.RETIRED, agent=agent.id, detail={"reason": reason})
    Agent.objects.filter(pk=agent.pk).update(status=AgentStatus.RETIRED, retired_at=now, **fields)
    return live


def _was_forgotten(agent_id) -> bool:
    return Event.objects.filter(
        agent_id=agent_id, kind="agent", to_state=AgentStatus.RETIRED, detail__reason=FORGOTTEN
    ).exists()


# --- Forgetting, and an agent's goodbye ----------------------------------------------------------------

FORGOTTEN = "forgotten"


def forget_agent(agent_id, actor: str) -> Agent:
    """Forget an offline agent: it is retired (its row, token hash and name kept, so its attempts and the
    audit trail still name it; the agents page and the fleet counts show current agents only) and its name
    is free. An online agent is refused (409): drain or disable it first and let it go offline."""
    with transaction.atomic():
        agent = Agent.objects.select_for_update().filter(pk=agent_id, retired_at__isnull=True).first()
        if agent is None:
            raise NotFound("no current agent with that id")
        if agent.status != AgentStatus.OFFLINE:
            raise ActionError(f"agent {agent.name} is {agent.status}: only an offline agent can be forgotten")
        events = EventLog(actor)
        live = _retire(agent, timezone.now(), events, FORGOTTEN)
        with connection.cursor() as cur:
            events.write(cur)
            Changes(agents=True).send(cur)
    if live:  # none in practice: an offline agent's attempts were lost when it went offline
        lose_attempts(live, "agent forgotten", actor)
    return agent


FORGETTER = "system:forgetter"


def forget_absent_agents() -> int:
    """The sweep's part: forget every offline agent not seen for CP_AGENT_FORGET_DAYS (0: never), each with
    its own Event (actor system:forgetter). Returns how many were forgotten."""
    days = settings.CP_AGENT_FORGET_DAYS
    if days <= 0:
        return 0
    cutoff = timezone.now() - timedelta(days=days)
    absent = Agent.objects.filter(retired_at__isnull=True, status=AgentStatus.OFFLINE).filter(
        Q(last_seen_at__lt=cutoff) | Q(last_seen_at__isnull=True, registered_at__lt=cutoff)
    )
    forgotten = 0
    for agent_id in absent.values_list("id", flat=True):
        try:
            forget_agent(agent_id, FORGETTER)
        except ActionError:  # came back meanwhile, or forgotten by someone else
            continue
        forgotten += 1
    return forgotten


def say_goodbye(agent: dict) -> dict:
    """A daemon stopping cleanly (README, "API": POST /api/v1/agents/goodbye): the agent is offline at once,
    not a silence later (Event online -> offline, actor agent:NAME, reason goodbye), and whatever attempts
    it still holds are lost as the sweep would lose them. A later call brings it back online as after any
    silence. Returns {"lost": n}."""
    actor = f"agent:{agent['name']}"
    with transaction.atomic():
        row = Agent.objects.select_for_update().filter(pk=agent["id"], retired_at__isnull=True).first()
        if row is None:
            raise NotFound("no current agent with that id")
        live = list(row.attempts.filter(state__in=AttemptState.LIVE).values_list("id", flat=True))
        if row.status == AgentStatus.ONLINE:
            check_transition("agent", row.status, AgentStatus.OFFLINE)
            events = EventLog(actor)
            events.add("agent", row.status, AgentStatus.OFFLINE, agent=row.id, detail={"reason": "goodbye"})
            Agent.objects.filter(pk=row.pk).update(status=AgentStatus.OFFLINE, reported_status="")
            with connection.cursor() as cur:
                events.write(cur)
                Changes(agents=True).send(cur)
    lost = lose_attempts(live, "agent said goodbye", actor) if live else 0
    return {"lost": lost}


def revoke_agent(agent_id, actor: str) -> Agent:
    """Revoke an agent's token for good: its next call answers 401 `agent_revoked` and the daemon stops; its
    live attempts are lost (their tasks go back to ready). Enrolling again needs an enrollment token."""
    now = timezone.now()
    with transaction.atomic():
        agent = Agent.objects.select_for_update().filter(pk=agent_id, retired_at__isnull=True).first()
        if agent is None:
            raise NotFound("no current agent with that id")
        events = EventLog(actor)
        live = _retire(agent, now, events, "token revoked", revoked_at=now)
        with connection.cursor() as cur:
            events.write(cur)
            Changes(agents=True).send(cur)
    if live:
        lose_attempts(live, "agent token revoked", actor)
    return agent


def set_agent_flags(agent_id, actor: str, **flags) -> Agent:
    """Operator switches (enabled, draining, shutdown_requested), audited."""
    allowed = {"enabled", "draining", "shutdown_requested"}
    if set(flags) - allowed:
        raise ValueError(f"unknown agent flag(s): {set(flags) - allowed}")
    with transaction.atomic():
        agent = Agent.objects.select_for_update().filter(Q(pk=agent_id), retired_at__isnull=True).first()
        if agent is None:
            raise NotFound("no agent with that id")
        events = EventLog(actor)
        for name, value in flags.items():
            if getattr(agent, name) != value:
                events.add("agent", f"{name}={getattr(agent, name)}", f"{name}={value}", agent=agent.id)
                setattr(agent, name, value)
        agent.save(update_fields=list(flags))
        with connection.cursor() as cur:
            events.write(cur)
            Changes(agents=True).send(cur)
    return agent


# --- Pre-flights (the checks are read in agents_app.preflight) ------------------------------------------


def record_preflight(agent_id, report: dict) -> list[str]:
    """Store an agent's new pre-flight; its offered executors become exactly those that passed. Returns them."""
    passed = [name for name, check in report.items() if check["usable"]]
    with transaction.atomic():
        agent = Agent.objects.select_for_update().get(pk=agent_id)
        events = EventLog(f"agent:{agent.name}")
        failed = sorted(name for name, check in report.items() if not check["usable"])
        events.add("agent", "", "preflight", agent=agent.id, detail={"usable": passed, "failed": failed})
        Agent.objects.filter(pk=agent.pk).update(
            executors=passed,
            executor_versions=preflight.versions(report),
            preflight=report,
            preflight_at=timezone.now(),
        )
        with connection.cursor() as cur:
            events.write(cur)
            Changes(agents=True).send(cur)
    return passed


def request_preflight(agent_id, actor: str) -> Agent:
    """Ask a current agent to check its executors again; its next heartbeat answer carries the command."""
    with transaction.atomic():
        agent = Agent.objects.select_for_update().filter(pk=agent_id, retired_at__isnull=True).first()
        if agent is None:
            raise NotFound("no agent with that id")
        agent.preflight_requested = True
        agent.save(update_fields=["preflight_requested"])
        with connection.cursor() as cur:
            events = EventLog(actor)
            events.add("agent", "", "preflight_requested", agent=agent.id)
            events.write(cur)
    return agent


def take_preflight_request(agent_id) -> bool:
    """Whether a pre-flight was requested for this agent, clearing the request (delivered once: the request's
    Event is the audit, its delivery writes none)."""
    with connection.cursor() as cur:
        cur.execute(
            "UPDATE agents_app_agent SET preflight_requested = false WHERE id = %s AND preflight_requested"
            " RETURNING id",
            [agent_id],
        )
        return cur.fetchone() is not None
