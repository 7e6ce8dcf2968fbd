"""State-change notifications: PostgreSQL NOTIFY inside the changing transaction, LISTEN once per process.

NOTIFY is delivered only when its transaction commits, so a notification never announces a change that was
rolled back, and every server process (and the dashboard) hears about changes made by any other process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

CHANNEL = "cp_events"
# PostgreSQL caps a payload at 8000 bytes; past this many ready tasks we ask every waiter to look instead.
MAX_READY_DESCRIPTORS = 60


@dataclass
class Changes:
    """What one transaction changed, announced with a single NOTIFY just before it commits."""

    runs: set = field(default_factory=set)
    # (executor, requires, delay_s) of each task that became ready: a waiter whose agent matches is woken.
    ready: list = field(default_factory=list)
    agents: bool = False
    hosts: bool = False  # host operations (agents_app.hosts.jobs) changed
    wake_all: bool = False

    def task_ready(self, executor: str, requires, delay_s: float = 0.0) -> None:
        self.ready.append((executor, list(requires or []), round(float(delay_s), 3)))

    def payload(self) -> str | None:
        if not (self.runs or self.ready or self.agents or self.hosts or self.wake_all):
            return None
        body: dict = {"runs": sorted(str(r) for r in self.runs)[:100]}
        if self.wake_all or len(self.ready) > MAX_READY_DESCRIPTORS:
            body["wake_all"] = True
            delays = [d for _, _, d in self.ready if d > 0]
            if delays:
                body["wake_all_after"] = min(delays)
        elif self.ready:
            body["ready"] = self.ready
        if self.agents:
            body["agents"] = True
        if self.hosts:
            body["hosts"] = True
        return json.dumps(body, separators=(",", ":"))

    def send(self, cursor) -> None:
        payload = self.payload()
        if payload is not None:
            cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, payload])


def parse(payload: str) -> dict:
    try:
        data = json.loads(payload)
    except ValueError:
        return {"wake_all": True}
    return data if isinstance(data, dict) else {"wake_all": True}
