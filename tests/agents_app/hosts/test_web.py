"""The hosts page, the admin's host form and `manage.py hosts`: who may see and do what, bad input answered
with a sentence (never a 500), keys never stored or shown in clear, provisioned agents marked as such."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest
from cryptography.fernet import Fernet
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from agents_app.hosts.keys import fingerprint
from agents_app.hosts.models import Host, HostOperation
from agents_app.registry import create_enrollment_token, register_agent
from tests.agents_app.conftest import keygen

pytestmark = pytest.mark.django_db
XSS = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """A host key and a user key, as files and text (made once: ssh-keygen is quick but not free)."""
    tmp = tmp_path_factory.mktemp("keys")
    host_pub = keygen(tmp / "host")
    keygen(tmp / "user")
    return {"host_pub": host_pub, "user_path": tmp / "user", "user_text": (tmp / "user").read_text()}


@pytest.fixture
def host(keys):
    return Host.objects.create(
        name="mugen", address="mugen.example.net", user="cp", key_path=str(keys["user_path"]),
        host_key=keys["host_pub"], agent_count=3, agent_labels=["cg"],
    )  # fmt: skip


@pytest.fixture
def admin_client_(django_user_model):
    client = Client()
    client.force_login(django_user_model.objects.create_superuser("ada", "ada@example.com", "pw-ada-12345"))
    return client


def hx_post(client, url, data=None):
    client.get("/hosts/")  # sets the CSRF cookie
    token = client.cookies["csrftoken"].value
    return client.post(url, data or {}, HTTP_X_CSRFTOKEN=token, HTTP_HX_REQUEST="true")


def test_the_hosts_page_needs_login(client):
    for url in ("/hosts/", "/hosts/operations/"):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_a_viewer_watches_but_may_not_operate(viewer, host):
    page = viewer.get("/hosts/").content.decode()
    assert "mugen" in page and host.host_key_fingerprint in page
    assert 'value="deploy"' not in page
    assert viewer.post("/hosts/operate/", {"operation": "deploy", "host": host.pk}).status_code == 403
    assert viewer.post(f"/hosts/{host.pk}/confirm-key/", {"fingerprint": "x"}).status_code == 403
    assert not HostOperation.objects.exists()


def test_an_operator_queues_an_operation_for_the_selected_hosts(operator_client, host):
    assert 'value="deploy"' in operator_client.get("/hosts/").content.decode()
    response = hx_post(operator_client, "/hosts/operate/", {"operation": "status", "host": [host.pk]})
    assert response.status_code == 200 and "Status queued for mugen" in response.content.decode()
    # The answer carries both panels (out of band), so the page shows the new operation at once.
    assert response.content.decode().count('hx-swap-oob="true"') == 2 and "data-operation=" in response.content.decode()
    [op] = HostOperation.objects.all()
    assert (op.kind, op.state, op.requested_by) == ("status", "queued", "user:otto")
    assert op.q_task_id  # handed to django-q2

    panel = operator_client.get("/hosts/operations/").content.decode()
    assert 'hx-trigger="every 5s"' in panel  # asks while something waits in the queue (no event says "still")
    assert "is the django-q2 cluster running" not in panel
    HostOperation.objects.update(created_at=timezone.now() - timedelta(minutes=1))
    assert "is the django-q2 cluster running" in operator_client.get("/hosts/operations/").content.decode()
    # One operation at a time per host: a second one is refused, and nothing is started.
    again = hx_post(operator_client, "/hosts/operate/", {"operation": "uninstall", "host": [host.pk]})
    assert again.status_code == 409 and "mugen has a status queued: wait for it" in again.content.decode()
    assert HostOperation.objects.count() == 1

    HostOperation.objects.update(state="failed", error=XSS)
    panel = operator_client.get("/hosts/operations/").content.decode()
    assert "hx-trigger" not in panel and XSS not in panel and "&lt;script&gt;" in panel  # pushed, not polled


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"operation": "reboot", "host": ["1"]}, "Unknown operation"),
        ({"operation": "deploy"}, "Select at least one host"),
        ({"operation": "deploy", "host": ["x'; drop table", "999999"]}, "Select at least one host"),
    ],
)
def test_bad_operation_requests_are_refused_with_a_sentence(operator_client, host, data, says):
    response = hx_post(operator_client, "/hosts/operate/", data)
    assert response.status_code == 409 and says in response.content.decode()
    assert not HostOperation.objects.exists()


def test_confirming_a_fingerprint_pins_only_the_key_that_was_shown(operator_client, keys):
    fresh = Host.objects.create(
        name="majin", address="majin", user="cp", key_path="/k", offered_host_key=keys["host_pub"]
    )
    page = operator_client.get("/hosts/").content.decode()
    assert "not confirmed" in page and fingerprint(keys["host_pub"]) in page

    response = hx_post(operator_client, f"/hosts/{fresh.pk}/confirm-key/", {"fingerprint": "SHA256:somethingelse"})
    assert response.status_code == 409 and "not the SHA256:somethingelse" in response.content.decode()
    fresh.refresh_from_db()
    assert fresh.host_key == ""

    response = hx_post(operator_client, f"/hosts/{fresh.pk}/confirm-key/", {"fingerprint": fresh.offered_fingerprint})
    assert response.status_code == 200
    fresh.refresh_from_db()
    assert fresh.host_key_fingerprint == fingerprint(keys["host_pub"]) and fresh.host_key_confirmed_by == "user:otto"
    assert hx_post(operator_client, "/hosts/424242/confirm-key/", {"fingerprint": "x"}).status_code == 404


def test_a_changed_host_key_is_shown_loudly(viewer, host, keys, tmp_path):
    Host.objects.filter(pk=host.pk).update(offered_host_key=keygen(tmp_path / "impostor"))
    assert "HOST KEY CHANGED" in viewer.get("/hosts/").content.decode()


def test_the_agents_page_marks_agents_we_provisioned(viewer, host):
    token, record = create_enrollment_token(note="host mugen: deploy")
    HostOperation.objects.create(batch=uuid.uuid4(), host=host, kind="deploy", enrollment_token=record)
    register_agent(token, {"name": "mugen-1", "labels": ["cg"], "executors": ["shell"], "capacity": 1})
    other, _ = create_enrollment_token()
    register_agent(other, {"name": "laptop", "labels": [], "executors": ["shell"], "capacity": 1})

    page = viewer.get("/agents/").content.decode()
    mugen_row = page.split('data-agent="mugen-1"')[1].split("</tr>")[0]
    laptop_row = page.split('data-agent="laptop"')[1].split("</tr>")[0]
    assert "provisioned · mugen" in mugen_row
    assert "provisioned" not in laptop_row


def test_deleting_a_host_revokes_the_enrollment_tokens_written_to_it(host):
    from agents_app.models import EnrollmentToken

    _, mine = create_enrollment_token(note="host mugen: deploy")
    HostOperation.objects.create(batch=uuid.uuid4(), host=host, kind="deploy", enrollment_token=mine)
    _, unrelated = create_enrollment_token(note="a laptop")
    host.delete()
    assert EnrollmentToken.objects.get(pk=mine.pk).revoked_at is not None
    assert EnrollmentToken.objects.get(pk=unrelated.pk).revoked_at is None


# --- the admin ---------------------------------------------------------------------------------------------


def admin_form(**overrides) -> dict:
    data = {
        "name": "majin", "address": "10.0.0.7", "port": "22", "user": "cp", "key_path": "", "host_key": "",
        "remote_python": "python3", "remote_dir": "cp-agent", "server_url": "", "ca_bundle": "",
        "agent_count": "2", "name_prefix": "", "agent_labels": "cg,linux", "agent_executors": "shell,codex",
        "agent_capacity": "1", "private_key": "",
    }  # fmt: skip
    data.update(overrides)
    return data


def test_admin_stores_a_pasted_private_key_encrypted_and_never_shows_it(admin_client_, keys, settings):
    settings.CP_HOST_KEY_SECRET = Fernet.generate_key().decode()
    response = admin_client_.post(
        "/admin/agents_app/host/add/", admin_form(private_key=keys["user_text"], host_key=keys["host_pub"])
    )
    assert response.status_code == 302, response.content.decode()[-3000:]
    host = Host.objects.get(name="majin")
    assert host.key_encrypted and "PRIVATE KEY" not in host.key_encrypted and host.key_path == ""
    assert host.agent_labels == ["cg", "linux"] and host.agent_executors == ["shell", "codex"]
    assert host.host_key_confirmed_by == "user:ada"  # pasting the key is the confirmation
    page = admin_client_.get(f"/admin/agents_app/host/{host.pk}/change/").content.decode()
    assert "stored encrypted" in page and keys["user_text"].splitlines()[1] not in page


@pytest.mark.parametrize(
    ("overrides", "secret", "says"),
    [
        ({"private_key": "not a key"}, True, "not a private key"),
        ({"private_key": "KEY"}, False, "set CP_HOST_KEY_SECRET"),
        ({}, True, "Give the host a private key"),
        ({"key_path": "/k", "host_key": "ssh-ed25519 garbage"}, True, "not an OpenSSH public key"),
        ({"key_path": "/k", "agent_executors": "shell,teleport"}, True, "unknown executor(s) teleport"),
        ({"key_path": "/k", "remote_dir": "../../etc"}, True, "without &#x27;..&#x27;"),
        ({"key_path": "/k", "agent_labels": "ok,no spaces"}, True, "label &#x27;no spaces&#x27;: 1-64 of letters"),
        ({"key_path": "/k", "port": "70000"}, True, "less than or equal to 65535"),
        ({"key_path": "/k", "agent_labels": ",".join(f"l{i}" for i in range(33))}, True, "at most 32 labels"),
        ({"key_path": "/k", "server_url": "cp.example.com; rm -rf ~"}, True, "an http:// or https:// URL"),
        ({"key_path": "/k", "ca_bundle": "-----BEGIN CERTIFICATE-----\nnope"}, True, "not PEM certificates"),
    ],
)
def test_admin_refuses_bad_host_input_with_a_sentence(admin_client_, keys, settings, overrides, secret, says):
    settings.CP_HOST_KEY_SECRET = Fernet.generate_key().decode() if secret else ""
    if overrides.get("private_key") == "KEY":
        overrides["private_key"] = keys["user_text"]
    response = admin_client_.post("/admin/agents_app/host/add/", admin_form(**overrides))
    assert response.status_code == 200
    assert says in response.content.decode()
    assert not Host.objects.exists()


def test_admin_action_queues_an_operation(admin_client_, host):
    response = admin_client_.post(
        "/admin/agents_app/host/", {"action": "queue_stop", "_selected_action": [host.pk]}, follow=True
    )
    assert "queued for 1 host(s)" in response.content.decode()
    assert HostOperation.objects.get().kind == "stop"


# --- manage.py hosts -----------------------------------------------------------------------------------------


def test_the_command_refuses_unknown_hosts_and_bad_fingerprints(host):
    with pytest.raises(CommandError, match="no host named nowhere"):
        call_command("hosts", "status", "nowhere")
    with pytest.raises(CommandError, match="name the hosts, or pass --all"):
        call_command("hosts", "status")
    with pytest.raises(CommandError, match="has presented no key yet"):
        call_command("hosts", "confirm", "mugen", "SHA256:x")


def test_the_command_stores_a_key_encrypted(host, keys, settings, capsys):
    settings.CP_HOST_KEY_SECRET = Fernet.generate_key().decode()
    call_command("hosts", "store-key", "mugen", "--key-file", str(keys["user_path"]))
    host.refresh_from_db()
    assert host.key_encrypted and "PRIVATE KEY" not in host.key_encrypted
    with pytest.raises(CommandError, match="cannot read /nonexistent"):
        call_command("hosts", "store-key", "mugen", "--key-file", "/nonexistent")
    call_command("hosts", "list")
    assert "mugen\tcp@mugen.example.net:22\t3 agents\tSHA256:" in capsys.readouterr().out


@pytest.mark.django_db(transaction=True)
def test_the_command_runs_an_operation_over_ssh_and_fails_for_a_bad_host(sshd, tmp_path, capsys):
    common = {"user": sshd.user, "key_path": str(sshd.user_key_path), "host_key": sshd.host_key_pub}
    Host.objects.create(name="loop", address="127.0.0.1", port=sshd.port, remote_dir=str(tmp_path / "r"), **common)
    call_command("hosts", "status", "loop")
    assert "== loop: status succeeded" in capsys.readouterr().out
    Host.objects.create(name="gone", address="127.0.0.1", port=1, **common)
    with pytest.raises(CommandError, match="1 of 2 host"):
        call_command("hosts", "status", "--all")
    assert "== gone: status failed" in capsys.readouterr().out


@pytest.mark.django_db(transaction=True)
def test_every_change_to_an_operation_is_announced_to_the_live_pages(host):
    """The hosts page's websocket re-renders on these NOTIFYs, from whichever process runs the job."""
    import psycopg
    from django.db import connection

    from agents_app.hosts import jobs
    from tasks_app.notify import CHANNEL

    settings_dict = connection.settings_dict
    conninfo = {"dbname": settings_dict["NAME"], "user": settings_dict["USER"], "host": settings_dict["HOST"]}
    if settings_dict.get("PORT"):
        conninfo["port"] = settings_dict["PORT"]
    with psycopg.connect(**conninfo, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        [op] = jobs.start_operations("status", [host], "user:otto", background=False) or [None]
        heard = [json.loads(n.payload) for n in listener.notifies(timeout=2, stop_after=4)]
    op.refresh_from_db()
    assert op.state == "failed"  # mugen.example.net does not resolve
    assert sum(1 for n in heard if n.get("hosts")) >= 4  # queued, running, a report, finished


def stale_queued_operation(host) -> HostOperation:
    """A status operation queued 20 minutes ago that no cluster picked up."""
    op = HostOperation.objects.create(batch=uuid.uuid4(), host=host, kind="status")
    HostOperation.objects.filter(pk=op.pk).update(created_at=timezone.now() - timedelta(minutes=20))
    return op


def test_showing_the_hosts_pages_writes_nothing(viewer, host):
    op = stale_queued_operation(host)
    for url in ("/hosts/", "/hosts/operations/"):
        assert viewer.get(url).status_code == 200
    from tasks_app.dashboard.pages import render_panels

    render_panels("hosts", None, User.objects.get(username="vera"))  # the websocket's render
    op.refresh_from_db()
    assert op.state == "queued"


@pytest.mark.django_db(transaction=True)
def test_every_server_process_fails_operations_that_will_never_finish(host, server_tmp):
    from tests.conftest import Server, http, wait_for

    op = stale_queued_operation(host)
    server = Server(server_tmp, {"CP_HOST_STALE_CHECK_S": "0.5"})
    try:
        # A process sweeps from its first agent call on (even a refused one).
        assert http("POST", f"{server.url}/api/v1/agents/heartbeat", {}, token="nobody")[0] == 401
        wait_for(lambda: HostOperation.objects.get(pk=op.pk).state == "failed", 30, what="the sweeper to fail it")
    finally:
        server.stop()
    op.refresh_from_db()
    assert op.message == "never started" and "no django-q2 cluster picked this operation up" in op.error


def test_the_cluster_fails_them_too_when_no_server_runs():
    from django_q.models import Schedule

    from agents_app.hosts.jobs import STALE_OPERATIONS_SCHEDULE

    schedule = Schedule.objects.get(name=STALE_OPERATIONS_SCHEDULE)
    assert schedule.func == "agents_app.hosts.jobs.abandon_stale_operations" and schedule.minutes == 1


def test_the_hosts_page_is_added_to_the_dashboard_by_agents_app():
    from tasks_app.dashboard.pages import ADDED_PAGES, PAGES

    assert [p.id for p in PAGES["hosts"]] == ["panel-host-operations"]
    concerns = ADDED_PAGES["hosts"].concerns
    assert concerns({"hosts": True}) and not concerns({"runs": ["x"]})
