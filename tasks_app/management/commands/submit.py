import json
from pathlib import Path

import yaml
from django.core.management.base import BaseCommand, CommandError

from tasks_app.actions import submit_run
from tasks_app.dag import DagError, parse_document


def load_document(path: Path) -> dict:
    """A DAG document from a .json or .yaml/.yml file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise CommandError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None


class Command(BaseCommand):
    help = "Submit a DAG document (YAML or JSON file) as a new run and print the run's id."

    def add_arguments(self, parser):
        parser.add_argument("file", help="a DAG document: FILE.yaml or FILE.json")
        parser.add_argument("--priority", type=int, default=None)
        parser.add_argument("--max-parallel", type=int, default=None)

    def handle(self, *args, file, priority, max_parallel, **options):
        document = load_document(Path(file))
        try:
            dag = parse_document(document)
        except DagError as exc:
            raise CommandError(f"invalid DAG: {exc.detail}") from None
        run = submit_run(dag, document, actor="cli:submit", priority=priority, max_parallel=max_parallel)
        self.stdout.write(str(run.id))
