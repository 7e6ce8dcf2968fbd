"""The audit trail's writer: Event rows gathered during one transaction and inserted in one round trip."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass
class EventLog:
    """Event rows gathered during a transaction and inserted in one round trip."""

    actor: str

    def __post_init__(self):
        self.rows: list[tuple] = []

    def add(self, kind, frm, to, *, run=None, task=None, attempt=None, agent=None, detail=None, actor=None):
        self.rows.append(
            (run, task, attempt, agent, kind, frm or "", to or "", actor or self.actor, json.dumps(detail or {}))
        )

    def insert_sql(self) -> tuple[str, list]:
        """One multi-row INSERT of the gathered events (empty SQL when there are none)."""
        if not self.rows:
            return "", []
        row = "(%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, now())"
        sql = (
            "INSERT INTO tasks_app_event (run_id, task_id, attempt_id, agent_id, kind, from_state, to_state,"
            " actor, detail, created_at) VALUES " + ", ".join([row] * len(self.rows))
        )
        params = [value for r in self.rows for value in r]
        self.rows = []
        return sql, params

    def write(self, cursor) -> None:
        sql, params = self.insert_sql()
        if sql:
            cursor.execute(sql, params)
