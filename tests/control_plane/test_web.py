"""What the signed-in pages share: the websocket origin check, as CSRF checks a form's origin."""

from __future__ import annotations

from django.test import override_settings

from control_plane.web import same_origin


def _scope(origin, host, scheme="ws", proto=None):
    headers = [(b"origin", origin.encode()), (b"host", host.encode())]
    if proto:
        headers.append((b"x-forwarded-proto", proto.encode()))
    return {"scheme": scheme, "headers": headers}


def test_behind_a_tls_proxy_the_origin_is_https_and_trusted_origins_are_honoured():
    with override_settings(CP_BEHIND_TLS_PROXY=True, CSRF_TRUSTED_ORIGINS=["https://cp.example.com"]):
        assert same_origin(_scope("https://board.example", "board.example", proto="https"))
        assert not same_origin(_scope("http://board.example", "board.example", proto="https"))
        assert not same_origin(_scope("https://board.example", "board.example", proto="http"))
        assert same_origin(_scope("https://cp.example.com", "board.example", proto="https"))
        assert same_origin(_scope("https://cp.example.com:443", "board.example:443", proto="https"))
        assert not same_origin(_scope("https://cp.example.com:8443", "board.example", proto="https"))
    with override_settings(CP_BEHIND_TLS_PROXY=False):
        # Without the proxy setting a client cannot claim https by a header.
        assert not same_origin(_scope("https://board.example", "board.example", proto="https"))
        assert same_origin(_scope("https://board.example", "board.example", scheme="wss"))
        assert not same_origin(_scope("", "board.example"))
