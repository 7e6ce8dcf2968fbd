"""`manage.py approve TASK_ID [--message TEXT]`: approve a task awaiting approval (PROTOCOL.md v1.1)."""

import getpass
import uuid

from django.core.management.base import BaseCommand, CommandError

from tasks_app.actions import decide_approval
from tasks_app.errors import ActionError


def decide(task_id: str, approve: bool, message: str) -> str:
    """Approve or reject as the shell's user (`cli:NAME` in the audit trail); a clear error for a bad id or a
    task not awaiting approval."""
    try:
        task_id = str(uuid.UUID(task_id))
    except ValueError:
        raise CommandError(f"{task_id!r} is not a task id") from None
    try:
        return decide_approval(task_id, approve, f"cli:{getpass.getuser()}", message)
    except ActionError as exc:
        raise CommandError(exc.detail) from None


class Command(BaseCommand):
    help = "Approve a task awaiting approval: it succeeds and its dependents go on."
    approve = True

    def add_arguments(self, parser):
        parser.add_argument("task_id")
        parser.add_argument("--message", "-m", default="", help="a comment, kept in the audit trail")

    def handle(self, *args, **options):
        state = decide(options["task_id"], self.approve, options["message"])
        self.stdout.write(f"{options['task_id']}: {state}")
