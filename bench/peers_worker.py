"""The peers' side of bench/peers.py, run by the peers' own virtualenv (.data/peers-venv), never by the
project's: procrastinate and pgqueuer are not the project's dependencies.

  peers_worker.py setup SYSTEM CONNINFO_JSON
      installs SYSTEM's schema (in a process of its own: its backend's counters reach pg_stat_database when it
      ends, before the measurement).
  peers_worker.py work SYSTEM CONNINFO_JSON N CONCURRENCY
      starts one worker with CONCURRENCY slots, prints READY once it is parked
      (waiting for jobs), DONE <t> when the N-th job's completion is written to the database; then, once a
      line comes on its standard input (the bench has read the CPU of its PostgreSQL backends, which must
      not have ended yet), stops the worker and prints one JSON line: the monotonic time each job started,
      the first start and the last completion.
  peers_worker.py enqueue SYSTEM CONNINFO_JSON N
      enqueues N no-op jobs with the library's batch call, in one transaction; prints JSON {sent, acked}.

Times are time.perf_counter() (CLOCK_MONOTONIC on Linux: one clock for every process of the machine).
SYSTEM is procrastinate or pgqueuer; CONNINFO_JSON holds libpq parameters (host, port, user, dbname).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

now = time.perf_counter
PGQUEUER_BATCH = 10  # pgqueuer's default batch_size; 50 slots = max_concurrent_tasks (>= 2 x batch)


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def until_told() -> None:
    """Until the bench writes a line (or closes our standard input), 60 s at most."""
    try:
        async with asyncio.timeout(60):
            await asyncio.to_thread(sys.stdin.readline)
    except TimeoutError:
        pass


class Tally:
    def __init__(self, n: int):
        self.n, self.starts, self.done_count, self.last_done = n, [], 0, None
        self.done = asyncio.Event()

    def started(self) -> None:
        self.starts.append(now())

    def finished(self, k: int = 1) -> None:
        self.done_count += k
        if self.done_count >= self.n and not self.done.is_set():
            self.last_done = now()
            self.done.set()
            emit(f"DONE {self.last_done}")

    def result(self, **extra) -> dict:
        return {
            "starts": self.starts,
            "first_start": min(self.starts) if self.starts else None,
            "last_done": self.last_done,
            "completed": self.done_count,
            **extra,
        }


# --- procrastinate ------------------------------------------------------------------------------------------


def procrastinate_app(conninfo: dict, tally: Tally | None):
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(kwargs=conninfo))

    @app.task(name="noop")
    async def noop(i: int) -> None:
        if tally is not None:
            tally.started()

    return app, noop


async def procrastinate_work(conninfo: dict, n: int, concurrency: int) -> dict:
    tally = Tally(n)
    app, _ = procrastinate_app(conninfo, tally)
    async with app.open_async():
        # A job is done when the worker has written its end (finish_job), as an agent's is when its complete
        # call returned: count there, not when the task function returns.
        manager = app.job_manager
        finish_job = manager.finish_job

        async def counted_finish_job(*args, **kwargs):
            await finish_job(*args, **kwargs)
            tally.finished()

        manager.finish_job = counted_finish_job
        worker = asyncio.create_task(app.run_worker_async(concurrency=concurrency, wait=True))
        await asyncio.sleep(1.0)  # parked, listening, before the work arrives
        emit("READY")
        await tally.done.wait()
        await until_told()
        worker.cancel()  # procrastinate's graceful stop
        try:
            async with asyncio.timeout(10):
                await asyncio.gather(worker, return_exceptions=True)
        except TimeoutError:
            pass
    return tally.result(settings={"concurrency": concurrency, "listen_notify": True, "pool": "psycopg_pool default"})


async def procrastinate_enqueue(conninfo: dict, n: int) -> dict:
    app, noop = procrastinate_app(conninfo, None)
    async with app.open_async():
        sent = now()
        await noop.batch_defer_async(*({"i": i} for i in range(n)))
        acked = now()
    return {"sent": sent, "acked": acked}


# --- pgqueuer -------------------------------------------------------------------------------------------------


async def asyncpg_connect(conninfo: dict):
    import asyncpg

    return await asyncpg.connect(
        host=conninfo.get("host"),
        port=int(conninfo.get("port") or 5432),
        user=conninfo.get("user"),
        password=conninfo.get("password"),
        database=conninfo["dbname"],
    )


async def pgqueuer_work(conninfo: dict, n: int, concurrency: int) -> dict:
    from pgqueuer import AsyncpgDriver, Queries, QueueManager

    tally = Tally(n)
    conn = await asyncpg_connect(conninfo)
    queries = Queries(AsyncpgDriver(conn))
    qm = QueueManager(queries)

    @qm.entrypoint("noop")
    async def noop(job) -> None:
        tally.started()

    # A job is done when its final status is written (pgqueuer buffers those and writes them in batches).
    log_jobs = queries.log_jobs

    async def counted_log_jobs(job_status):
        await log_jobs(job_status)
        tally.finished(len(job_status))

    queries.log_jobs = counted_log_jobs
    runner = asyncio.create_task(qm.run(batch_size=PGQUEUER_BATCH, max_concurrent_tasks=concurrency))
    await asyncio.sleep(1.0)
    emit("READY")
    await tally.done.wait()
    await until_told()
    qm.shutdown.set()
    try:
        async with asyncio.timeout(10):
            await asyncio.gather(runner, return_exceptions=True)
    except TimeoutError:
        runner.cancel()
    await conn.close()
    return tally.result(
        settings={
            "batch_size": PGQUEUER_BATCH,
            "max_concurrent_tasks": concurrency,
            "driver": "asyncpg, one connection",
        }
    )


async def pgqueuer_enqueue(conninfo: dict, n: int) -> dict:
    from pgqueuer import AsyncpgDriver, Queries

    conn = await asyncpg_connect(conninfo)
    queries = Queries(AsyncpgDriver(conn))
    sent = now()
    await queries.enqueue(["noop"] * n, [str(i).encode() for i in range(n)], [0] * n)
    acked = now()
    await conn.close()
    return {"sent": sent, "acked": acked}


async def procrastinate_setup(conninfo: dict) -> dict:
    app, _ = procrastinate_app(conninfo, None)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
    return {}


async def pgqueuer_setup(conninfo: dict) -> dict:
    from pgqueuer import AsyncpgDriver, Queries

    conn = await asyncpg_connect(conninfo)
    await Queries(AsyncpgDriver(conn)).install()
    await conn.close()
    return {}


SETUP = {"procrastinate": procrastinate_setup, "pgqueuer": pgqueuer_setup}
WORK = {"procrastinate": procrastinate_work, "pgqueuer": pgqueuer_work}
ENQUEUE = {"procrastinate": procrastinate_enqueue, "pgqueuer": pgqueuer_enqueue}


def main(argv: list[str]) -> int:
    action, system, conninfo = argv[0], argv[1], json.loads(argv[2])
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        if action == "setup":
            out = runner.run(SETUP[system](conninfo))
        elif action == "work":
            out = runner.run(WORK[system](conninfo, int(argv[3]), int(argv[4])))
        else:
            out = runner.run(ENQUEUE[system](conninfo, int(argv[3])))
    emit("RESULT " + json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
