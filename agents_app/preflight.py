"""Executor pre-flight: what an agent found when it checked its executors (CLI present, version), read and
shaped here; storing it and the operator's request that it check again are agent changes, in
agents_app.registry (record_preflight, request_preflight).

The report is kept whole for people (the agents page), while the agent's `executors` column keeps only the
executors that passed: the scheduler offers tasks by that column, so an executor that failed its pre-flight
is never offered a task, without the claim query knowing about pre-flights at all.
"""

from __future__ import annotations

import re

from control_plane.http_api import ApiError

# Checked with fullmatch: `$` would also match before a final newline ("shell\n").
EXECUTOR_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
MAX_EXECUTORS = 16
DETAIL_MAX_CHARS = 500
VERSION_MAX_CHARS = 64


def parse_report(value) -> dict:
    """A pre-flight report from an agent, checked field by field (400 naming what is wrong):
    {executor: {"usable": bool, "detail": str, "version": str | null}}."""
    if not isinstance(value, dict):
        raise ApiError(400, "bad_request", "'preflight' must be an object of executor name to check")
    if len(value) > MAX_EXECUTORS:
        raise ApiError(400, "bad_request", f"'preflight' may hold at most {MAX_EXECUTORS} executors")
    report = {}
    for name, check in value.items():
        if not EXECUTOR_RE.fullmatch(name):
            raise ApiError(400, "bad_request", f"'preflight' names an invalid executor: {name!r}")
        if not isinstance(check, dict) or not isinstance(check.get("usable"), bool):
            raise ApiError(400, "bad_request", f"'preflight.{name}' must be an object with a boolean 'usable'")
        detail, version = check.get("detail", ""), check.get("version")
        if not isinstance(detail, str) or not (version is None or isinstance(version, str)):
            raise ApiError(400, "bad_request", f"'preflight.{name}': 'detail' and 'version' must be strings")
        report[name] = {
            "usable": check["usable"],
            "detail": detail[:DETAIL_MAX_CHARS],
            "version": version[:VERSION_MAX_CHARS] if version else None,
        }
    return report


def usable(executors: list[str], report: dict) -> list[str]:
    """The executors an agent may be offered tasks for: those its report does not mark failed (an agent
    that sends no report, such as an older daemon, keeps what it declared)."""
    return [name for name in executors if report.get(name, {}).get("usable", True)]


def versions(report: dict) -> dict:
    return {name: check["version"] for name, check in report.items() if check["usable"] and check["version"]}


def executor_rows(executors: list[str], versions: dict, report: dict) -> list[dict]:
    """Per executor, for people: name, usable, version and the check's detail, from the agent's last report
    (or, for an agent that sent none, what it declared)."""
    if report:
        return [
            {"name": name, "usable": c["usable"], "version": c.get("version") or "", "detail": c.get("detail", "")}
            for name, c in sorted(report.items())
        ]
    return [{"name": e, "usable": True, "version": versions.get(e, ""), "detail": ""} for e in executors]
