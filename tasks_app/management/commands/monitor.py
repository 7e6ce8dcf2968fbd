"""The seed's monitor_dashboard.py in the terminal: a header, the task summary, the agents, active tasks,
recently completed tasks and the next tasks in the queue, refreshed live with rich until the run ends (with a
run id) or until Ctrl-C (without). Every number comes from tasks_app.dashboard.panels, as on the web dashboard.

Text that agents or submitters wrote (names, titles, messages, labels) goes into rich Text objects, never into
markup strings, so `[bold red]` in a task title is shown as typed."""

from __future__ import annotations

import io
import time
import uuid
from dataclasses import dataclass, field

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.measure import Measurement
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tasks_app.costs import money
from tasks_app.dashboard import panels
from tasks_app.dashboard.reports import run_metrics
from tasks_app.states import AttemptState, RunState, TaskState

RUNS_SHOWN = 10  # without a run id: the newest runs
COMPLETED_SHOWN = 8
QUEUE_SHOWN = 10
BAR_WIDTH = 20
# Cost columns (issue 10) show when something cost money and the table has room for them at its natural
# width: on a narrower console they are the first to go (the header still says what the run cost).

STATE_STYLES = {
    TaskState.BLOCKED: "dim",
    TaskState.READY: "cyan",
    TaskState.ASSIGNED: "yellow",
    TaskState.RUNNING: "bold yellow",
    TaskState.SUCCEEDED: "green",
    TaskState.FAILED: "bold red",
    TaskState.CANCELED: "magenta",
    TaskState.SKIPPED: "dim magenta",
    RunState.PAUSED: "blue",
    AttemptState.LOST: "red",
    # Agent words
    "busy": "bold yellow",
    "idle": "green",
    "draining": "blue",
    "offline": "red",
    "disabled": "dim",
}


# --- Formatting -------------------------------------------------------------------------------------------


def bar(fraction: float | None, width: int = BAR_WIDTH, style: str = "green") -> Text:
    """A text progress bar with its percentage; plain characters, so it reads without colours too."""
    fraction = min(1.0, max(0.0, fraction or 0.0))
    filled = int(round(fraction * width))
    out = Text()
    out.append("█" * filled, style=style)
    out.append("░" * (width - filled), style="dim")
    out.append(f" {fraction:4.0%}")
    return out


def state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, ""))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def eta_text(eta) -> str:
    if eta is None:
        return "-"
    left = (eta - timezone.now()).total_seconds()
    when = f"{timezone.localtime(eta):%H:%M:%S}"
    return f"in {duration(left)} ({when})" if left >= 1 else f"now ({when})"


def plain(value) -> Text:
    """Untrusted text as a Text object: shown literally, never parsed as markup."""
    return Text("" if value is None else str(value))


def counts_line(counts: dict) -> Text:
    out = Text()
    for state in TaskState.ALL:
        n = counts.get(state, 0)
        if n:
            if out:
                out.append(" · ", style="dim")
            out.append(f"{state} {n}", style=STATE_STYLES.get(state, ""))
    return out or Text("no tasks", style="dim")


def section(title: str, columns: list[tuple[str, dict]]) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    for name, kwargs in columns:
        table.add_column(name, **kwargs)
    return table


def or_empty(table: Table, empty: str):
    """The table, or for no rows its title and a dim line saying so."""
    if table.row_count:
        return table
    return Group(Text(str(table.title), style="bold"), Text(f" {empty}", style="dim"), Text(""))


# --- Data -------------------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """One refresh's data, all from dashboard.panels (each query in its own autocommit: no transaction held)."""

    run_id: str | None
    runs: list[dict]
    fleet: dict
    agents: list[dict]
    active: list[dict]
    completed: list[dict]
    queue: list[dict]
    taken_at: object = field(default_factory=timezone.now)

    @classmethod
    def take(cls, run_id: str | None) -> Snapshot:
        runs = panels.with_costs(panels.run_summaries([run_id] if run_id else None, limit=1 if run_id else RUNS_SHOWN))
        return cls(
            run_id=run_id,
            runs=runs,
            fleet=panels.fleet_summary(),
            agents=panels.agents_table(),
            active=panels.active_attempts(run_id),
            completed=panels.recently_completed(run_id, limit=COMPLETED_SHOWN),
            queue=panels.queue(run_id, limit=QUEUE_SHOWN),
        )

    @property
    def run(self) -> dict | None:
        return self.runs[0] if self.run_id and self.runs else None

    @property
    def finished(self) -> bool:
        return self.run is not None and self.run["state"] in RunState.TERMINAL


