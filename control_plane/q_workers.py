"""django-q2 forks its workers from the cluster process. A psycopg pool the parent made comes along without
its background threads, and its idle connections' sockets are the parent's: a job in the worker then waits
for a connection no thread will open (PoolTimeout after CP_DB_POOL_TIMEOUT), or shares a socket with the
parent. So each worker forgets the inherited pools at birth, without closing them (closing would end the
parent's connections), and makes its own on first use."""

from __future__ import annotations


def forget_inherited_pools(**kwargs) -> None:
    from django.db import connections

    for alias in connections:
        wrapper = connections[alias]
        # Django keeps one pool per alias in a class attribute (postgresql backend only).
        pools = getattr(type(wrapper), "_connection_pools", None)
        if pools is not None:
            pools.pop(alias, None)
        wrapper.connection = None  # a connection object taken from the parent's pool is not ours either


def connect() -> None:
    from django_q.signals import post_spawn

    post_spawn.connect(forget_inherited_pools, dispatch_uid="cp-forget-inherited-pools")
