"""`manage.py hosts`: the hosts page for scripts.

    hosts list
    hosts deploy|stop|restart|upgrade|status|uninstall|scan NAME... | --all   [--background]
    hosts confirm NAME SHA256:…            pin the key NAME presented at its last scan
    hosts store-key NAME --key-file PATH   store a private key encrypted (CP_HOST_KEY_SECRET)

Operations run here and now, in parallel over the hosts, and print each host's output; the exit status is 1
when any host failed. --background queues them for the django-q2 cluster instead.
"""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from agents_app.hosts.jobs import start_operations
from agents_app.hosts.keys import UnusableKey, check_private_key
from agents_app.hosts.models import Host, HostOperationKind
from agents_app.hosts.secrets import SecretUnavailable, encrypt_private_key
from agents_app.hosts.trust import confirm_offered_key
from tasks_app.errors import ActionError

ACTOR = "command:hosts"


class Command(BaseCommand):
    help = "Provision agents on hosts over SSH: list, operations (deploy, stop, ...), confirm, store-key."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("list", help="hosts, their pinned key and last operation")
        for kind in HostOperationKind.values:
            p = sub.add_parser(kind, help=f"{kind} on the named hosts")
            p.add_argument("names", nargs="*", metavar="NAME")
            p.add_argument("--all", action="store_true", help="every host")
            p.add_argument("--background", action="store_true", help="queue for the django-q2 cluster")
        p = sub.add_parser("confirm", help="pin the host key a host presented, after comparing its fingerprint")
        p.add_argument("name")
        p.add_argument("fingerprint", help="SHA256:… as shown by `hosts list` or `hosts scan`")
        p = sub.add_parser("store-key", help="store a private key encrypted in the database")
        p.add_argument("name")
        p.add_argument("--key-file", required=True)

    def handle(self, *args, action, **options):
        if action == "list":
            return self.list_hosts()
        if action == "confirm":
            return self.confirm(options["name"], options["fingerprint"])
        if action == "store-key":
            return self.store_key(options["name"], options["key_file"])
        return self.operate(action, options["names"], options["all"], options["background"])

    def hosts_named(self, names: list[str]) -> list[Host]:
        hosts = list(Host.objects.filter(name__in=names).order_by("name"))
        unknown = sorted(set(names) - {h.name for h in hosts})
        if unknown:
            raise CommandError(f"no host named {', '.join(unknown)} (see `manage.py hosts list`)")
        return hosts

    def list_hosts(self):
        for h in Host.objects.order_by("name"):
            last = h.operations.order_by("-created_at").first()
            key = h.host_key_fingerprint or f"not confirmed (presents {h.offered_fingerprint or '?: scan it'})"
            if h.host_key_changed:
                key = f"CHANGED: pinned {h.host_key_fingerprint}, presents {h.offered_fingerprint}"
            self.stdout.write(
                f"{h.name}\t{h.user}@{h.address}:{h.port}\t{h.agent_count} agents\t{key}\t"
                + (f"{last.kind} {last.state}" if last else "-")
            )

    def operate(self, kind: str, names: list[str], every: bool, background: bool):
        if every == bool(names):
            raise CommandError("name the hosts, or pass --all")
        hosts = list(Host.objects.order_by("name")) if every else self.hosts_named(names)
        try:
            ops = start_operations(kind, hosts, ACTOR, background=background)
        except ActionError as exc:
            raise CommandError(exc.detail) from None
        if background:
            for op in ops:
                self.stdout.write(f"{op.host.name}: {kind} queued ({op.id})")
            return
        failed = [op for op in ops if op.state != "succeeded"]
        for op in ops:
            self.stdout.write(f"== {op.host.name}: {kind} {op.state}")
            self.stdout.write(op.output.rstrip())
        if failed:
            names = ", ".join(op.host.name for op in failed)
            raise CommandError(f"{len(failed)} of {len(ops)} host(s) failed: {names}")

    def confirm(self, name: str, fingerprint: str):
        [host] = self.hosts_named([name])
        try:
            host = confirm_offered_key(host.pk, fingerprint, ACTOR)
        except ActionError as exc:
            raise CommandError(exc.detail) from None
        self.stdout.write(f"{host.name}: host key {host.host_key_fingerprint} pinned")

    def store_key(self, name: str, key_file: str):
        [host] = self.hosts_named([name])
        try:
            text = Path(key_file).read_text()
            check_private_key(text)
            host.key_encrypted = encrypt_private_key(text)
        except OSError as exc:
            raise CommandError(f"cannot read {key_file}: {exc}") from None
        except (UnusableKey, SecretUnavailable) as exc:
            raise CommandError(str(exc)) from None
        host.save(update_fields=["key_encrypted", "updated_at"])
        self.stdout.write(f"{host.name}: private key stored encrypted; you may delete {key_file}")
