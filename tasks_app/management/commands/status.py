import time
import uuid

from django.core.management.base import BaseCommand, CommandError

from tasks_app.actions import NotFound
from tasks_app.reports import run_metrics, run_status
from tasks_app.states import RunState


def bar(fraction: float, width: int = 30) -> str:
    filled = int(round(fraction * width))
    return "#" * filled + "-" * (width - filled)


def progress_line(status: dict) -> str:
    counts = status["counts"]
    total = sum(counts.values()) or 1
    done = counts["succeeded"] + counts["failed"] + counts["canceled"] + counts["skipped"]
    partial = sum(t["progress"] for t in status["tasks"] if t["state"] in ("assigned", "running"))
    fraction = min(1.0, (counts["succeeded"] + partial) / total)
    live = counts["assigned"] + counts["running"]
    return (
        f"{status['name']} [{bar(fraction)}] {fraction:5.1%}  {done}/{total} done"
        f"  running {live}  ready {counts['ready']}  blocked {counts['blocked']}"
        f"  failed {counts['failed']}  state {status['state']}"
    )


def summary_lines(run_id) -> list[str]:
    m = run_metrics(run_id)
    return [
        f"makespan          {m['makespan_s']:8.1f} s",
        f"sum of task times {m['task_time_s']:8.1f} s",
        f"speed-up          {m['speedup']:8.2f} x over one agent",
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
                self.stdout.write(progress_line(status))
                time.sleep(interval)
                status = run_status(run_id)
        self.stdout.write(progress_line(status))
        for t in status["tasks"]:
            agent = t["agent"] or "-"
            line = f"  {t['key']:<24} {t['state']:<10} {t['progress']:6.0%}  attempt {t['attempt']}  {agent}"
            if t.get("waiting"):
                line += f"  ({t['waiting']})"
            self.stdout.write(line)
        if status["state"] not in (RunState.RUNNING, RunState.PAUSED):
            for line in summary_lines(run_id):
                self.stdout.write(line)
