#!/usr/bin/env python3
"""cpctl: the control plane from any laptop or CI job, over its HTTP API with an API token.

One standard-library file, like the agent daemon: copy it anywhere with Python 3.10+. It needs the
server's URL and an API token (`manage.py create_api_token USER`, or the admin's API tokens page):
  CP_URL, CP_TOKEN in the environment, or a config file (mode 0600, JSON {"url": ..., "token": ...}) at
  $CPCTL_CONFIG or ~/.config/cpctl/config.json.

Exit codes a CI job can gate on: 0 succeeded (or done), 1 failed (or an error), 2 usage, 3 canceled.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import stat
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

OK, FAILED, USAGE, CANCELED = 0, 1, 2, 3
EXIT_OF_STATE = {"succeeded": OK, "failed": FAILED, "canceled": CANCELED}
TERMINAL = ("succeeded", "failed", "canceled")
TIMEOUT_S = 30


class CliError(Exception):
    """A sentence for stderr, and the exit code."""

    def __init__(self, message: str, code: int = FAILED):
        super().__init__(message)
        self.code = code


class Unreachable(CliError):
    """The server could not be reached, or dropped the connection (a watch retries these)."""


# --- configuration ------------------------------------------------------------------------------------


def config_path() -> Path:
    return Path(os.environ.get("CPCTL_CONFIG") or Path.home() / ".config" / "cpctl" / "config.json")


def load_config(url_flag: str | None) -> tuple[str, str]:
    """(url, token): the flag, then the environment, then the config file, which must be private."""
    url, token = os.environ.get("CP_URL", ""), os.environ.get("CP_TOKEN", "")
    path = config_path()
    if (not url or not token) and path.exists():
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise CliError(f"{path} holds a token and must be readable by you alone: chmod 600 {path}", USAGE)
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot read {path}: {exc}", USAGE) from None
        url, token = url or str(saved.get("url") or ""), token or str(saved.get("token") or "")
    url = (url_flag or url).rstrip("/")
    if not url:
        raise CliError("no server: set CP_URL (or --url), or write a config file (cpctl --help)", USAGE)
    if not token:
        raise CliError("no API token: set CP_TOKEN, or write a config file (cpctl --help)", USAGE)
    return url, token


# --- HTTP -------------------------------------------------------------------------------------------


class Api:
    def __init__(self, url: str, token: str):
        self.url, self.token = url, token

    def call(self, method: str, path: str, body=None, query=None, raw: bytes | None = None, ctype=None):
        """The answer's JSON, or its bytes for a download; CliError with the server's sentence otherwise."""
        url = f"{self.url}/api/v1/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query, doseq=True)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", ctype or "application/json")
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
                payload, kind = resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            raise CliError(self._refusal(err)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(f"cannot reach {self.url}: {reason}") from None
        return json.loads(payload) if "json" in kind else payload

    @staticmethod
    def _refusal(err: urllib.error.HTTPError) -> str:
        try:
            body = json.loads(err.read())
            return f"{err.code} {body['error']}: {body['detail']}"
        except (ValueError, KeyError, TypeError, OSError):
            return f"{err.code} {err.reason}"


# --- output -----------------------------------------------------------------------------------------


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def table(rows: list[list[str]], header: list[str]) -> None:
    """Columns as wide as their widest cell; the last column is never cut."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        out("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + str(row[-1]))


def when(iso: str | None) -> str:
    return (iso or "")[:19].replace("T", " ")


def percent(fraction) -> str:
    return f"{round(100 * (fraction or 0))}%"


# --- commands ---------------------------------------------------------------------------------------


