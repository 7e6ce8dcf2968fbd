"""Failed logins are counted per user name and per address by every server process alike: past the limit,
a login is refused with 429 even with the right password, until the minute ends."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from http.cookiejar import CookieJar
from urllib.parse import urlencode

import pytest

from tests.conftest import Server

pytestmark = pytest.mark.django_db(transaction=True)

LIMIT = 4


class NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def log_in(base: str, username: str, password: str, address: str) -> tuple[int, str]:
    """(status, page) of one login through the form, from `address` (uvicorn takes X-Forwarded-For from
    loopback as the client's address, as from a proxy on the same host)."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()), NoRedirects)
    headers = {"X-Forwarded-For": address}
    form = opener.open(urllib.request.Request(f"{base}/accounts/login/", headers=headers), timeout=30).read()
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.decode()).group(1)
    data = urlencode({"username": username, "password": password, "csrfmiddlewaretoken": csrf}).encode()
    try:
        with opener.open(urllib.request.Request(f"{base}/accounts/login/", data, headers), timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def start_of_a_minute():
    """The counts are per wall-clock minute: begin far enough from its end that one test fits in it."""
    if time.time() % 60 > 40:
        time.sleep(61 - time.time() % 60)


@pytest.fixture
def two_servers(server_tmp):
    servers = [Server(server_tmp, extra_env={"CP_LOGIN_FAILURES_PER_MIN": str(LIMIT)}) for _ in range(2)]
    yield servers
    for server in servers:
        server.stop()


def test_wrong_passwords_on_two_servers_lock_the_user_name_even_against_the_right_password(
    two_servers, operator, django_user_model
):
    django_user_model.objects.create_user("bob", password="pw-bob-12345")
    start_of_a_minute()
    for i in range(LIMIT):  # spread across both processes
        status, page = log_in(two_servers[i % 2].url, "olivia", f"guess-{i}", "10.0.0.1")
        assert status == 200 and "didn't match" in page
    status, page = log_in(two_servers[0].url, "olivia", "pw-olivia-123", "10.0.0.1")
    assert status == 429 and "Too many failed logins" in page
    # The user name is locked from any address, whatever its case ...
    assert log_in(two_servers[1].url, "OLIVIA", "pw-olivia-123", "10.0.0.2")[0] == 429
    # ... and the address for any user name; another user from another address still logs in.
    assert log_in(two_servers[1].url, "bob", "pw-bob-12345", "10.0.0.1")[0] == 429
    assert log_in(two_servers[0].url, "bob", "pw-bob-12345", "10.0.0.3")[0] == 302


def test_the_admin_login_is_throttled_by_the_same_counts(two_servers, operator):
    start_of_a_minute()
    for i in range(LIMIT):
        assert log_in(two_servers[i % 2].url, "olivia", f"guess-{i}", "10.0.0.1")[0] == 200
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()), NoRedirects)
    url = f"{two_servers[1].url}/admin/login/?next=/admin/"
    form = opener.open(url, timeout=30).read().decode()
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form).group(1)
    data = urlencode({"username": "olivia", "password": "pw-olivia-123", "csrfmiddlewaretoken": csrf}).encode()
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(urllib.request.Request(url, data), timeout=30)
    assert refused.value.code == 429
