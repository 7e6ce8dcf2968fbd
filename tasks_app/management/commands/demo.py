import os
import sys
import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

from agents_app.registry import create_enrollment_token
from control_plane import launch
from tasks_app.actions import submit_run
from tasks_app.dag import parse_document
from tasks_app.reports import run_status
from tasks_app.states import RunState

from .status import progress_line, summary_lines
from .submit import load_document

SEED_DAG = launch.ROOT / "docs" / "examples" / "webapp_framework.yaml"


class Command(BaseCommand):
    help = "Start the server, django-q2 and 10 local agents (6 ccg, 4 cg), run the seed's DAG, report."

    def add_arguments(self, parser):
        parser.add_argument("--file", default=str(SEED_DAG), help="the DAG document to run")
        parser.add_argument("--agents-ccg", type=int, default=6)
        parser.add_argument("--agents-cg", type=int, default=4)
        parser.add_argument(
            "--time-scale", type=float, default=float(os.environ.get("CP_DEMO_TIME_SCALE", "0.005")),
            help="simulated seconds per estimated second (0.005: the seed's 90 minutes in about 30 s)",
        )  # fmt: skip

    def handle(self, *args, file, agents_ccg, agents_cg, time_scale, **options):
        host = os.environ.get("HOST", "127.0.0.1")
        port = int(os.environ.get("PORT", "8000"))
        logs = Path(settings.DATA_DIR) / "demo"
        logs.mkdir(parents=True, exist_ok=True)
        children = []
        try:
            self.stdout.write(f"==> server on http://{host}:{port}/  (logs in {logs})")
            children.append(launch.start_server(port, log=logs / "server.log"))
            children.append(launch.start_qcluster(log=logs / "qcluster.log"))
            token, _ = create_enrollment_token(note="demo agents")
            server = f"http://{host}:{port}"
            plan = [(f"ccg-{i}", ["ccg"]) for i in range(1, agents_ccg + 1)]
            plan += [(f"cg-{i}", ["cg"]) for i in range(1, agents_cg + 1)]
            for name, labels in plan:
                children.append(
                    launch.start_agent(
                        server,
                        token,
                        name,
                        labels,
                        logs / "agents",
                        executors=["simulated", "shell"],
                        extra=["--time-scale", str(time_scale)],
                        log=logs / f"agent-{name}.log",
                    )  # fmt: skip
                )
            self.stdout.write(f"==> {len(plan)} agents: {', '.join(n for n, _ in plan)}")
            document = load_document(Path(file))
            run = submit_run(parse_document(document), document, actor="cli:demo")
            self.stdout.write(f"==> run {run.id} submitted: {run.name}")
            self.stdout.write(f"    dashboard: {server}/runs/{run.id}/   API: {server}/api/v1/runs/{run.id}")
            self._watch(run.id)
            for line in summary_lines(run.id):
                self.stdout.write(line)
        finally:
            for child in reversed(children):
                launch.stop(child)

    def _watch(self, run_id) -> None:
        tty = sys.stdout.isatty()
        last = ""
        status = run_status(run_id)
        while status["state"] in (RunState.RUNNING, RunState.PAUSED):
            line = progress_line(status)
            if line != last:
                self.stdout.write(("\r" + line) if tty else line, ending="" if tty else "\n")
                self.stdout.flush()
                last = line
            time.sleep(0.5)
            status = run_status(run_id)
        self.stdout.write(("\r" if tty else "") + progress_line(status))
