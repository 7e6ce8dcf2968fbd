from django.core.management.base import BaseCommand, CommandError

from agents_app.models import Agent
from agents_app.registry import revoke_agent


class Command(BaseCommand):
    help = "Revoke the tokens of the named current agents: each stops at its next call (within a heartbeat)."

    def add_arguments(self, parser):
        parser.add_argument("names", nargs="+", metavar="NAME")

    def handle(self, *args, names, **options):
        agents = {a.name: a for a in Agent.objects.filter(name__in=names, retired_at__isnull=True)}
        if missing := [name for name in names if name not in agents]:
            raise CommandError(f"no current agent named {', '.join(missing)}")
        for name in names:
            revoke_agent(agents[name].pk, "command:revoke_agent")
            self.stdout.write(f"{name}: token revoked")