# --- Sections ---------------------------------------------------------------------------------------------


def fleet_line(fleet: dict) -> Text:
    out = Text("agents ", style="bold")
    out.append(f"{fleet['online']} online", style="green")
    out.append(f" ({fleet['busy']} busy, {fleet['idle']} idle)")
    for key, style in (("offline", "red"), ("draining", "blue"), ("disabled", "dim")):
        if fleet[key]:
            out.append(f" · {fleet[key]} {key}", style=style)
    return out


def cost_text(run: dict) -> Text | None:
    """What the run cost so far, against its budget when it has one; None for a run with neither."""
    cost, budget = run.get("cost_usd") or 0.0, run.get("max_cost_usd")
    if not cost and budget is None:
        return None
    out = Text("cost ", style="bold")
    out.append(money(cost))
    if budget is not None:
        out.append(f" of {money(budget)} budget ")
        out.append(f"({cost / budget:.0%})", style="bold red" if cost >= budget else "")
    return out


def cost_cell(dollars: float | None) -> Text:
    return Text(money(dollars), style="") if dollars else Text("-", style="dim")


def with_cost_column(build, rows: list[dict], width: int):
    """`build(priced)`'s table with a cost column when any row cost something and the table still fits
    `width` columns without squeezing the others; else without one."""
    if any(r.get("cost_usd") for r in rows):
        table = build(True)
        measure = Console(width=10_000, file=io.StringIO())  # its natural width, not what fits
        if Measurement.get(measure, measure.options, table).maximum <= width:
            return table
    return build(False)


def header(snap: Snapshot) -> Panel:
    lines: list = []
    run = snap.run
    if run is not None:
        top = Text()
        top.append(run["name"], style="bold")
        top.append("  ")
        top.append_text(state_text(run["state"]))
        top.append("  ")
        top.append_text(bar(run["fraction"], width=30))
        done = run["counts"][TaskState.SUCCEEDED]  # "done" is succeeded, as on the dashboard
        top.append(f"  {done}/{run['total']} done")
        lines.append(top)
        lines.append(counts_line(run["counts"]))
        if (spent := cost_text(run)) is not None:
            lines.append(spent)
        if run["budget_paused"]:
            lines.append(Text(f"paused: {run['pause_reason']}", style="bold blue"))
        tail = Text(f"ETA {eta_text(run['eta'])}" if run["state"] in RunState.ACTIVE else "finished ")
        if run["finished_at"]:
            tail.append(f"{timezone.localtime(run['finished_at']):%Y-%m-%d %H:%M:%S}")
        tail.append(f"   run {run['id']}", style="dim")
        lines.append(tail)
        title = "Run monitor"
    else:
        active = [r for r in snap.runs if r["state"] in RunState.ACTIVE]
        counts: dict = {}
        for r in active:
            for state, n in r["counts"].items():
                counts[state] = counts.get(state, 0) + n
        top = Text(f"{len(active)} active run(s)", style="bold")
        top.append(f" of the newest {len(snap.runs)}")
        lines.append(top)
        lines.append(counts_line(counts) if active else Text("nothing running", style="dim"))
        title = "Control plane monitor"
    lines.append(fleet_line(snap.fleet))
    stamp = f"{timezone.localtime(snap.taken_at):%H:%M:%S}"
    return Panel(Group(*lines), title=f"[bold]{title}[/]", subtitle=stamp, box=box.ROUNDED, expand=True)


def task_summary(snap: Snapshot, width: int = 160) -> Table | Group:
    return with_cost_column(lambda priced: _task_summary(snap, priced), snap.runs, width)


def _task_summary(snap: Snapshot, priced: bool) -> Table | Group:
    columns = [
            ("Run", {"overflow": "ellipsis", "max_width": 32, "no_wrap": True}),
            ("State", {}),
            ("Progress", {"no_wrap": True}),
            ("Done", {"justify": "right"}),
            ("Running", {"justify": "right"}),
            ("Ready", {"justify": "right"}),
            ("Blocked", {"justify": "right"}),
            ("Failed", {"justify": "right"}),
            ("ETA", {"no_wrap": True}),
    ]  # fmt: skip
    if priced:
        columns.append(("Cost", {"justify": "right", "no_wrap": True}))
    table = section("Task summary", columns)
    for r in snap.runs:
        c = r["counts"]
        done = c[TaskState.SUCCEEDED]
        cells = [
            plain(r["name"]),
            state_text(r["state"]),
            bar(r["fraction"]),
            f"{done}/{r['total']}",
            str(c[TaskState.ASSIGNED] + c[TaskState.RUNNING]),
            str(c[TaskState.READY]),
            str(c[TaskState.BLOCKED]),
            str(c[TaskState.FAILED]),
            eta_text(r["eta"]),
        ]
        if priced:
            cells.append(cost_cell(r["cost_usd"]))
        table.add_row(*cells)
    return or_empty(table, "no runs")


