"""/metrics scraped from a real server process during and after a run of real agents: its numbers are the
database's, its counters count what that server did, and a scraper needs the token or an allowed address."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agents_app.models import Agent
from tasks_app.models import Attempt, Task
from tests.conftest import Server, doc, wait_for

pytestmark = pytest.mark.django_db(transaction=True)
TOKEN = "metrics-secret-123"


def scrape(url: str, token: str | None = None) -> dict[tuple, float]:
    """{(sample name, sorted labels): value}."""
    req = urllib.request.Request(f"{url}/metrics")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=30) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def server(server_tmp):
    started = Server(server_tmp, {"CP_METRICS_TOKEN": TOKEN})
    yield started
    started.stop()


def test_a_scrape_during_and_after_a_run_matches_the_database(server, fleet, submit):
    fleet("m-1", ["met"], executors=["simulated", "shell"], server=server)
    run = submit(doc(*[{"key": f"t{i}", "requires": ["met"], "params": {"duration_s": 0.2}} for i in range(5)],
                     {"key": "gpu", "requires": ["met", "gpu"]}, {"key": "bad", "requires": ["met"],
                      "params": {"fail": True}, "max_attempts": 1}, name="scraped"))  # fmt: skip
    wait_for(lambda: run.tasks.filter(state="succeeded").count() == 5, 60, what="the five tasks")
    wait_for(lambda: run.tasks.get(key="bad").state == "failed", 30, what="the failing task")

    samples = scrape(server.url)
    for state in ("succeeded", "failed", "ready"):
        assert value(samples, "cp_tasks", state=state) == Task.objects.filter(state=state).count(), state
    assert value(samples, "cp_ready_tasks", executor="simulated", requires="gpu,met") == 1
    assigned = Attempt.objects.filter(run=run).count()
    assert value(samples, "cp_ready_to_assigned_seconds_count") == assigned == 6
    assert value(samples, "cp_attempt_duration_seconds_count", executor="simulated", outcome="succeeded") == 5
    assert value(samples, "cp_attempt_duration_seconds_count", executor="simulated", outcome="failed") == 1
    assert value(samples, "cp_attempt_duration_seconds_sum", executor="simulated", outcome="succeeded") >= 5 * 0.2
    claims = value(samples, "cp_http_requests_total", route="/api/v1/agents/claim", method="POST", status="200")
    assert claims >= 1
    online = Agent.objects.filter(status="online", enabled=True, draining=False).count()
    assert value(samples, "cp_agents", status="online") == online >= 1

    again = scrape(server.url)  # the scrape itself was counted (through the full stack)
    assert value(again, "cp_http_requests_total", route="/metrics", method="GET", status="200") >= 1


def test_a_scraper_needs_the_token_or_an_allowed_address(server_tmp):
    closed = Server(server_tmp, {"CP_METRICS_TOKEN": TOKEN, "CP_METRICS_ALLOW": "10.9.8.0/24"})
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            scrape(closed.url)
        assert refused.value.code == 403
        with pytest.raises(urllib.error.HTTPError):
            scrape(closed.url, token="wrong")
        assert any(name == "cp_http_requests_total" for name, _ in scrape(closed.url, token=TOKEN))
    finally:
        closed.stop()


def test_in_one_process_the_scrape_has_that_processs_counts_and_the_databases(client, submit):
    submit(doc({"key": "a"}, name="one-process"))
    answer = client.get("/metrics")  # the test client's address is 127.0.0.1: allowed by default
    assert answer.status_code == 200 and answer["Content-Type"].startswith("text/plain")
    text = answer.content.decode()
    assert 'cp_tasks{state="ready"}' in text and "cp_ready_to_assigned_seconds_bucket" in text
    assert client.get("/metrics", REMOTE_ADDR="192.0.2.7").status_code == 403


def test_the_grafana_dashboard_asks_only_for_metrics_the_server_exports(client):
    import json
    import re

    from django.conf import settings

    dashboard = json.loads((settings.BASE_DIR / "docs" / "grafana-dashboard.json").read_text())
    families = {f.name for f in text_string_to_metric_families(client.get("/metrics").content.decode())}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = {
                re.sub(r"_(total|bucket|count|sum)$", "", n) for n in re.findall(r"\b(cp_[a-z_]+)", target["expr"])
            }
            assert names and names <= families, (panel["title"], names - families)
