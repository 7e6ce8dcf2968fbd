"""Prometheus metrics at /metrics (the `prometheus_client` library).

Two kinds. What the server does is counted where it happens, in whichever worker process does it: HTTP
requests by route and status, ready → assigned latency, attempt durations by executor and outcome, lost
attempts. With several worker processes (`./run serve --workers N`) each keeps its counts in files under
PROMETHEUS_MULTIPROC_DIR (control_plane.launch makes the folder, empty, for every server start) and a scrape
adds them up. What the database holds is read at scrape time, by the process that answers it, in one
round trip per family: tasks by state, ready tasks by what they need, agents by status, tokens and cost by
model. Nothing is counted twice and no worker keeps state another needs.

A scrape needs the bearer token CP_METRICS_TOKEN, or comes from an address in CP_METRICS_ALLOW (default:
this machine only).
"""

from __future__ import annotations

import hmac
import ipaddress
import os

from asgiref.sync import iscoroutinefunction
from django.conf import settings
from django.db import connection
from django.http import HttpResponse
from django.utils.decorators import sync_and_async_middleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

HTTP_REQUESTS = Counter(
    "cp_http_requests", "HTTP requests answered, by route and status", ["route", "method", "status"]
)
READY_TO_ASSIGNED = Histogram(
    "cp_ready_to_assigned_seconds",
    "From a task becoming ready to its assignment to an agent",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)
ATTEMPT_DURATION = Histogram(
    "cp_attempt_duration_seconds",
    "From an attempt's start to its end, by executor and outcome (succeeded, failed, lost, ...)",
    ["executor", "outcome"],
    buckets=(0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
)
ATTEMPTS_LOST = Counter("cp_attempts_lost", "Attempts lost (lease expired, agent silent, ...)", ["reason"])


def observe_request(request, response) -> None:
    """Count one answered request by its route's pattern (not its path: ids would explode the series)."""
    match = getattr(request, "resolver_match", None)
    route = f"/{match.route}" if match is not None and match.route else "unmatched"
    HTTP_REQUESTS.labels(route, request.method, str(response.status_code)).inc()


@sync_and_async_middleware
def request_metrics(get_response):
    """The full stack's requests (the agents' lean handler counts its own: control_plane.agent_asgi)."""
    if iscoroutinefunction(get_response):

        async def middleware(request):
            response = await get_response(request)
            observe_request(request, response)
            return response

    else:

        def middleware(request):
            response = get_response(request)
            observe_request(request, response)
            return response

    return middleware


def attempt_ended(executor: str, outcome: str, elapsed_s: float | None) -> None:
    if elapsed_s is not None:
        ATTEMPT_DURATION.labels(executor, outcome).observe(float(elapsed_s))


class DatabaseCollector:
    """The families read from PostgreSQL at scrape time."""

    def collect(self):
        with connection.cursor() as cur:
            cur.execute("SELECT state, count(*) FROM tasks_app_task GROUP BY state")
            tasks = GaugeMetricFamily("cp_tasks", "Tasks by state", labels=["state"])
            for state, n in cur.fetchall():
                tasks.add_metric([state], n)
            yield tasks

            cur.execute(
                "SELECT executor, array_to_string(ARRAY(SELECT unnest(requires) ORDER BY 1), ','), count(*)"
                " FROM tasks_app_task WHERE state = 'ready' GROUP BY 1, 2"
            )
            ready = GaugeMetricFamily(
                "cp_ready_tasks", "Ready tasks by executor and required labels (comma-separated, sorted)",
                labels=["executor", "requires"],
            )  # fmt: skip
            for executor, requires, n in cur.fetchall():
                ready.add_metric([executor, requires], n)
            yield ready

            cur.execute(
                "SELECT CASE WHEN status = 'online' AND NOT enabled THEN 'disabled'"
                " WHEN status = 'online' AND draining THEN 'draining' ELSE status END, count(*)"
                " FROM agents_app_agent GROUP BY 1"
            )
            agents = GaugeMetricFamily("cp_agents", "Agents by status", labels=["status"])
            for status, n in cur.fetchall():
                agents.add_metric([status], n)
            yield agents

            cur.execute(
                "SELECT COALESCE(usage ->> 'model', ''),"
                " COALESCE(sum((usage ->> 'input_tokens')::bigint), 0),"
                " COALESCE(sum((usage ->> 'output_tokens')::bigint), 0),"
                " COALESCE(sum((usage ->> 'cache_read_tokens')::bigint), 0),"
                " COALESCE(sum((usage ->> 'cache_write_tokens')::bigint), 0), COALESCE(sum(cost_usd), 0)"
                " FROM tasks_app_attempt WHERE usage IS NOT NULL GROUP BY 1"
            )
            tokens = CounterMetricFamily("cp_tokens", "AI tokens used, by model and kind", labels=["model", "kind"])
            cost = CounterMetricFamily("cp_cost_usd", "AI cost in US dollars, by model", labels=["model"])
            for model, inp, out, cache_read, cache_write, usd in cur.fetchall():
                for kind, n in (("input", inp), ("output", out), ("cache_read", cache_read),
                                ("cache_write", cache_write)):  # fmt: skip
                    tokens.add_metric([model, kind], n)
                cost.add_metric([model], float(usd))
            yield tokens
            yield cost


def _allowed(request) -> bool:
    token = settings.CP_METRICS_TOKEN
    given = request.headers.get("Authorization", "")
    if token and hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return True
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR") or "")
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(n, strict=False) for n in settings.CP_METRICS_ALLOW)


def metrics_view(request):
    """The text exposition format. 403 for a scraper with neither the token nor an allowed address."""
    if not _allowed(request):
        return HttpResponse("metrics need the bearer token CP_METRICS_TOKEN or an address in CP_METRICS_ALLOW\n",
                            status=403, content_type="text/plain")  # fmt: skip
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)  # every worker process's counts, from their files
    else:  # one process (the test client, `manage.py runserver`): its own counts
        for collector in (HTTP_REQUESTS, READY_TO_ASSIGNED, ATTEMPT_DURATION, ATTEMPTS_LOST):
            registry.register(collector)
    registry.register(DatabaseCollector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