def cmd_runs(api: Api, args) -> int:
    query = {"limit": args.limit, **({"state": args.state} if args.state else {})}
    if args.workflow:
        query["workflow"] = args.workflow
    runs = api.call("GET", "runs", query=query)["runs"]
    if args.json:
        return out(json.dumps(runs, indent=2)) or OK
    rows = [[r["run_id"], r["state"], percent(r["progress"]), str(r["tasks"]), when(r["created_at"]), r["name"]]
            for r in runs]  # fmt: skip
    table(rows, ["RUN", "STATE", "DONE", "TASKS", "CREATED", "NAME"])
    return OK


def where_from(args) -> dict:
    """--repo and --base, those given."""
    return {k: v for k, v in (("repo", args.repo), ("base", args.base)) if v}


def cmd_submit(api: Api, args) -> int:
    path = Path(args.target)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        query = {
            "param": args.param,
            **({"repo": args.repo} if args.repo else {}),
            **({"base": args.base} if args.base else {}),
        }
        try:
            json.loads(text)
            answer = api.call("POST", "runs", raw=text.encode(), query=query)
        except ValueError:
            answer = api.call("POST", "runs", raw=text.encode(), query=query, ctype="application/yaml")
    else:
        params = {}
        for pair in args.param:
            name, sep, value = pair.partition("=")
            if not sep:
                raise CliError(f"--param is NAME=VALUE, not {pair!r}", USAGE)
            params[name] = value
        body = {
            "params": params,
            **({"repo": args.repo} if args.repo else {}),
            **({"base": args.base} if args.base else {}),
        }
        answer = api.call("POST", f"workflows/{urllib.parse.quote(args.target, safe='')}/runs", body)
    for warning in answer.get("warnings") or ():
        print(f"cpctl: warning: {warning}", file=sys.stderr)
    if args.json and not args.wait:
        return out(json.dumps(answer)) or OK
    out(answer["run_id"])
    return watch(api, answer["run_id"], args) if args.wait else OK


def print_status(status: dict) -> None:
    counts = ", ".join(f"{n} {s}" for s, n in status["counts"].items() if n)
    out(f"{status['name']}  {status['state']}  ({counts})")
    rows = []
    for t in status["tasks"]:
        note = t.get("waiting") or (f"awaiting {t['awaiting']}" if t.get("awaiting") else "")
        rows.append([t["key"], t["state"], percent(t["progress"]), str(t["attempt"]), t["agent"] or "", note or ""])
    table(rows, ["TASK", "STATE", "PROGRESS", "ATTEMPT", "AGENT", "NOTE"])


def cmd_status(api: Api, args) -> int:
    if args.watch:
        return watch(api, args.run, args)
    status = api.call("GET", f"runs/{args.run}")
    out(json.dumps(status, indent=2)) if args.json else print_status(status)
    return EXIT_OF_STATE.get(status["state"], OK)


def watch(api: Api, run_id: str, args) -> int:
    """A line per change until the run ends; its exit code is the run's (0 succeeded, 1 failed, 3 canceled).
    A dropped connection (a server restart) is waited out."""
    last, lost = None, False
    while True:
        try:
            status = api.call("GET", f"runs/{run_id}")
        except Unreachable as exc:
            if not lost:
                print(f"{exc}; retrying", file=sys.stderr)
            lost = True
            time.sleep(min(10.0, args.interval * 2))
            continue
        lost = False
        counts = {s: n for s, n in status["counts"].items() if n}
        line = f"{when(time.strftime('%Y-%m-%dT%H:%M:%S'))}  {status['state']}  " + ", ".join(
            f"{n} {s}" for s, n in counts.items()
        )
        if (status["state"], counts) != last:
            out(json.dumps({"state": status["state"], "counts": counts}) if args.json else line)
            last = (status["state"], counts)
        if status["state"] in TERMINAL:
            for t in status["tasks"]:
                if t["state"] in ("failed", "canceled") and not args.json:
                    out(f"  {t['key']}: {t['state']} (task {t['id']})")
            return EXIT_OF_STATE[status["state"]]
        time.sleep(args.interval)


