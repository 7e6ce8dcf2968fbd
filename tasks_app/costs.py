"""What AI attempts spent (PROTOCOL.md v1.1 `usage`), summed per task, run, agent, workflow and day for the
API, the pages and the CLI; and the price table the agents estimate costs by.

Each attempt holds its own cumulative usage (written by tasks_app.actions from progress and completion);
everything here is read-only and sums those rows.
"""

from __future__ import annotations

import threading
import time

from django.conf import settings
from django.db import connection

from . import queries as q
from .models import ModelPrice

TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")


def _usage(row) -> dict:
    """A usage object from a row of queries._USAGE_SUMS (cost, the five token counts, estimated)."""
    cost, *tokens, estimated = row
    return {**{k: int(v or 0) for k, v in zip(TOKENS, tokens, strict=True)}, "cost_usd": round(float(cost or 0), 6),
            "cost_estimated": bool(estimated)}  # fmt: skip


def by_task(run_id) -> dict:
    """{task id: {"usage": summed over its attempts, "model", "session_id" (the latest attempt's)}}; tasks
    without AI usage are absent."""
    with connection.cursor() as cur:
        cur.execute(q.USAGE_BY_TASK, {"run_id": run_id})
        rows = cur.fetchall()
    return {r[0]: {"usage": {"model": r[8] or "", **_usage(r[1:8])}, "session_id": r[9]} for r in rows}


def total(per_task: dict) -> dict:
    """The run's usage: the sum of by_task()'s."""
    out = {**dict.fromkeys(TOKENS, 0), "cost_usd": 0.0, "cost_estimated": False}
    for entry in per_task.values():
        u = entry["usage"]
        for k in TOKENS:
            out[k] += u[k]
        out["cost_usd"] += u["cost_usd"]
        out["cost_estimated"] = out["cost_estimated"] or u["cost_estimated"]
    out["cost_usd"] = round(out["cost_usd"], 6)
    return out


def by_run(run_ids) -> dict:
    """{run id: cost in dollars} for runs that cost something."""
    if not run_ids:
        return {}
    with connection.cursor() as cur:
        cur.execute(q.COST_BY_RUN, {"run_ids": list(run_ids)})
        return {run_id: float(cost) for run_id, cost in cur.fetchall()}


def by_agent() -> dict:
    """{agent id: {"total": dollars, "today": dollars (UTC day)}}."""
    with connection.cursor() as cur:
        cur.execute(q.COST_BY_AGENT)
        return {a: {"total": float(t or 0), "today": float(d or 0)} for a, t, d in cur.fetchall()}


def by_day(days: int = 14) -> list[tuple]:
    """[(date, dollars, attempts)] of the last `days` days (UTC) that cost something, oldest first."""
    with connection.cursor() as cur:
        cur.execute(q.COST_BY_DAY, {"days": days})
        return [(d, float(c), n) for d, c, n in cur.fetchall()]


def by_workflow(days: int = 14) -> list[tuple]:
    """[(workflow name, dollars)] over the last `days` days, dearest first (a run without a workflow: its name)."""
    with connection.cursor() as cur:
        cur.execute(q.COST_BY_WORKFLOW, {"days": days})
        return [(name, float(c)) for name, c in cur.fetchall()]


def money(value: float | None) -> str:
    """Dollars as people read them: $0.0042, $1.23, $1,234."""
    if not value:
        return "$0"
    if value < 0.01:
        return f"${value:.4f}"
    if value < 1000:
        return f"${value:.2f}"
    return f"${value:,.0f}"


# The price table rides on every AI assignment (`prices`, README "API"), so a claim reads it from this
# process's copy, refreshed at most every CP_PRICE_TABLE_TTL_S (30): an edit in the admin reaches new
# assignments within it.
_prices_lock = threading.Lock()
_prices: tuple[float, dict] = (0.0, {})


def price_table() -> dict:
    """{model prefix: [input, output, cache read, cache write] dollars per million tokens}."""
    global _prices
    loaded_at, table = _prices
    if time.monotonic() - loaded_at < settings.CP_PRICE_TABLE_TTL_S:
        return table
    rows = ModelPrice.objects.values_list(
        "model_prefix", "input_per_mtok", "output_per_mtok", "cache_read_per_mtok", "cache_write_per_mtok"
    )
    table = {prefix: [inp, out, cr, cw] for prefix, inp, out, cr, cw in rows}
    with _prices_lock:
        _prices = (time.monotonic(), table)
    return table


def forget_prices() -> None:
    """Drop this process's copy of the price table (after an edit here, and for tests)."""
    global _prices
    with _prices_lock:
        _prices = (0.0, {})
