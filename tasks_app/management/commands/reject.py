"""`manage.py reject TASK_ID [--message TEXT]`: reject a task awaiting approval (PROTOCOL.md v1.1)."""

from .approve import Command as Approve


class Command(Approve):
    help = "Reject a task awaiting approval: it fails and what depends on it is skipped."
    approve = False
