"""The audit trail's writer (tasks_app/audit.py): one statement of nine parameters however many events."""

import uuid

import psycopg
import pytest
from django.db import connection

from tasks_app.audit import EventLog
from tasks_app.models import Event


def gathered(n: int) -> EventLog:
    events = EventLog("test")
    for i in range(n):
        events.add("agent", "offline", "online", agent=None, detail={"i": i})
    return events


def test_one_event_and_ten_thousand_are_the_same_statement_with_nine_parameters():
    one_sql, one_params = gathered(1).insert_sql()
    many_sql, many_params = gathered(10_000).insert_sql()
    assert one_sql == many_sql and len(one_params) == len(many_params) == 9
    assert [len(column) for column in many_params] == [10_000] * 9
    assert gathered(0).insert_sql() == ("", [])


@pytest.mark.django_db
def test_the_events_are_written_in_their_order_with_their_ids_and_details():
    run_id, attempt_id = uuid.uuid4(), str(uuid.uuid4())  # a UUID, and an id as an agent's JSON has it
    events = EventLog("agent:a1")
    events.add("agent", "offline", "online", detail={"reason": "contact"})
    events.add("agent", "online", "offline", actor="system:sweeper")
    with connection.cursor() as cur:
        events.write(cur)
        rows = list(Event.objects.order_by("id").values("kind", "from_state", "to_state", "actor", "detail"))
    assert rows == [
        {"kind": "agent", "from_state": "offline", "to_state": "online", "actor": "agent:a1",
         "detail": {"reason": "contact"}},
        {"kind": "agent", "from_state": "online", "to_state": "offline", "actor": "system:sweeper", "detail": {}},
    ]  # fmt: skip
    ids = EventLog("x")
    ids.add("task", "ready", "assigned", run=run_id, attempt=attempt_id)
    sql, params = ids.insert_sql()
    assert params[0] == [str(run_id)] and params[2] == [attempt_id]


@pytest.mark.django_db
def test_ten_thousand_events_are_written_with_server_side_binding():
    # A row of parameters each was 90,000 parameters for 10,000 events: past PostgreSQL's 65,535 when the
    # parameters travel apart from the statement (CP_DB_SERVER_SIDE_BINDING, psycopg's own default).
    params = {k: v for k, v in connection.get_connection_params().items() if k != "cursor_factory"}
    with psycopg.connect(**params) as conn, conn.cursor() as cur:  # psycopg's Cursor binds on the server
        sql, values = gathered(10_000).insert_sql()
        cur.execute(sql, values)
        cur.execute("SELECT count(*), min(detail->>'i'), max((detail->>'i')::int) FROM tasks_app_event"
                    " WHERE actor = 'test'")  # fmt: skip
        assert cur.fetchone() == (10_000, "0", 9_999)
        conn.rollback()  # nothing of them is left for other tests
