"""The login form, throttled: failed logins are counted per user name (case-insensitive) and per client
address by every server process alike (control_plane.rate_limit), and once either has failed
CP_LOGIN_FAILURES_PER_MIN times this minute, logins for it are refused with 429 until the minute ends,
even with the right password, so a guess that happens to be right is not told apart from a wrong one.

And one-time login links, for a newcomer the demo has made a user for."""

from __future__ import annotations

import math
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import admin
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import get_user_model, login
from django.contrib.auth.tokens import PasswordResetTokenGenerator
from django.contrib.auth.views import LoginView
from django.core.exceptions import ValidationError
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.encoding import force_bytes, force_str
from django.utils.http import url_has_allowed_host_and_scheme, urlsafe_base64_decode, urlsafe_base64_encode

from control_plane import rate_limit


def _keys(request) -> list[tuple[str, str]]:
    keys = [(rate_limit.LOGIN_ADDRESS, rate_limit.client_address(request))]
    username = request.POST.get("username", "").strip().casefold()
    if username:
        keys.append((rate_limit.LOGIN_USER, username))
    return keys


class ThrottledLoginView(LoginView):
    template_name = "registration/login.html"

    def post(self, request, *args, **kwargs):
        wait_s = rate_limit.retry_after(settings.CP_LOGIN_FAILURES_PER_MIN, *_keys(request))
        if wait_s:
            seconds = math.ceil(wait_s)
            # An unbound form: a bound one would check the password when the page shows its errors.
            context = self.get_context_data(
                form=self.get_form_class()(request),
                throttled=f"Too many failed logins for this user name or from this address; try again in {seconds} s.",
            )
            response = self.render_to_response(context, status=429)
            response["Retry-After"] = str(seconds)
            return response
        return super().post(request, *args, **kwargs)

    def form_invalid(self, form):
        if settings.CP_LOGIN_FAILURES_PER_MIN > 0:
            for scope, key in _keys(self.request):
                rate_limit.failed(scope, key)
        return super().form_invalid(form)


def admin_login(request):
    """The admin's login form, throttled alike (admin.site.login would be a second, unthrottled way to guess
    passwords); a refused login shows the form again with status 429."""
    return ThrottledLoginView.as_view(
        template_name="admin/login.html",
        authentication_form=AdminAuthenticationForm,
        extra_context={**admin.site.each_context(request), "title": "Log in", "app_path": request.get_full_path()},
    )(request)


class LoginLinkTokens(PasswordResetTokenGenerator):
    """One-time login links (`./run demo` prints one): the token hashes the user's last login, so it stops
    working once used, and a password change ends it too. Salted apart from password-reset tokens."""

    key_salt = "control_plane.login.LoginLinkTokens"


login_link_tokens = LoginLinkTokens()


def login_link(user, next_path: str = "/") -> str:
    """The path of a one-time login link for `user` that lands on `next_path` (a path on this server)."""
    uid = urlsafe_base64_encode(force_bytes(user.pk))
    path = reverse("login-link", args=[uid, login_link_tokens.make_token(user)])
    return f"{path}?{urlencode({'next': next_path})}"


def login_with_link(request, uidb64: str, token: str):
    """Log the link's user in once, then go on to its `next` page; a used, stale or forged link is a 403 page
    that says to log in with a password."""
    User = get_user_model()
    try:
        user = User.objects.get(pk=force_str(urlsafe_base64_decode(uidb64)), is_active=True)
    except (User.DoesNotExist, ValueError, TypeError, OverflowError, ValidationError):
        user = None
    if user is None or not login_link_tokens.check_token(user, token):
        return render(request, "registration/login_link_used.html", status=403)
    login(request, user, backend="django.contrib.auth.backends.ModelBackend")
    next_path = request.GET.get("next", "/")
    if not url_has_allowed_host_and_scheme(next_path, allowed_hosts=None):
        next_path = "/"
    return redirect(next_path)
