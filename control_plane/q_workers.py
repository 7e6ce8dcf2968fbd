"""The django-q2 cluster's processes and their database connections.

`manage.py qcluster` forks a sentinel, and the sentinel forks the pusher (polls the queue), the monitor
(saves results) and the workers (run jobs); the sentinel itself runs the scheduler every 30 s. A psycopg pool
cannot cross a fork: the child gets the parent's idle connections, the very same sockets, without the pool's
threads. That is how the cluster used to stop: the sentinel opened a pool as it made its broker, the pusher
and the monitor inherited its sockets, and when one process closed one (the pool's max_idle or max_lifetime,
a broken connection given back) the others' sessions ended under them ("server closed the connection
unexpectedly"); the pusher then slept 10 s and died, to be reborn from the sentinel with the same pool.

So the cluster has no pool (settings.RUNS_Q_CLUSTER), and here:

- every forked process forgets the connections it inherited, without closing them (closing would end the
  parent's sessions; psycopg never closes a connection another process made);
- a worker closes its connections after each job, and django-q2 closes them before each job, result save and
  scheduler pass: with CONN_MAX_AGE 0 each of those starts on a connection of its own, made then, so none
  outlives a PostgreSQL restart stale;
- the broker keeps the pusher polling through an outage: a failed poll is logged once per outage and the next
  poll tries again on a new connection (the stock pusher logged a traceback, slept 10 s and died, and
  SIGTERM waited for that sleep); it keeps one connection while polls succeed, up to
  CP_DB_POOL_MAX_LIFETIME_S, instead of connecting twice per poll; and the monitor's acknowledgement of a
  job survives a short outage instead of killing the monitor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

from django import db
from django.conf import settings
from django_q.brokers.orm import ORM
from django_q.conf import Conf

from control_plane.db_outage import OutageLog, describe, is_unavailable

log = logging.getLogger(__name__)

ACK_PATIENCE_S = 10.0  # how long the monitor retries an acknowledgement through an outage


def forget_inherited_connections() -> None:
    """In a forked child: drop the parent's connections (and pools, were there any) without closing them."""
    for wrapper in db.connections.all(initialized_only=True):
        # Django keeps one pool per alias in a class attribute (postgresql backend only).
        pools = getattr(type(wrapper), "_connection_pools", None)
        if pools is not None:
            pools.pop(wrapper.alias, None)
        wrapper.connection = None


def close_connections_after_job(**kwargs) -> None:
    """An idle worker holds no connection (a PostgreSQL restart between two jobs then costs nothing)."""
    db.connections.close_all()


def connect() -> None:
    from django_q.signals import post_execute_in_worker

    os.register_at_fork(after_in_child=forget_inherited_connections)
    post_execute_in_worker.connect(close_connections_after_job, dispatch_uid="cp-close-after-job")


def _drop_connection() -> None:
    with contextlib.suppress(db.Error):
        db.connections[Conf.ORM].close()


class OutageTolerantBroker(ORM):
    """django-q2's ORM broker (Q_CLUSTER["broker_class"]), made to outlive database outages."""

    def __init__(self, list_key: str | None = None):
        super().__init__(list_key)
        self.outage = OutageLog("q cluster pusher", "polling on")

    @staticmethod
    def get_connection(list_key: str | None = None):
        # The stock broker calls close_old_connections() here, before every query: with CONN_MAX_AGE 0 that
        # is a new connection per query. The pusher's connection is looked after in dequeue(); the monitor
        # acknowledges right after saving the result, which began with close_old_connections().
        from django_q.models import OrmQ

        return OrmQ.objects.using(Conf.ORM)

    def dequeue(self):
        connection = db.connections[Conf.ORM]
        # CONN_MAX_AGE is 0 in the cluster, so Django's close_at is the moment the connection was made.
        if connection.connection is not None and (
            connection.errors_occurred or time.monotonic() - connection.close_at > settings.CP_DB_POOL_MAX_LIFETIME_S
        ):
            _drop_connection()
        try:
            tasks = super().dequeue()
        except db.Error as exc:
            if not is_unavailable(exc):
                raise
            self.outage.failed(exc)
            _drop_connection()
            time.sleep(Conf.POLL)  # the pusher checks its stop event after each poll: SIGTERM stays prompt
            return None
        self.outage.recovered()
        return tasks

    def acknowledge(self, task_id):
        deadline = time.monotonic() + ACK_PATIENCE_S
        while True:
            try:
                return super().acknowledge(task_id)
            except db.Error as exc:
                if not is_unavailable(exc):
                    raise
                _drop_connection()
                if time.monotonic() > deadline:
                    why = describe(exc)
                    log.warning("job %s not acknowledged (%s): it runs again after Q_CLUSTER's retry", task_id, why)
                    return None
                time.sleep(0.5)
