"""Every named statement (tasks_app/queries.py's, and those of the few other modules that run SQL of their
own) prepares on PostgreSQL. With server-side binding (settings: CP_DB_SERVER_SIDE_BINDING) a parameter has
one type in the whole statement, deduced from where it is used: one used as text in one place and as varchar
in another is refused ("inconsistent types deduced") on the statement's first call. PREPARE finds it here."""

from __future__ import annotations

import importlib
import re

import pytest
from django.db import connection

# The modules that run SQL of their own; queries.py holds the scheduler's.
MODULES = ("tasks_app.queries", "tasks_app.costs", "tasks_app.jobs", "tasks_app.webhooks", "tasks_app.dashboard.panels",
           "tasks_app.dashboard.waiting", "agents_app.hosts.jobs", "agents_app.registry", "control_plane.metrics",
           "control_plane.rate_limit", "control_plane.db_outage")  # fmt: skip

STATEMENT = re.compile(r"^\s*(SELECT|WITH|UPDATE|INSERT|DELETE)\b", re.IGNORECASE)
PLACEHOLDER = re.compile(r"%\((\w+)\)s|%s|%%")


def positional(sql: str) -> str:
    """psycopg's placeholders as PostgreSQL's: each name one $n, each %s its own, %% a %."""
    numbers: dict[str, int] = {}
    count = 0

    def number(match: re.Match) -> str:
        nonlocal count
        if match.group(0) == "%%":
            return "%"
        name = match.group(1)
        if name is None or name not in numbers:
            count += 1
            if name is not None:
                numbers[name] = count
            return f"${count}"
        return f"${numbers[name]}"

    return PLACEHOLDER.sub(number, sql)


def statements() -> list[tuple[str, str]]:
    out = []
    for module in MODULES:
        for name, value in vars(importlib.import_module(module)).items():
            # Private ones are templates of others (queries._END_ATTEMPT's {attempt_set}).
            if name.isupper() and not name.startswith("_") and isinstance(value, str) and STATEMENT.match(value):
                out.append((f"{module.rsplit('.', 1)[-1]}.{name}", value))
    return out


def test_the_scheduler_has_statements_to_check():
    assert len(statements()) > 30


@pytest.mark.parametrize(("name", "sql"), statements(), ids=[name for name, _ in statements()])
def test_a_named_statement_prepares(name, sql, db):
    with connection.cursor() as cur:
        cur.execute(f"PREPARE cp_check AS {positional(sql)}")
        cur.execute("DEALLOCATE cp_check")