def cmd_logs(api: Api, args) -> int:
    """The log as it is, or with -f as it grows, until its attempt ends (a task not started yet is waited for)."""
    query = {"offset": 0, **({"attempt": args.attempt} if args.attempt else {})}
    while True:
        try:
            page = api.call("GET", f"tasks/{args.task}/log", query=query)
        except CliError as exc:
            if not (args.follow and "has no attempts yet" in str(exc)):
                raise
            time.sleep(args.interval)
            continue
        if page["log"]:
            sys.stdout.write(page["log"])
            sys.stdout.flush()
        query.update(offset=page["next_offset"], attempt=page["attempt"])
        if page["done"] or not args.follow:
            return OK
        if not page["log"]:
            time.sleep(args.interval)


def run_operation(name: str):
    def cmd(api: Api, args) -> int:
        answer = api.call("POST", f"runs/{args.run}/{name}", {})
        out(json.dumps(answer) if args.json else f"run {answer['run_id']}: {answer['state']}")
        return OK

    return cmd


def cmd_retry(api: Api, args) -> int:
    """A task again (with --command, --prompt or --params changed), or with --failed every failed task of a
    run."""
    if args.failed:
        if args.command is not None or args.prompt is not None or args.params is not None:
            raise CliError("--failed retries tasks as they are: edit one task at a time", USAGE)
        answer = api.call("POST", f"runs/{args.id}/retry-failed", {})
        out(json.dumps(answer) if args.json else f"run {answer['run_id']}: {answer['state']}, "
            f"{len(answer['retried'])} task(s) retried")  # fmt: skip
        return OK
    edits = {k: v for k, v in (("command", args.command), ("prompt", args.prompt)) if v is not None}
    if args.params is not None:
        try:
            edits["params"] = json.loads(args.params)
        except ValueError as exc:
            raise CliError(f"--params must be a JSON object: {exc}", USAGE) from None
    answer = api.call("POST", f"tasks/{args.id}/retry", edits)
    out(json.dumps(answer) if args.json else f"task {answer['task_id']}: {answer['state']}")
    return OK


def cmd_rerun(api: Api, args) -> int:
    answer = api.call("POST", f"runs/{args.run}/rerun", {})
    if args.json and not args.wait:
        return out(json.dumps(answer)) or OK
    out(answer["run_id"])
    return watch(api, answer["run_id"], args) if args.wait else OK


def decision(name: str):
    def cmd(api: Api, args) -> int:
        answer = api.call("POST", f"tasks/{args.task}/{name}", {"message": args.message or ""})
        out(json.dumps(answer) if args.json else f"task {answer['task_id']}: {answer['state']}")
        return OK

    return cmd


def cmd_artifacts(api: Api, args) -> int:
    try:
        found = api.call("GET", f"runs/{args.id}")["artifacts"]
    except CliError as exc:
        if not str(exc).startswith("404"):
            raise
        found = [{**a, "task": None} for a in api.call("GET", f"tasks/{args.id}")["artifacts"]]
    if args.get:
        chosen = [a for a in found if a["name"] == args.get]
        if not chosen:
            raise CliError(f"no artifact named {args.get!r} (cpctl artifacts {args.id} lists them)")
        content = api.call("GET", f"artifacts/{chosen[-1]['id']}")
        target = args.output or Path(args.get).name
        if target == "-":
            sys.stdout.buffer.write(content)
        else:
            Path(target).write_bytes(content)
            print(f"{target}: {len(content)} bytes", file=sys.stderr)
        return OK
    if args.json:
        return out(json.dumps(found, indent=2)) or OK
    table([[a.get("task") or "", str(a["attempt"]), str(a["size"]), a["name"]] for a in found],
          ["TASK", "ATTEMPT", "BYTES", "NAME"])  # fmt: skip
    return OK


