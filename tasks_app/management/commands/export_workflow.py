from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from tasks_app.models import Workflow
from tasks_app.workflows import documents


class Command(BaseCommand):
    help = "Write a workflow as a DAG document (YAML or JSON), to stdout or to a file."

    def add_arguments(self, parser):
        parser.add_argument("name", help="the workflow's name")
        parser.add_argument(
            "--format", choices=documents.FORMATS, default=None, help="default: from -o's suffix, else yaml"
        )
        parser.add_argument("-o", "--output", default=None, help="write to this file instead of stdout")

    def handle(self, *args, name, format, output, **options):
        workflow = Workflow.objects.filter(name=name).first()
        if workflow is None:
            raise CommandError(f"no workflow named {name!r}")
        fmt = format or ("json" if output and output.endswith(".json") else "yaml")
        text = documents.dump_document(documents.workflow_to_document(workflow), fmt)
        if output is None:
            self.stdout.write(text, ending="")
            return
        try:
            Path(output).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"cannot write {output}: {exc.strerror}") from None
