"""What the signed-in pages share, whichever app draws them: the operator permission, how the audit trail
names a person, how an operator's action answers (a flash for htmx, a redirect for a plain form), and the
origin check of their websockets (the one CSRF makes of a form's POST)."""

from __future__ import annotations

from urllib.parse import urlsplit

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse, HttpResponseForbidden
from django.shortcuts import redirect
from django.template.loader import render_to_string
from django.views.decorators.http import require_POST

from tasks_app.errors import ActionError, NotFound

# Watching needs a login; changing a run, a task, an agent or a host needs this.
OPERATE = "tasks_app.operate_run"
DEFAULT_PORTS = {"http": 80, "https": 443}


def user_actor(user) -> str:
    """How the audit trail names a person (Event.actor, PROTOCOL.md's `user:NAME`)."""
    return f"user:{user.get_username()}"


def actor_of(request) -> str:
    return user_actor(request.user)


def answer(request, text: str, ok: bool = True, back: str = "/", status: int = 409):
    """htmx gets a flash fragment (swapped into #flash; a refusal with `status`); a plain form post is
    redirected back."""
    if request.headers.get("HX-Request"):
        html = render_to_string("dashboard/flash.html", {"text": text, "ok": ok})
        return HttpResponse(html, status=200 if ok else status)
    (messages.success if ok else messages.error)(request, text)
    return redirect(request.headers.get("Referer") or back)


def operator_only(view):
    """A POST-only view for signed-in operators: a watcher is refused with 403, an action's refusal becomes
    a flash (404 for what does not exist)."""

    @login_required
    @require_POST
    def wrapper(request, *args, **kwargs):
        if not request.user.has_perm(OPERATE):
            refusal = "You may watch but not operate: ask for the operator permission."
            if request.headers.get("HX-Request"):
                return answer(request, refusal, ok=False, status=403)
            return HttpResponseForbidden(refusal)
        try:
            return view(request, *args, **kwargs)
        except NotFound:
            raise Http404 from None
        except ActionError as exc:
            return answer(request, exc.detail, ok=False)

    wrapper.__name__ = view.__name__
    return wrapper


def _origin(scheme: str, netloc: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        return scheme, (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        return None


def same_origin(scope) -> bool:
    """The socket's Origin is this server's own (scheme, host and port, as the page it serves has), or one in
    CSRF_TRUSTED_ORIGINS: as CSRF checks a form's POST. The host allow-list alone let any port or scheme of
    an allowed host, another site on localhost:3000 say, open a socket with a person's cookie."""
    headers = dict(scope.get("headers") or ())
    origin = headers.get(b"origin", b"").decode("latin-1")
    host = headers.get(b"host", b"").decode("latin-1")
    if not origin or not host or "://" not in origin:
        return False
    secure = scope.get("scheme") == "wss"
    if settings.CP_BEHIND_TLS_PROXY:
        secure = headers.get(b"x-forwarded-proto", b"").decode("latin-1").strip().lower() == "https"
    scheme, _, netloc = origin.partition("://")
    scheme = scheme.lower()
    if scheme not in DEFAULT_PORTS:
        return False
    theirs = _origin(scheme, netloc)
    if theirs is None:
        return False
    if theirs == _origin("https" if secure else "http", host):
        return True
    trusted = (o.partition("://") for o in settings.CSRF_TRUSTED_ORIGINS)
    return theirs in {_origin(s.lower(), n) for s, _, n in trusted if s.lower() in DEFAULT_PORTS}