def agents_section(snap: Snapshot) -> Table | Group:
    table = section(
        "Agents",
        [
            ("Agent", {"no_wrap": True}),
            ("Status", {}),
            ("Labels", {"overflow": "ellipsis", "max_width": 24}),
            ("Task", {"overflow": "ellipsis", "max_width": 32}),
            ("Progress", {"no_wrap": True}),
            ("Heartbeat", {"justify": "right", "no_wrap": True}),
            ("Version", {"overflow": "ellipsis", "max_width": 16}),
        ],
    )
    for a in snap.agents:
        attempts = a["attempts"]
        task = Text(", ".join(x["task__key"] for x in attempts)) if attempts else Text("-", style="dim")
        progress = bar(sum(x["progress"] for x in attempts) / len(attempts)) if attempts else Text("")
        age = a["heartbeat_age_s"]
        table.add_row(
            plain(a["name"]),
            state_text(a["display_status"]),
            plain(", ".join(a["labels"]) or "-"),
            task,
            progress,
            heartbeat(age),
            plain(a["version"] or "-"),
        )
    return or_empty(table, "no agents")


def key_title(key: str, title: str) -> Text:
    out = Text()
    out.append(key, style="bold")
    if title and title != key:
        out.append(" — ", style="dim")
        out.append(title)
    return out


def heartbeat(age: float | None) -> Text:
    if age is None:
        return Text("never", style="dim")
    # Silent past the offline threshold: the sweep will mark it offline (or would, if one ran).
    return Text(f"{duration(age)} ago", style="red" if age > settings.CP_OFFLINE_AFTER_S else "")


def _task_cell(row: dict) -> Text:
    return key_title(row["task__key"], row["task__title"])


def active_section(snap: Snapshot, width: int = 160) -> Table | Group:
    return with_cost_column(lambda priced: _active_section(snap, priced), snap.active, width)


def _active_section(snap: Snapshot, priced: bool) -> Table | Group:
    columns = [
        ("Agent", {"no_wrap": True}),
        ("Task", {"overflow": "ellipsis", "max_width": 40, "no_wrap": True}),
        ("Progress", {"no_wrap": True}),
        ("Message", {"overflow": "ellipsis", "max_width": 50, "no_wrap": True}),
        ("Elapsed", {"justify": "right", "no_wrap": True}),
    ]
    if priced:
        columns.append(("Cost", {"justify": "right", "no_wrap": True}))
    if not snap.run_id:
        columns.insert(0, ("Run", {"overflow": "ellipsis", "max_width": 20, "no_wrap": True}))
    table = section("Active tasks", columns)
    for a in snap.active:
        cells = [
            plain(a["agent__name"] or "-"),
            _task_cell(a),
            bar(a["progress"], style="yellow"),
            plain(a["message"]),
            duration(a["elapsed_s"]),
        ]
        if priced:
            cells.append(cost_cell(a["cost_usd"]))
        if not snap.run_id:
            cells.insert(0, plain(a["run__name"]))
        table.add_row(*cells)
    return or_empty(table, "nothing running")


def completed_section(snap: Snapshot, width: int = 160) -> Table | Group:
    return with_cost_column(lambda priced: _completed_section(snap, priced), snap.completed, width)


def _completed_section(snap: Snapshot, priced: bool) -> Table | Group:
    columns = [
        ("Task", {"overflow": "ellipsis", "max_width": 40, "no_wrap": True}),
        ("Agent", {"no_wrap": True}),
        ("Outcome", {}),
        ("Duration", {"justify": "right", "no_wrap": True}),
        ("Error", {"overflow": "ellipsis", "max_width": 40, "no_wrap": True}),
    ]
    if priced:
        columns.insert(4, ("Cost", {"justify": "right", "no_wrap": True}))
    if not snap.run_id:
        columns.insert(0, ("Run", {"overflow": "ellipsis", "max_width": 20, "no_wrap": True}))
    table = section("Recently completed", columns)
    for a in snap.completed:
        error = (a["error"] or "").strip().splitlines()
        cells = [
            _task_cell(a),
            plain(a["agent__name"] or "-"),
            state_text(a["state"]),
            duration(a["elapsed_s"]),
            Text(error[-1] if error else "", style="red"),
        ]
        if priced:
            cells.insert(4, cost_cell(a["cost_usd"]))
        if not snap.run_id:
            cells.insert(0, plain(a["run__name"]))
        table.add_row(*cells)
    return or_empty(table, "nothing finished yet")


