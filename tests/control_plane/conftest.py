"""Tests of the control plane's processes against a PostgreSQL of their own (tests/pg_instance.py): they stop
and restart it, which the shared test database must never see."""

from __future__ import annotations

import itertools

import pytest

from tests.pg_instance import PgInstance

_names = itertools.count(1)


@pytest.fixture(scope="module")
def pg():
    """A throwaway PostgreSQL for the module's tests, started; deleted afterwards."""
    with PgInstance() as instance:
        yield instance


@pytest.fixture
def pg_db(pg):
    """(URL, psycopg conninfo) of a fresh migrated database on `pg`, dropped afterwards. A test that stopped
    `pg` must leave it running."""
    name = f"cp_test_{next(_names)}"
    url = pg.fresh_database(name)
    yield url, pg.conninfo(name)
    if not pg.running:
        pg.start()
    pg.drop_database(name)
