"""Failed authentications, counted in PostgreSQL in fixed one-minute windows, so every server process adds
to the same count (tasks_app.models.AuthFailure, an unlogged table).

Two users of it:

- The API (http_api.api_view) counts its 401s per client address. Once an address has failed more than
  CP_AUTH_FAILURES_PER_MIN times in the current minute, its failures are answered 429 rate_limited with
  Retry-After instead of 401. Only failures are counted and only failures are refused: a call with a valid
  token is served whatever its address did, so agents behind the same NAT as a scanner keep working (and
  tokens are long random strings, so a guess that succeeds is not a risk to defend against). Successful
  calls never touch the table: the hot path pays nothing.
- The login form (control_plane.login) counts failed logins per user name (case-insensitive) and per
  address, and refuses every login, even with the right password, once either has reached
  CP_LOGIN_FAILURES_PER_MIN failures this minute: passwords can be guessed, tokens cannot.

Rows of ended windows are deleted by whichever failure opens a new window (no sweeper needed).
"""

from __future__ import annotations

from django.db import connection

API_ADDRESS = "api-addr"
LOGIN_ADDRESS = "login-addr"
LOGIN_USER = "login-user"
KEY_MAX = 200  # AuthFailure.key's length

# The database's clock names the window, so processes on hosts whose clocks differ still share one.
_COUNT = """
INSERT INTO tasks_app_authfailure (scope, key, window_start, count)
VALUES (%s, %s, date_trunc('minute', now()), 1)
ON CONFLICT (scope, key, window_start) DO UPDATE SET count = tasks_app_authfailure.count + 1
RETURNING count, extract(epoch FROM date_trunc('minute', now()) + interval '1 minute' - now())
"""
_FORGET_ENDED = "DELETE FROM tasks_app_authfailure WHERE window_start < date_trunc('minute', now())"
_REACHED = """
SELECT extract(epoch FROM date_trunc('minute', now()) + interval '1 minute' - now())
FROM tasks_app_authfailure
WHERE window_start = date_trunc('minute', now()) AND count >= %s AND ({})
LIMIT 1
"""


def client_address(request) -> str:
    """The client's address as the ASGI server reports it (behind a proxy the server trusts, uvicorn has
    already replaced the proxy's address with the X-Forwarded-For client)."""
    return request.META.get("REMOTE_ADDR") or "unknown"


def failed(scope: str, key: str) -> tuple[int, float]:
    """Count one failure of `key`: (failures in this window so far, seconds until the window ends)."""
    with connection.cursor() as cursor:
        cursor.execute(_COUNT, [scope, key[:KEY_MAX]])
        count, left = cursor.fetchone()
        if count == 1:  # the first failure of a window: the ended windows can go
            cursor.execute(_FORGET_ENDED)
    return count, float(left)


def retry_after(limit: int, *keys: tuple[str, str]) -> float:
    """Seconds until the current window ends if any (scope, key) has `limit` failures in it already, else 0.
    A limit of 0 or less is no limit."""
    if limit <= 0 or not keys:
        return 0.0
    where = " OR ".join(["(scope = %s AND key = %s)"] * len(keys))
    params = [limit] + [part for scope, key in keys for part in (scope, key[:KEY_MAX])]
    with connection.cursor() as cursor:
        cursor.execute(_REACHED.format(where), params)
        row = cursor.fetchone()
    return max(float(row[0]), 1.0) if row else 0.0
