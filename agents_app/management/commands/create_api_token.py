from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from agents_app.registry import create_api_token


class Command(BaseCommand):
    help = "Create an API token for USERNAME and print it (once)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--note", default="")

    def handle(self, *args, username, note, **options):
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"no user named {username!r} (create one with createsuperuser)")
        token, _record = create_api_token(user, note=note)
        self.stdout.write(token)
