"""Simulated agents and the measurements: ready->assigned latency of a parked long poll, throughput of
long-polling agents, and throughput of agents polling every two seconds (the seed's design).

The simulated agents speak PROTOCOL.md's agent endpoints over wire.Connection and run nothing: each
assignment is completed at once with outcome "succeeded".
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from cpu import CpuMeter, PostgresCpu
from wire import Connection

API = "/api/v1"
LONG_POLL_S = 25
now = time.perf_counter


def noop_run(name: str, n: int) -> dict:
    return {"name": name, "tasks": [{"key": f"t{i}", "executor": "shell", "command": "true"} for i in range(n)]}


def chain_run(name: str, n: int) -> dict:
    """n no-op tasks, each depending on the one before."""
    run = noop_run(name, n)
    for i, task in enumerate(run["tasks"][1:], start=1):
        task["deps"] = [f"t{i - 1}"]
    return run


class SimAgent:
    def __init__(self, host: str, port: int, name: str):
        self.name = name
        self.conn = Connection(host, port)
        self.claim_sent_at: float | None = None  # set while a claim is in flight

    async def register(self, enrollment: str) -> None:
        body = {"name": self.name, "labels": ["bench"], "executors": ["shell"], "capacity": 1, "version": "bench"}
        answer = await self.conn.json("POST", f"{API}/agents/register", body, token=enrollment, expect=201)
        self.conn.token = answer["token"]

    async def claim(self, wait_s: float) -> list:
        self.claim_sent_at = now()
        try:
            answer = await self.conn.json("POST", f"{API}/agents/claim", {"capacity": 1, "wait_s": wait_s},
                                          timeout=wait_s + 15)  # fmt: skip
        finally:
            self.claim_sent_at = None
        return answer["assignments"]

    async def complete(self, attempt_id: str, claim: bool = False) -> list:
        """Complete; with `claim`, claim the next task in the same request (README, "API": complete and
        claim), returning its assignments."""
        body = {"outcome": "succeeded", "exit_code": 0, **({"claim": {"capacity": 1}} if claim else {})}
        answer = await self.conn.json("POST", f"{API}/attempts/{attempt_id}/complete", body)
        return answer.get("assignments") or []

    def close(self) -> None:
        self.conn.close()


async def register_all(host: str, port: int, enrollment: str, prefix: str, n: int) -> list[SimAgent]:
    agents = [SimAgent(host, port, f"{prefix}-{i:03d}") for i in range(n)]
    gate = asyncio.Semaphore(10)

    async def one(agent):
        async with gate:
            await agent.register(enrollment)

    await asyncio.gather(*(one(a) for a in agents))
    return agents


async def stop_all(tasks: list[asyncio.Task], agents: list[SimAgent]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for a in agents:
        a.close()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def ms_summary(values: list[float]) -> dict:
    ms = [v * 1000 for v in values]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 2),
        "p90_ms": round(percentile(ms, 90), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2) if ms else None,
    }


# --- Figure 1: ready -> assigned for an agent parked in a long poll ----------------------------------------


async def latency(
    host: str, port: int, enrollment: str, api_token: str, tag: str,
    n_agents: int = 3, samples: int = 200, warmup: int = 10, settle_s: float = 0.04, time_limit_s: float = 40.0,
) -> dict:  # fmt: skip
    """Submit single-task runs one at a time while `n_agents` agents sit in a long poll; each sample is the
    time from just before the submit is sent to the arrival of the claim answer carrying that task. Before
    each submit every agent has had a claim in flight for `settle_s`, so the task goes to a parked poll."""
    agents = await register_all(host, port, enrollment, f"{tag}-lat", n_agents)
    answers: asyncio.Queue = asyncio.Queue()

    async def agent_loop(agent: SimAgent):
        while True:
            assignments = await agent.claim(LONG_POLL_S)
            arrived = now()
            for a in assignments:
                answers.put_nowait((arrived, a["task"]["run_id"]))
                await agent.complete(a["attempt_id"])

    loops = [asyncio.create_task(agent_loop(a)) for a in agents]
    api = Connection(host, port, api_token)
    end_to_end, submit_rtt, after_submit = [], [], []
    missed = 0
    deadline = now() + time_limit_s
    try:
        for i in range(warmup + samples):
            while now() < deadline:  # every agent parked for settle_s
                sent = [a.claim_sent_at for a in agents]
                if all(s is not None for s in sent) and now() - max(sent) >= settle_s:
                    break
                await asyncio.sleep(0.005)
            if now() >= deadline:
                break
            t0 = now()
            run = await api.json("POST", f"{API}/runs", noop_run(f"{tag}-lat-{i}", 1), expect=201)
            t1 = now()
            try:
                async with asyncio.timeout(5):
                    while True:
                        arrived, run_id = await answers.get()
                        if run_id == run["run_id"]:
                            break
            except TimeoutError:
                missed += 1  # a lost wake-up: no parked agent got the task within 5 s
                continue
            if i >= warmup:
                end_to_end.append(arrived - t0)
                submit_rtt.append(t1 - t0)
                after_submit.append(arrived - t1)
    finally:
        await stop_all(loops, agents)
        api.close()
    return {
        "agents": n_agents,
        "missed": missed,
        "ready_to_assigned": ms_summary(end_to_end),
        "submit_rtt": ms_summary(submit_rtt),
        "claim_after_submit_201": ms_summary(after_submit),
    }


# --- Figures 2 and 3: throughput --------------------------------------------------------------------------


@dataclass
class Tally:
    target: int
    first_claim: float | None = None
    arrivals: list = field(default_factory=list)  # when each assignment reached its agent
    last_done: float | None = None
    completed: int = 0
    claims: int = 0
    empty_claims: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def assigned(self, n: int) -> None:
        if self.first_claim is None:
            self.first_claim = now()
        self.arrivals.extend([now()] * n)

    def finished_one(self) -> None:
        self.completed += 1
        self.last_done = now()
        if self.completed >= self.target:
            self.done.set()


async def throughput(
    host: str, port: int, enrollment: str, api_token: str, tag: str, *, server_pid: int, postgres: PostgresCpu | None,
    n_agents: int = 50, n_tasks: int = 3000, poll_every_s: float | None = None, time_limit_s: float = 60.0,
    complete_and_claim: bool = True,
) -> dict:  # fmt: skip
    """One run of `n_tasks` independent no-op tasks through `n_agents` agents. With poll_every_s None the
    agents long-poll: each completion claims the next task in the same request (complete_and_claim, as the
    daemon does; off: a claim after each completion), and an agent given none long-polls again. Otherwise
    each claims with wait_s 0 every poll_every_s seconds (phases spread at random), completing what it got in
    between. tasks/s counts from the first assignment to the last completion."""
    agents = await register_all(host, port, enrollment, f"{tag}-tp", n_agents)
    tally = Tally(n_tasks)
    rng = random.Random(7)

    async def work(agent: SimAgent, assignments: list, claim: bool = False) -> list:
        """Complete the assignments; the next ones when the last completion claimed them (`claim`)."""
        tally.claims += 1
        if not assignments:
            tally.empty_claims += 1
            return []
        tally.assigned(len(assignments))
        following: list = []
        for i, a in enumerate(assignments):
            following = await agent.complete(a["attempt_id"], claim=claim and i == len(assignments) - 1)
            tally.finished_one()
        return following

    async def long_poller(agent: SimAgent):
        following: list = []
        while not tally.done.is_set():
            following = await work(agent, following or await agent.claim(LONG_POLL_S), claim=complete_and_claim)

    async def interval_poller(agent: SimAgent):
        next_at = now() + rng.uniform(0, poll_every_s)
        while not tally.done.is_set():
            await asyncio.sleep(max(0.0, next_at - now()))
            next_at += poll_every_s
            await work(agent, await agent.claim(0))

    loops = [asyncio.create_task((long_poller if poll_every_s is None else interval_poller)(a)) for a in agents]
    api = Connection(host, port, api_token)
    meter = CpuMeter(server_pid, postgres)
    try:
        await asyncio.sleep(1.0)  # agents parked (or polling) before the work arrives
        t0 = now()
        run = await api.json("POST", f"{API}/runs", noop_run(f"{tag}-tp", n_tasks), expect=201, timeout=60)
        acked = now()
        submit_s = acked - t0
        meter.start(now())  # the work has begun (agents were woken when the submit committed)
        try:
            async with asyncio.timeout(time_limit_s):
                await tally.done.wait()
        except TimeoutError:
            pass
        cpu = meter.stop(now())
    finally:
        await stop_all(loops, agents)
    status = await api.json("GET", f"{API}/runs/{run['run_id']}")
    if status.get("state") == "running":  # cut short by the time limit: leave nothing for later figures
        await api.json("POST", f"{API}/runs/{run['run_id']}/cancel")
    api.close()
    span = (tally.last_done - tally.first_claim) if tally.first_claim and tally.last_done else None
    # CPU milliseconds each task cost the server and PostgreSQL: less swayed than tasks/s by other programs
    # competing for the cores, and cores x 1000 / total bounds what this machine could do at best. (It still
    # rises under contention, and with the backlog while the claim query's cost grows with it.)
    per_task = {
        k: round(cpu[k] / 100 * meter.wall * 1000 / max(tally.completed, 1), 2)
        for k in ("server", "postgres")
        if k in cpu
    }
    if len(per_task) == 2:
        per_task["total"] = round(per_task["server"] + per_task["postgres"], 2)
        per_task["ceiling_tasks_per_s"] = round(cpu["cores"] * 1000 / per_task["total"], 1)
    return {
        "agents": n_agents,
        "tasks": n_tasks,
        "mode": (
            f"poll wait_s 0 every {poll_every_s:g} s"
            if poll_every_s is not None
            else "long poll (wait_s 25), complete and claim"
            if complete_and_claim
            else "long poll (wait_s 25), a claim after each completion"
        ),  # fmt: skip
        "completed": tally.completed,
        "finished": tally.completed >= n_tasks,
        "seconds": round(span, 3) if span else None,
        "tasks_per_s": round(tally.completed / span, 1) if span else 0.0,
        "submit_s": round(submit_s, 3),
        # From the submit's answer (every task committed) to each assignment reaching its agent.
        "enqueue_to_start": ms_summary([t - acked for t in tally.arrivals]),
        "claims": tally.claims,
        "empty_claims": tally.empty_claims,
        "run_state": status.get("state"),
        "run_counts": status.get("counts"),
        "cpu_pct_of_one_core": cpu,
        "cpu_ms_per_task": per_task,
    }
