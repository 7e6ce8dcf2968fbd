from django.core.management.base import BaseCommand, CommandError

from agents_app import registry
from agents_app.models import Agent, AgentStatus


class Command(BaseCommand):
    help = "Ask agents to check their executors again; each does at its next heartbeat and reports."

    def add_arguments(self, parser):
        parser.add_argument("names", nargs="*", metavar="NAME")
        parser.add_argument("--all", dest="all_agents", action="store_true", help="every online agent")

    def handle(self, *args, names, all_agents, **options):
        if bool(names) == all_agents:
            raise CommandError("name some agents, or pass --all")
        current = Agent.objects.filter(retired_at__isnull=True)
        agents = list(current.filter(status=AgentStatus.ONLINE) if all_agents else current.filter(name__in=names))
        if missing := sorted(set(names) - {a.name for a in agents}):
            raise CommandError(f"no current agent named {', '.join(missing)}")
        for agent in agents:
            registry.request_preflight(agent.pk, "command:preflight_agents")
            self.stdout.write(f"{agent.name}: pre-flight requested")
