"""The long work first: a pytest plugin (tests/conftest.py loads it) that orders and schedules the suite.

With xdist a layer ends when its slowest worker does: a module of slow tests that happens to be collected last
keeps one worker busy while the others sit idle. So, from a recorded run (tests/durations.json: node id ->
seconds, setup and teardown included, for the tests that took RECORD_S or more):
- a test that took OWN_UNIT_S or more is a unit of work of its own, and goes first, longest first;
- every other test goes with its module (whose module-scoped fixtures, a server, a PostgreSQL, a browser, it
  then shares), the heaviest module first; within a module the collection order stands.
`./run test` runs each layer with `--dist loadscope --no-loadscope-reorder`: xdist then hands those units
out in this order, each to the next worker that runs short of work (longest-processing-time-first).

`pytest --store-durations` rewrites tests/durations.json from the run it ends (`./run test --store-durations`
for every layer). A new or renamed test counts as a quick one until then; one gone from the suite is ignored.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

DURATIONS = Path(__file__).with_name("durations.json")
RECORD_S = 1.0  # tests quicker than this are not recorded: they count as UNRECORDED_S each
UNRECORDED_S = 0.2
OWN_UNIT_S = 5.0


def pytest_addoption(parser):
    parser.addoption("--store-durations", action="store_true",
                     help=f"record the tests that take {RECORD_S:g} s or more into tests/{DURATIONS.name}")  # fmt: skip


def recorded() -> dict[str, float]:
    try:
        durations = json.loads(DURATIONS.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in durations.items()} if isinstance(durations, dict) else {}


def unit_of(nodeid: str, durations: dict[str, float]) -> str:
    """The unit of work a test belongs to: itself when it is long, else its module."""
    return nodeid if durations.get(nodeid, 0.0) >= OWN_UNIT_S else nodeid.split("::", 1)[0]


def longest_first(nodeids: list[str], durations: dict[str, float]) -> list[int]:
    """The run order as indexes into `nodeids`: the units of work, the heaviest first (ties in collection
    order), each unit's tests in collection order."""
    units: dict[str, list[int]] = {}
    for i, nodeid in enumerate(nodeids):
        units.setdefault(unit_of(nodeid, durations), []).append(i)
    weight = {unit: sum(durations.get(nodeids[i], UNRECORDED_S) for i in members) for unit, members in units.items()}
    ordered = sorted(units, key=lambda unit: -weight[unit])  # stable: equal weights keep collection order
    return [i for unit in ordered for i in units[unit]]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    durations = recorded()
    if durations:
        order = longest_first([item.nodeid for item in items], durations)
        items[:] = [items[i] for i in order]


@pytest.hookimpl(optionalhook=True)  # xdist's hook: without xdist it is never called
def pytest_xdist_make_scheduler(config, log):
    """xdist's loadscope, its scope being unit_of's: a long test alone, any other with its module."""
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    durations = recorded()

    class LongestFirst(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid, durations)

    return LongestFirst(config, log)


class _Recorder:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report):
        self.seconds[report.nodeid] += report.duration

    def pytest_sessionfinish(self, session):
        # Tests this run did not reach keep what was recorded for them: a run of one layer updates its own.
        kept = {n: s for n, s in recorded().items() if n not in self.seconds}
        kept.update({n: round(s, 1) for n, s in self.seconds.items() if s >= RECORD_S})
        DURATIONS.write_text(json.dumps(dict(sorted(kept.items())), indent=1) + "\n", encoding="utf-8")


def pytest_configure(config):
    # Only the process that sees every report records: the xdist controller, or pytest without xdist.
    if config.getoption("store_durations") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_Recorder(), "cp-durations-recorder")
