from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from tasks_app.actions import submit_run
from tasks_app.dag import DagError, params_from_pairs, parse_document, with_overrides
from tasks_app.dashboard.waiting import run_warnings
from tasks_app.models import Workflow
from tasks_app.workflows import documents


def load_document(path: Path) -> dict:
    """A DAG document from a JSON or YAML file (the admin's import reads files the same way)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CommandError(f"{path} is not UTF-8 text") from None
    try:
        return documents.load_document_text(text)
    except DagError as exc:
        raise CommandError(f"{path}: {exc.detail}") from None


def not_started(what: str, exc: DagError) -> CommandError:
    """The sentence for a refused start: an invalid document, an unreachable repository, an unknown base."""
    hint = " (add --repo URL)" if exc.detail.startswith("a base was given") else ""
    return CommandError(f"{what} not started: {exc.detail}{hint}")


class Command(BaseCommand):
    help = (
        "Start a run of a DAG document (YAML or JSON file) or of a workflow (by name); print the run's id. "
        "--repo, --base and --param override the document's workspace and run parameters."
    )

    def add_arguments(self, parser):
        parser.add_argument("file", help="a DAG document (FILE.yaml or FILE.json), or the name of a workflow")
        parser.add_argument("--priority", type=int, default=None)
        parser.add_argument("--max-parallel", type=int, default=None)
        parser.add_argument("--repo", default=None, help="the git repository the run works on (workspace.repo)")
        parser.add_argument(
            "--base", default=None, help="the branch, tag or full commit sha it starts from (workspace.base)"
        )
        parser.add_argument(
            "--param",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="a run parameter, overriding or adding to the document's (repeatable; the value is a string)",
        )

    def handle(self, *args, file, priority, max_parallel, repo, base, param, **options):
        try:
            params = params_from_pairs(param)
        except DagError as exc:
            raise CommandError(f"--param: {exc.detail}") from None
        overrides = {"repo": repo, "base": base, "params": params}
        path = Path(file)
        if not path.is_file():
            workflow = Workflow.objects.filter(name=file).first()
            if workflow is None:
                raise CommandError(f"{file!r} is neither a DAG document file nor the name of a workflow")
            try:
                run = documents.start_run(
                    workflow, actor="cli:submit", priority=priority, max_parallel=max_parallel, **overrides
                )
            except DagError as exc:
                raise not_started(f"workflow {file!r}", exc) from None
            self.stdout.write(str(run.id))
            self.warn(run)
            return
        try:
            document = with_overrides(load_document(path), **overrides)
            dag = parse_document(document)
            run = submit_run(dag, document, actor="cli:submit", priority=priority, max_parallel=max_parallel)
        except DagError as exc:
            raise not_started(str(path), exc) from None
        self.stdout.write(str(run.id))
        self.warn(run)

    def warn(self, run):
        """What no online agent can run, on stderr: stdout stays the run's id alone, for scripts."""
        for line in run_warnings(run.id):
            self.stderr.write(f"warning: {line}")
