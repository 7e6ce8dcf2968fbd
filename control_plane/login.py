"""The login form, throttled: failed logins are counted per user name (case-insensitive) and per client
address by every server process alike (control_plane.rate_limit), and once either has failed
CP_LOGIN_FAILURES_PER_MIN times this minute, logins for it are refused with 429 until the minute ends,
even with the right password, so a guess that happens to be right is not told apart from a wrong one."""

from __future__ import annotations

import math

from django.conf import settings
from django.contrib import admin
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.views import LoginView

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
