import time
import uuid

from django.core.management.base import BaseCommand, CommandError

from tasks_app.costs import money
from tasks_app.dashboard.reports import run_metrics, run_status
from tasks_app.errors import NotFound
from tasks_app.states import RunState


def bar(fraction: float, width: int = 30) -> str:
    filled = int(round(fraction * width))
    return "#" * filled + "-" * (width - filled)


def progress_line(status: dict) -> str:
    counts = status["counts"]
    total = sum(counts.values()) or 1
    done = counts["succeeded"]  # "done" is succeeded: a failed or skipped task is not done
    partial = sum(t["progress"] for t in status["tasks"] if t["state"] in ("assigned", "running"))
    fraction = min(1.0, (counts["succeeded"] + partial) / total)
    live = counts["assigned"] + counts["running"]
    return (
        f"{status['name']} [{bar(fraction)}] {fraction:5.1%}  {done}/{total} done"
        f"  running {live}  ready {counts['ready']}  blocked {counts['blocked']}"
        + (f"  awaiting approval {counts['awaiting_approval']}" if counts.get("awaiting_approval") else "")
        + f"  failed {counts['failed']}  state {status['state']}"
    )


def cost_line(status: dict) -> str | None:
    """What the run's AI attempts cost, against its budget, and their tokens; None for a run with neither."""
    usage, budget = status.get("usage") or {}, status.get("max_cost_usd")
    cost = status.get("cost_usd") or 0.0
    if not cost and budget is None:
        return None
    line = f"cost {money(cost)}" + (" (estimated)" if usage.get("cost_estimated") else "")
    if budget is not None:
        line += f" of {money(budget)} budget ({cost / budget:.0%})"
    if usage.get("input_tokens") or usage.get("output_tokens"):
        line += f"  tokens {usage['input_tokens']:,} in, {usage['output_tokens']:,} out"
        if usage.get("cache_read_tokens") or usage.get("cache_write_tokens"):
            line += f", cache {usage['cache_read_tokens']:,} read, {usage['cache_write_tokens']:,} written"
    return line


def summary_lines(run_id) -> list[str]:
    m = run_metrics(run_id)
    return [
        f"makespan          {m['makespan_s']:8.1f} s",
        f"sum of task times {m['task_time_s']:8.1f} s",
        f"speed-up          {m['speedup']:8.2f} x over one agent",
        *(["(each task counted by its final attempt: some were retried)"] if m["final_attempts_only"] else []),
    ]


class Command(BaseCommand):
    help = "Print a run's progress: counts by state and each task; --watch refreshes until it ends."

    def add_arguments(self, parser):
        parser.add_argument("run_id")
        parser.add_argument("--watch", action="store_true", help="print a progress line until the run ends")
        parser.add_argument("--interval", type=float, default=1.0)

    def handle(self, *args, run_id, watch, interval, **options):
        try:
            uuid.UUID(run_id)
            status = run_status(run_id)
        except (ValueError, NotFound):
            raise CommandError(f"no run with id {run_id!r}") from None
        if watch:
            while status["state"] in (RunState.RUNNING, RunState.PAUSED):
                spent = f"  cost {money(status['cost_usd'])}" if status.get("cost_usd") else ""
                self.stdout.write(progress_line(status) + spent)
                time.sleep(interval)
                status = run_status(run_id)
        self.stdout.write(progress_line(status))
        if (costs := cost_line(status)) is not None:
            self.stdout.write(costs)
        if status["state"] == RunState.PAUSED and status.get("pause_reason"):
            self.stdout.write(f"paused: {status['pause_reason']}")
        # A cost column when any task has cost something.
        priced = any(t.get("cost_usd") for t in status["tasks"])
        for t in status["tasks"]:
            agent = t["agent"] or "-"
            cost = f"  {money(t['cost_usd']) if t.get('cost_usd') else '-':>9}" if priced else ""
            line = f"  {t['key']:<24} {t['state']:<17} {t['progress']:6.0%}  attempt {t['attempt']}{cost}  {agent}"
            if t.get("waiting"):
                line += f"  ({t['waiting']})"
            if t.get("awaiting") == "input":
                line += "  (awaiting input: an agent asks a person)"
            elif t.get("awaiting") == "approval":
                line += "  (awaiting approval: manage.py approve|reject TASK_ID)"
            self.stdout.write(line)
        if status["state"] not in (RunState.RUNNING, RunState.PAUSED):
            for line in summary_lines(run_id):
                self.stdout.write(line)
