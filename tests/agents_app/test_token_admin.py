"""Making API tokens in the admin (issue 12, item 2): only a superuser makes one for another user, anyone
else with the add permission makes their own, even when a forged form names someone else; and the new
token is shown on the response page itself, never in a cookie (messages travel signed, not encrypted)."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse

from agents_app import registry, tokens
from agents_app.models import ApiToken
from tests.agents_app.test_admin_agents import TOKEN_RE

pytestmark = pytest.mark.django_db
ADD = reverse("admin:agents_app_apitoken_add")


@pytest.fixture
def boss(django_user_model):
    return django_user_model.objects.create_superuser("sec-admin", "sec@example.com", "pw-sec-12345")


@pytest.fixture
def clerk(client, django_user_model):
    user = django_user_model.objects.create_user("cleo", password="pw-cleo-12345", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="add_apitoken"))
    client.force_login(user)
    return user


def shown_token(response) -> str:
    assert response.status_code == 200
    found = TOKEN_RE.findall(response.content.decode())
    assert len(found) == 1, response.content.decode()
    return found[0]


def test_a_clerk_is_not_offered_a_user_to_make_a_token_for(client, clerk, boss):
    form = client.get(ADD).context["adminform"].form
    assert "user" not in form.fields


def test_a_forged_post_naming_the_superuser_makes_the_clerk_own_token(client, clerk, boss):
    token = shown_token(client.post(ADD, {"user": boss.pk, "note": "mine"}))
    record = ApiToken.objects.get()
    assert record.user == clerk
    assert registry.authenticate_user(token) == clerk
    assert not ApiToken.objects.filter(user=boss).exists()


def test_a_superuser_still_makes_a_token_for_another_user(client, boss, django_user_model):
    olga = django_user_model.objects.create_user("olga")
    client.force_login(boss)
    token = shown_token(client.post(ADD, {"user": olga.pk, "note": "ci"}))
    assert ApiToken.objects.get().user == olga
    assert registry.authenticate_user(token) == olga


def test_the_new_token_is_in_the_page_and_in_no_cookie(client, clerk):
    response = client.post(ADD, {"note": "ci"})
    token = shown_token(response)
    assert ApiToken.objects.get().token_hash == tokens.hash_token(token)
    assert token not in " ".join(morsel.OutputString() for morsel in response.cookies.values())
    assert "messages" not in response.cookies
    assert "no-store" in response["Cache-Control"]
    # The next page shows it no more.
    assert token not in client.get(reverse("admin:index")).content.decode()
