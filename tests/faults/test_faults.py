"""The fault suite's short form (bench/faults.py --short, issue 8): each scenario small, on the tests' fast
timings, with real server processes, real agent daemons running shell tasks that record each execution, and
a throwaway PostgreSQL cluster of its own (never the shared one: one scenario restarts it). Every run must
end succeeded with no task lost, none succeeded twice, none executed twice. `./run bench faults` is the full
form, with the production timings and the re-offer figures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import faults


@pytest.fixture(scope="module")
def suite(request):
    """One cluster and template database for the module's scenarios. Their files (server and agent logs,
    marks, state files) are removed afterwards unless a test failed: then their folder is printed."""
    failed_before = request.session.testsfailed
    suite = faults.Suite(faults.short_mode())
    yield suite
    keep = request.session.testsfailed > failed_before
    suite.close(remove_files=not keep)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if keep and reporter:
        reporter.write_line(f"the fault scenarios' files are kept in {suite.folder}")


def assert_nothing_lost_nor_done_twice(figures: dict) -> None:
    faults.print_figures(figures)  # shown with the failure
    assert figures["run_state"] == "succeeded", figures
    assert figures["lost_tasks"] == 0, figures
    assert figures["tasks_succeeded_twice"] == 0, figures
    assert figures["tasks_executed_twice"] == 0, figures["executed_twice"]


def test_agents_sigkilled_at_random_mid_task_lose_nothing_and_run_nothing_twice(suite):
    figures = faults.agents_killed(suite)
    assert_nothing_lost_nor_done_twice(figures)
    assert len(figures["faults"]) == suite.mode.kills


def test_server_sigkilled_and_restarted_mid_run_loses_nothing(suite):
    assert_nothing_lost_nor_done_twice(faults.server_killed(suite))


def test_one_of_two_servers_sigkilled_loses_nothing_agents_fail_over(suite):
    figures = faults.two_servers(suite)
    assert_nothing_lost_nor_done_twice(figures)
    assert suite.several_servers, "the daemon takes one --server URL (issue 8, item 8)"


def test_postgres_restarted_mid_run_loses_nothing(suite):
    assert_nothing_lost_nor_done_twice(faults.postgres_restart(suite))
