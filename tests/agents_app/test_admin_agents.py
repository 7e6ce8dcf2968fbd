"""Agents and tokens in the admin: a token made there is shown once and only its hash is kept; tokens are
revoked, never deleted or edited; agents are browsed, and only their switches change, through the registry
and into the audit trail."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse

from agents_app import registry, tokens
from agents_app.models import Agent, ApiToken, EnrollmentToken
from tasks_app.models import Event

pytestmark = pytest.mark.django_db
TOKEN_RE = re.compile(r"<code>(cp[eu]_[A-Za-z0-9_-]+)</code>")


@pytest.fixture
def ada(client, django_user_model):
    user = django_user_model.objects.create_superuser("ada", "ada@example.com", "pw-ada-12345")
    client.force_login(user)
    return user


def messages_of(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def create_through_admin(client, model: str, data: dict) -> tuple[str, object]:
    """Post the add form and return (the token its response page showed, the page)."""
    response = client.post(reverse(f"admin:agents_app_{model}_add"), data)
    assert response.status_code == 200
    shown = TOKEN_RE.findall(response.content.decode())
    assert len(shown) == 1, response.content.decode()
    return shown[0], response


def everything_stored(model) -> str:
    return " ".join(str(v) for row in model.objects.values() for v in row.values())


def test_an_enrollment_token_made_in_the_admin_is_shown_once_and_stored_as_its_hash(client, ada):
    token, page = create_through_admin(
        client, "enrollmenttoken", {"note": "rack 4", "max_uses": "2", "expires": "86400"}
    )
    assert "shown only this once" in page.content.decode()
    record = EnrollmentToken.objects.get()
    assert record.token_hash == tokens.hash_token(token)
    assert token not in everything_stored(EnrollmentToken)
    assert (record.note, record.max_uses, record.created_by, token.startswith(record.prefix)) == (
        "rack 4", 2, ada, True
    )  # fmt: skip
    assert record.expires_at is not None
    # Never again: not on the list, not on its page.
    for url in (reverse("admin:agents_app_enrollmenttoken_changelist"),
                reverse("admin:agents_app_enrollmenttoken_change", args=[record.pk])):  # fmt: skip
        assert token not in client.get(url).content.decode()
    assert (
        "token_hash"
        not in client.get(reverse("admin:agents_app_enrollmenttoken_change", args=[record.pk])).content.decode()
    )
    # It works: an agent enrolls with it.
    agent, _ = registry.register_agent(token, {"name": "cg-1", "labels": [], "executors": ["shell"], "capacity": 1})
    assert agent.enrollment_token_id == record.pk
    event = Event.objects.get(kind="token")
    assert (event.actor, event.detail) == ("user:ada", {"token": record.prefix, "model": "enrollmenttoken"})


def test_an_api_token_made_in_the_admin_is_shown_once_and_stored_as_its_hash(client, ada, django_user_model):
    olga = django_user_model.objects.create_user("olga", password="pw-olga-12345")
    token, _ = create_through_admin(client, "apitoken", {"user": olga.pk, "note": "ci"})
    record = ApiToken.objects.get()
    assert (record.user, record.token_hash) == (olga, tokens.hash_token(token))
    assert token not in everything_stored(ApiToken)
    assert registry.authenticate_user(token) == olga
    assert token not in client.get(reverse("admin:agents_app_apitoken_changelist")).content.decode()


def test_a_token_is_revoked_not_deleted(client, ada):
    token, record = registry.create_enrollment_token(note="old")
    changelist = reverse("admin:agents_app_enrollmenttoken_changelist")
    response = client.post(changelist, {"action": "revoke", "_selected_action": [record.pk]}, follow=True)
    assert messages_of(response) == ["1 token(s) revoked."]
    record.refresh_from_db()
    assert record.revoked_at is not None
    with pytest.raises(registry.AuthError):
        registry.register_agent(token, {"name": "late", "labels": [], "executors": ["shell"], "capacity": 1})
    event = Event.objects.get(kind="token", to_state="revoked")
    assert event.actor == "user:ada"
    assert client.post(reverse("admin:agents_app_enrollmenttoken_delete", args=[record.pk])).status_code == 403
    actions = dict(client.get(changelist).context["action_form"].fields["action"].choices)
    assert "delete_selected" not in actions
    # Only the note may be edited afterwards; the hash and the rest are not in the form at all.
    change = reverse("admin:agents_app_enrollmenttoken_change", args=[record.pk])
    client.post(change, {"note": "renamed", "token_hash": "0" * 64, "max_uses": "99"})
    record.refresh_from_db()
    assert (record.note, record.token_hash, record.max_uses) == ("renamed", tokens.hash_token(token), None)


def test_bad_token_form_input_is_refused_on_its_field(client, ada):
    response = client.post(reverse("admin:agents_app_enrollmenttoken_add"), {"max_uses": "0", "expires": "nope"})
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert set(errors) == {"max_uses", "expires"}
    assert not EnrollmentToken.objects.exists()
    response = client.post(reverse("admin:agents_app_apitoken_add"), {"user": "424242"})
    assert "user" in response.context["adminform"].form.errors
    assert not ApiToken.objects.exists()


def test_staff_without_token_permissions_cannot_make_tokens(client, django_user_model):
    clerk = django_user_model.objects.create_user("cleo", password="pw-cleo-12345", is_staff=True)
    clerk.user_permissions.add(Permission.objects.get(codename="view_enrollmenttoken"))
    client.force_login(clerk)
    assert client.get(reverse("admin:agents_app_enrollmenttoken_changelist")).status_code == 200
    assert client.post(reverse("admin:agents_app_enrollmenttoken_add"), {"note": "x"}).status_code == 403
    assert client.get(reverse("admin:agents_app_apitoken_changelist")).status_code == 403
    assert not EnrollmentToken.objects.exists()


# --- Agents -----------------------------------------------------------------------------------------------


def test_agents_are_listed_filtered_searched_and_switched_through_the_registry(client, ada, make_agent):
    make_agent(name="ccg-1", labels=("ccg", "linux"))
    make_agent(name="cg-2", labels=("cg",))
    changelist = reverse("admin:agents_app_agent_changelist")
    page = client.get(changelist).content.decode()
    assert "ccg-1" in page and "cg-2" in page and "ccg, linux" in page
    page = client.get(changelist, {"q": "cg-2"}).content.decode()
    assert "cg-2" in page and "ccg-1" not in page
    assert client.get(changelist, {"status": "offline"}).context["cl"].result_count == 0

    agent = Agent.objects.get(name="cg-2")
    response = client.post(changelist, {"action": "drain", "_selected_action": [agent.pk]}, follow=True)
    assert messages_of(response) == ["1 agent(s) updated."]
    agent.refresh_from_db()
    assert agent.draining
    event = Event.objects.get(kind="agent", to_state="draining=True")
    assert (event.actor, event.agent_id) == ("user:ada", agent.pk)
    assert client.get(reverse("admin:agents_app_agent_add")).status_code == 403
    assert client.post(reverse("admin:agents_app_agent_delete", args=[agent.pk])).status_code == 403
    assert "token_hash" not in client.get(reverse("admin:agents_app_agent_change", args=[agent.pk])).content.decode()


@pytest.mark.parametrize("model", ["agent", "enrollmenttoken", "apitoken"])
def test_agent_and_token_list_pages_take_the_same_queries_however_many_rows(
    client, ada, make_agent, model, django_assert_max_num_queries
):
    def grow(start: int, n: int):
        for i in range(start, start + n):
            make_agent(name=f"a-{i}")
            registry.create_api_token(ada, note=f"t-{i}")

    grow(0, 1)
    url = reverse(f"admin:agents_app_{model}_changelist")
    with django_assert_max_num_queries(10) as few:
        assert client.get(url).status_code == 200
    grow(1, 20)
    with django_assert_max_num_queries(len(few.captured_queries)):
        assert client.get(url).status_code == 200
