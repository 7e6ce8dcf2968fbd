import re
from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError

from agents_app.registry import create_enrollment_token

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not match:
        raise CommandError(f"--expires takes a duration like 30m, 24h or 7d, not {text!r}")
    return timedelta(seconds=int(match[1]) * UNITS[match[2]])


class Command(BaseCommand):
    help = "Create an enrollment token for agents to register with, and print it (once)."

    def add_arguments(self, parser):
        parser.add_argument("--uses", type=int, default=None, help="how many registrations it allows")
        parser.add_argument("--expires", default=None, help="lifetime, e.g. 30m, 24h, 7d")
        parser.add_argument("--note", default="", help="what it is for")

    def handle(self, *args, uses, expires, note, **options):
        if uses is not None and uses < 1:
            raise CommandError("--uses must be at least 1")
        token, _record = create_enrollment_token(
            note=note, uses=uses, expires=parse_duration(expires) if expires else None
        )
        self.stdout.write(token)