def queue_section(snap: Snapshot) -> Table | Group:
    columns = [
        ("#", {"justify": "right"}),
        ("Task", {"overflow": "ellipsis", "max_width": 40, "no_wrap": True}),
        ("Priority", {"justify": "right"}),
        ("Critical path", {"justify": "right", "no_wrap": True}),
        ("Executor", {}),
        ("Requires", {"overflow": "ellipsis", "max_width": 24}),
        ("Attempts", {"justify": "right"}),
    ]
    if not snap.run_id:
        columns.insert(1, ("Run", {"overflow": "ellipsis", "max_width": 20, "no_wrap": True}))
    table = section("Next tasks", columns)
    for i, t in enumerate(snap.queue, 1):
        cells = [
            str(i),
            key_title(t["key"], t["title"]),
            str(t["priority"]),
            duration(t["critical_path_s"]),
            plain(t["executor"]),
            plain(", ".join(t["requires"]) or "-"),
            str(t["attempts_used"]),
        ]
        if not snap.run_id:
            cells.insert(1, plain(t["run__name"]))
        table.add_row(*cells)
    return or_empty(table, "queue empty")


def frame(snap: Snapshot, width: int = 160) -> Group:
    """The whole screen for a console `width` columns wide (narrow ones leave the cost columns out)."""
    return Group(
        header(snap),
        task_summary(snap, width),
        agents_section(snap),
        active_section(snap, width),
        completed_section(snap, width),
        queue_section(snap),
    )


def metrics_panel(run_id) -> Panel:
    m = run_metrics(run_id)
    grid = Table.grid(padding=(0, 2))
    grid.add_column()
    grid.add_column(justify="right")
    grid.add_row("makespan", f"{m['makespan_s']:.1f} s")
    grid.add_row("sum of task times", f"{m['task_time_s']:.1f} s")
    grid.add_row("speed-up", Text(f"{m['speedup']:.2f}× over one agent", style="bold green"))
    return Panel(grid, title="[bold]Run metrics[/]", box=box.ROUNDED, expand=False)


# --- The command ------------------------------------------------------------------------------------------


class Command(BaseCommand):
    help = (
        "Live terminal monitor: a run's progress, the agents, active tasks, recently completed and the queue. "
        "With RUN_ID it follows that run until it ends; without, the newest runs until Ctrl-C."
    )

    def add_arguments(self, parser):
        parser.add_argument("run_id", nargs="?", help="the run to follow (default: all runs, newest first)")
        parser.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
        parser.add_argument("--once", action="store_true", help="print one frame and exit")
        parser.add_argument("--width", type=int, default=None, help="console width (default: the terminal's)")

    def handle(self, *args, run_id=None, interval=1.0, once=False, width=None, **options):
        if interval <= 0:
            raise CommandError("--interval must be a positive number of seconds")
        if width is not None and width < 40:
            raise CommandError("--width must be at least 40")
        if run_id is not None:
            try:
                run_id = str(uuid.UUID(run_id))
            except ValueError:
                raise CommandError(f"malformed run id {run_id!r}: expected a UUID") from None
        snap = Snapshot.take(run_id)
        if run_id is not None and snap.run is None:
            raise CommandError(f"no run with id {run_id!r}")

        console = Console(
            file=getattr(self.stdout, "_out", self.stdout),  # past OutputWrapper, which would add newlines
            width=width,
            no_color=bool(options.get("no_color")),
            force_terminal=True if options.get("force_color") else None,
            highlight=False,
        )
        if not once and not snap.finished:
            snap = self.follow(console, snap, interval)
            if run_id is not None and snap.run is None:
                raise CommandError(f"run {run_id} was deleted while being monitored")
        console.print(frame(snap, console.width))
        if snap.finished:
            console.print(metrics_panel(run_id))

    def follow(self, console: Console, snap: Snapshot, interval: float) -> Snapshot:
        """Refresh until the followed run ends, or until Ctrl-C; return the last snapshot for the final frame."""
        try:
            with Live(frame(snap, console.width), console=console, auto_refresh=False, transient=True) as live:
                while not snap.finished and not (snap.run_id and snap.run is None):
                    time.sleep(interval)
                    snap = Snapshot.take(snap.run_id)
                    live.update(frame(snap, console.width), refresh=True)
        except KeyboardInterrupt:
            pass
        return snap
