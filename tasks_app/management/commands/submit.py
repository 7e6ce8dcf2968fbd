from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from tasks_app import workflows
from tasks_app.actions import submit_run
from tasks_app.dag import DagError, parse_document
from tasks_app.models import Workflow


def load_document(path: Path) -> dict:
    """A DAG document from a JSON or YAML file (the admin's import reads files the same way)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CommandError(f"{path} is not UTF-8 text") from None
    try:
        return workflows.load_document_text(text)
    except DagError as exc:
        raise CommandError(f"{path}: {exc.detail}") from None


class Command(BaseCommand):
    help = "Start a run of a DAG document (YAML or JSON file) or of a workflow (by name); print the run's id."

    def add_arguments(self, parser):
        parser.add_argument("file", help="a DAG document (FILE.yaml or FILE.json), or the name of a workflow")
        parser.add_argument("--priority", type=int, default=None)
        parser.add_argument("--max-parallel", type=int, default=None)

    def handle(self, *args, file, priority, max_parallel, **options):
        path = Path(file)
        if not path.is_file():
            workflow = Workflow.objects.filter(name=file).first()
            if workflow is None:
                raise CommandError(f"{file!r} is neither a DAG document file nor the name of a workflow")
            try:
                run = workflows.start_run(workflow, actor="cli:submit", priority=priority, max_parallel=max_parallel)
            except DagError as exc:
                raise CommandError(f"workflow {file!r} is not a valid DAG: {exc.detail}") from None
            self.stdout.write(str(run.id))
            return
        document = load_document(path)
        try:
            dag = parse_document(document)
        except DagError as exc:
            raise CommandError(f"invalid DAG: {exc.detail}") from None
        run = submit_run(dag, document, actor="cli:submit", priority=priority, max_parallel=max_parallel)
        self.stdout.write(str(run.id))
