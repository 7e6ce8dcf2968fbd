from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from tasks_app.dag import DagError
from tasks_app.management.commands.submit import load_document
from tasks_app.workflows import documents


class Command(BaseCommand):
    help = "Create a workflow from a DAG document (YAML or JSON file), or with --replace overwrite the one of its name."

    def add_arguments(self, parser):
        parser.add_argument("file", help="a DAG document: FILE.yaml or FILE.json")
        parser.add_argument(
            "--replace", action="store_true", help="replace the workflow of the same name (its runs stay as they were)"
        )

    def handle(self, *args, file, replace, **options):
        document = load_document(Path(file))
        try:
            workflow = documents.import_document(document, replace=replace, actor="cli:import_workflow")
        except DagError as exc:
            raise CommandError(f"invalid DAG: {exc.detail}") from None
        except documents.WorkflowExists as exc:
            raise CommandError(f"{exc} (add --replace)") from None
        self.stdout.write(f"imported workflow {workflow.name!r} ({len(document['tasks'])} tasks)")
