"""The audit trail's writer: Event rows gathered during one transaction and inserted in one round trip."""

from __future__ import annotations

import json
from dataclasses import dataclass

from .queries import INSERT_EVENTS


@dataclass
class EventLog:
    """Event rows gathered during a transaction and inserted in one round trip."""

    actor: str

    def __post_init__(self):
        self.rows: list[tuple] = []

    def add(self, kind, frm, to, *, run=None, task=None, attempt=None, agent=None, detail=None, actor=None):
        ids = [None if x is None else str(x) for x in (run, task, attempt, agent)]  # UUIDs or an agent's text
        self.rows.append((*ids, kind, frm or "", to or "", actor or self.actor, json.dumps(detail or {})))

    def insert_sql(self) -> tuple[str, list]:
        """One INSERT of the gathered events (empty SQL when there are none): a column an array, so the
        statement and its nine parameters are the same for one event as for the 10,000 of a big cancel (a
        row of parameters each went past PostgreSQL's 65,535 parameters with server-side binding, and
        built a new statement for every count)."""
        if not self.rows:
            return "", []
        params = [list(column) for column in zip(*self.rows, strict=True)]
        self.rows = []
        return INSERT_EVENTS, params

    def write(self, cursor) -> None:
        sql, params = self.insert_sql()
        if sql:
            cursor.execute(sql, params)