def cmd_agents(api: Api, args) -> int:
    agents = api.call("GET", "agents")["agents"]
    if args.json:
        return out(json.dumps(agents, indent=2)) or OK
    rows = [[a["name"], a["status"], ",".join(a["labels"]) or "-", ",".join(a["executors"]), when(a["last_seen_at"]),
             ",".join(a["tasks"])] for a in agents]  # fmt: skip
    table(rows, ["AGENT", "STATUS", "LABELS", "EXECUTORS", "LAST SEEN", "TASKS"])
    return OK


# --- the command line -------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpctl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="the server (default: CP_URL or the config file)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("runs", help="the newest runs")
    s.add_argument("--state", choices=("running", "paused", "succeeded", "failed", "canceled"))
    s.add_argument("--workflow", help="only runs of this workflow")
    s.add_argument("--limit", type=int, default=20)
    s.set_defaults(fn=cmd_runs)

    s = sub.add_parser("submit", help="start a run of a DAG document (FILE) or of a workflow (by name)")
    s.add_argument("target", metavar="FILE|WORKFLOW")
    s.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    s.add_argument("--repo")
    s.add_argument("--base")
    s.add_argument("--wait", action="store_true", help="watch the run; exit with its outcome")
    s.add_argument("--interval", type=float, default=2.0, help=argparse.SUPPRESS)
    s.set_defaults(fn=cmd_submit)

    s = sub.add_parser("status", help="a run's tasks; exits 1 for a failed run, 3 for a canceled one")
    s.add_argument("run")
    s.add_argument("--watch", action="store_true", help="a line per change until the run ends")
    s.add_argument("--interval", type=float, default=2.0, help="seconds between looks (--watch)")
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("logs", help="a task's log (its latest attempt unless --attempt)")
    s.add_argument("task")
    s.add_argument("-f", "--follow", action="store_true", help="follow it until the attempt ends")
    s.add_argument("--attempt", type=int)
    s.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    s.set_defaults(fn=cmd_logs)

    for name in ("cancel", "pause", "resume"):
        s = sub.add_parser(name, help=f"{name} a run")
        s.add_argument("run")
        s.set_defaults(fn=run_operation(name))

    s = sub.add_parser("retry", help="retry a failed or canceled task (or --failed: every one of a run)")
    s.add_argument("id", metavar="TASK|RUN")
    s.add_argument("--failed", action="store_true", help="ID is a run: retry each of its failed tasks")
    s.add_argument("--command", help="run this command instead (a shell task)")
    s.add_argument("--prompt", help="give the agent this prompt instead (claude, codex)")
    s.add_argument("--params", metavar="JSON", help="the task's params instead, as a JSON object")
    s.set_defaults(fn=cmd_retry)

    s = sub.add_parser("rerun", help="a new run of the same document as RUN")
    s.add_argument("run")
    s.add_argument("--wait", action="store_true", help="watch the new run; exit with its outcome")
    s.add_argument("--interval", type=float, default=2.0, help=argparse.SUPPRESS)
    s.set_defaults(fn=cmd_rerun)

    for name in ("approve", "reject"):
        s = sub.add_parser(name, help=f"{name} a task awaiting approval")
        s.add_argument("task")
        s.add_argument("--message", "-m")
        s.set_defaults(fn=decision(name))

    s = sub.add_parser("artifacts", help="a run's or a task's artifacts; --get NAME downloads one")
    s.add_argument("id", metavar="RUN|TASK")
    s.add_argument("--get", metavar="NAME")
    s.add_argument("-o", "--output", metavar="FILE", help="where --get writes (- for standard output)")
    s.set_defaults(fn=cmd_artifacts)

    s = sub.add_parser("agents", help="the fleet")
    s.set_defaults(fn=cmd_agents)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        api = Api(*load_config(args.url))
        return args.fn(api, args)
    except CliError as exc:
        print(f"cpctl: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `cpctl runs | head`: the reader has gone; say nothing more, and let the interpreter's final flush
        # of stdout go nowhere instead of raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OK


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
