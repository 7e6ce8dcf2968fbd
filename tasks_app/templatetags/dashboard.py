"""Small formatting filters for the dashboard."""

from datetime import datetime

from django import template
from django.utils import timezone

from tasks_app import costs

register = template.Library()


@register.filter
def duration(seconds) -> str:
    """3725 -> '1h 02m', 65 -> '1m 05s', 4.2 -> '4.2s'."""
    if seconds is None or seconds == "":
        return "–"
    seconds = float(seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


@register.filter
def pct(fraction) -> int:
    return int(round(float(fraction or 0) * 100))


@register.filter
def since(moment) -> str:
    """Seconds from `moment` until now, formatted."""
    if not isinstance(moment, datetime):
        return "–"
    return duration((timezone.now() - moment).total_seconds())


@register.filter
def until(moment) -> str:
    if not isinstance(moment, datetime):
        return "–"
    return duration(max(0.0, (moment - timezone.now()).total_seconds()))


@register.filter
def money(dollars) -> str:
    """0.0042 -> '$0.0042', 1.234 -> '$1.23' (tasks_app.costs.money)."""
    try:
        return costs.money(float(dollars or 0))
    except (TypeError, ValueError):
        return "–"


@register.filter
def tokens(count) -> str:
    """12345 -> '12,345'; 1234567 -> '1.2M'."""
    try:
        count = int(count or 0)
    except (TypeError, ValueError):
        return "–"
    if count >= 10_000_000:
        return f"{count / 1_000_000:.1f}M"
    return f"{count:,}"
