"""The DAG document (PROTOCOL.md): validation, topological order, depth ("waves") and critical paths.

Pure functions over plain dicts, so the API, the admin, the CLI and the tests share one definition.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from .states import APPROVAL_EXECUTOR
from .templating import TemplateError
from .templating import check as check_template

# Keys, labels and agent names; checked with fullmatch: `$` would also match before a final newline ("k\n").
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
# The daemon has its own list (agents_app.cp_agent.KNOWN_EXECUTORS: one stdlib-only file, it cannot import this
# one); tests/agents_app/test_executor_names.py ties the two, and models.EXECUTORS to this.
EXECUTORS = ("shell", "claude", "codex", "simulated", APPROVAL_EXECUTOR)
# How long an approval waits for an answer unless its task says (timeout_s): a week, the longest timeout.
APPROVAL_TIMEOUT_S = 7 * 86400
DEFAULTS = {"max_attempts": 3, "timeout_s": 1800, "retry_delay_s": 10}
# A task's whole-number fields and their bounds.
TASK_NUMBERS = {
    "priority": (-1_000_000, 1_000_000),
    "max_attempts": (1, 100),
    "timeout_s": (1, 7 * 86400),
    "retry_delay_s": (0, 86400),
}
TASK_FIELDS = {
    "key", "title", "deps", "requires", "executor", "command", "prompt", "params", "estimate_s", "priority",
    "max_attempts", "timeout_s", "retry_delay_s",
}  # fmt: skip
DOC_FIELDS = {
    "name", "max_parallel", "defaults", "tasks", "priority", "description", "workspace", "params", "max_cost_usd",
}  # fmt: skip
# The largest run budget a document may set (PROTOCOL.md v1.1 `max_cost_usd`), in US dollars.
MAX_COST_USD = 1_000_000
WORKSPACE_FIELDS = {"repo", "base", "branch_prefix"}
DEFAULT_BRANCH_PREFIX = "cp/"
PARAM_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
# Git refs and URLs reach git's argv: no whitespace or control characters, never a leading "-" (an option).
REF_RE = re.compile(r"(?!-)[^\s\x00-\x1f\x7f~^:?*\[\\]{1,255}")
BRANCH_PREFIX_RE = re.compile(r"(?![-/])(?!.*\.\.)(?!.*//)[A-Za-z0-9._/-]{0,64}")


# The params of the AI executors, checked at submit: the agent daemon (agents_app/cp_agent.py: ClaudeExecutor and
# CodexExecutor `arguments`, CliExecutor.run's budget_usd and stall_s, resume_session, TaskRun._expects_changes)
# reads the same names, so a typo or a bad value is a 422 naming the task and the param, not an attempt failing
# minutes later on an agent. This table is the one owner of those rules: change it with the daemon. A param is a
# (test, "what is allowed") pair; shell and simulated params stay free-form. `timeout_s` is a task field.
@dataclass(frozen=True)
class ParamRule:
    test: Callable[[Any], bool]
    allowed: str
    schema: dict = field(default_factory=dict)  # the same rule as JSON Schema, for the OpenAPI description


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _tools(value: Any) -> bool:
    """Tool patterns as `--allowedTools` takes them (`Bash(git *)`, `Edit`): the daemon refuses blank ones."""
    return (
        isinstance(value, list)
        and len(value) <= 100
        and all(isinstance(t, str) and t.strip() and len(t) <= 500 for t in value)
    )


def _is_text(lo: int, hi: int) -> ParamRule:
    allowed = f"a string of {lo} to {hi} characters" if lo else f"a string of at most {hi} characters"
    return ParamRule(lambda v: isinstance(v, str) and lo <= len(v) <= hi, allowed,
                     {"type": "string", "minLength": lo, "maxLength": hi})  # fmt: skip


def _is_one_of(*choices: str) -> ParamRule:
    return ParamRule(lambda v: isinstance(v, str) and v in choices, f"one of {', '.join(choices)}",
                     {"enum": list(choices)})  # fmt: skip


def _is_positive(hi: float) -> ParamRule:
    # NaN and inf fail too
    return ParamRule(lambda v: _number(v) and 0 < v <= hi, f"a number > 0 and <= {hi:g}",
                     {"type": "number", "exclusiveMinimum": 0, "maximum": hi})  # fmt: skip


def _is_int(lo: int, hi: int) -> ParamRule:
    allowed = f"an integer from {lo} to {hi}"
    return ParamRule(lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi, allowed,
                     {"type": "integer", "minimum": lo, "maximum": hi})  # fmt: skip


IS_BOOL = ParamRule(lambda v: isinstance(v, bool), "true or false", {"type": "boolean"})
IS_TOOL_LIST = ParamRule(
    _tools,
    "a list of at most 100 tool patterns, each a non-blank string of at most 500 characters",
    {"type": "array", "maxItems": 100, "items": {"type": "string", "minLength": 1, "maxLength": 500}},
)
_SHARED_PARAMS = {
    "model": _is_text(1, 200),
    "budget_usd": _is_positive(10_000),
    "expect_changes": IS_BOOL,
    "stall_s": _is_positive(86_400),
    "resume_on_retry": IS_BOOL,
}
AI_PARAMS: dict[str, dict[str, ParamRule]] = {
    "claude": {
        **_SHARED_PARAMS,
        "permission_mode": _is_one_of("acceptEdits", "default", "plan", "dontAsk", "bypassPermissions"),
        "skip_permissions": IS_BOOL,  # the v1 spelling of permission_mode bypassPermissions
        "allowed_tools": IS_TOOL_LIST,
        "disallowed_tools": IS_TOOL_LIST,
        "max_turns": _is_int(1, 1000),
        "system_prompt": _is_text(0, 100_000),
        # A permission claude was not given: a person answers it ("ask", through the daemon's MCP relay and
        # an input request) or it is refused at once ("deny"); unanswered after input_timeout_s, denied.
        "on_permission": _is_one_of("ask", "deny"),
        "input_timeout_s": _is_positive(7 * 86_400),
    },
    "codex": {
        **_SHARED_PARAMS,
        "sandbox": _is_one_of("read-only", "workspace-write", "danger-full-access"),
        "reasoning_effort": _is_one_of("minimal", "low", "medium", "high"),
    },
}


class DagError(Exception):
    """A document that is well-formed JSON but not a valid DAG (HTTP 422). `keys` names the culprits.

    `problems` is every problem found, each a DagError of its own task and field: a document with three bad
    tasks is refused with all three (`DagError.of`), its detail naming each."""

    def __init__(
        self, detail: str, keys: list[str] | None = None, field: str | None = None,
        problems: list[DagError] | None = None,
    ):  # fmt: skip
        super().__init__(detail)
        self.detail, self.keys, self.field = detail, keys or [], field
        self.problems: list[DagError] = problems or [self]

    @classmethod
    def of(cls, problems: list[DagError]) -> DagError:
        """One error for all of `problems` (itself when there is one)."""
        if len(problems) == 1:
            return problems[0]
        keys = list(dict.fromkeys(k for p in problems for k in p.keys))
        detail = f"{len(problems)} problems: " + "; ".join(p.detail for p in problems)
        return cls(detail, keys, problems[0].field, problems)


class Problems:
    """The problems of one document, gathered so that all are reported at once."""

    def __init__(self) -> None:
        self.found: list[DagError] = []

    def take(self, check: Callable[[], Any], default: Any = None) -> Any:
        """check()'s value, or `default` with its problems noted."""
        try:
            return check()
        except DagError as exc:
            self.found.extend(exc.problems)
            return default

    def raise_any(self) -> None:
        if self.found:
            raise DagError.of(self.found)


@dataclass
class TaskSpec:
    key: str
    title: str
    deps: list[str]
    requires: list[str]
    executor: str
    command: str | None
    prompt: str | None
    params: dict
    estimate_s: float | None
    priority: int
    max_attempts: int
    timeout_s: int
    retry_delay_s: int
    depth: int = 0
    critical_path_s: float = 0.0


@dataclass
class Workspace:
    """The repository a run works on (PROTOCOL.md v1.1); `base` None means the repository's HEAD."""

    repo: str
    base: str | None
    branch_prefix: str


@dataclass
class Dag:
    name: str
    max_parallel: int | None
    priority: int
    defaults: dict
    tasks: list[TaskSpec] = field(default_factory=list)  # in topological order
    workspace: Workspace | None = None
    params: dict = field(default_factory=dict)
    max_cost_usd: float | None = None

    def by_key(self) -> dict[str, TaskSpec]:
        return {t.key: t for t in self.tasks}


def _int(value: Any, what: str, lo: int, hi: int | None = None, key: str | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        where = f"task {key!r}: " if key else ""
        raise DagError(f"{where}{what} must be an integer {bound}", [key] if key else [], what)
    return value


def _names(value: Any, what: str, key: str, limit: int = 32) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > limit:
        raise DagError(f"task {key!r}: {what} must be a list of at most {limit} names", [key], what)
    for item in value:
        if not isinstance(item, str) or not NAME_RE.fullmatch(item):
            raise DagError(f"task {key!r}: {what} entry {item!r} is not a valid name", [key], what)
    return list(value)


def _text(value: Any, what: str, key: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise DagError(f"task {key!r}: {what} must be a string", [key], what)
    return value


def check_task_params(params: dict, executor: str, key: str) -> None:
    """A claude or codex task's params against AI_PARAMS (DagError naming the task and the param); the params
    of other executors are theirs to read."""
    rules = AI_PARAMS.get(executor)
    if rules is None:
        return
    unknown = [name for name in params if name not in rules]
    if unknown:
        raise DagError(
            f"task {key!r}: unknown param(s) {', '.join(repr(n) for n in unknown)} for {executor}; "
            f"known: {', '.join(sorted(rules))}",
            [key],
            "params",
        )
    for name, value in params.items():
        rule = rules[name]
        if not rule.test(value):
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise DagError(f"task {key!r}: params.{name} must be {rule.allowed}, not {shown}", [key], "params")


def parse_document(doc: Any) -> Dag:
    """Validate a DAG document and return it in topological order, with depths and critical paths. Every
    problem is reported at once (DagError.problems); the cycle check runs once the tasks themselves are
    valid."""
    if not isinstance(doc, dict):
        raise DagError("the document must be a JSON object")
    problems = Problems()
    unknown = set(doc) - DOC_FIELDS
    if unknown:
        problems.found.append(DagError(f"unknown document field(s): {', '.join(sorted(unknown))}"))
    name = doc.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 128:
        problems.found.append(DagError("name must be a string of 1 to 128 characters", field="name"))
    max_parallel = doc.get("max_parallel")
    if max_parallel is not None:
        problems.take(lambda: _int(max_parallel, "max_parallel", 1, 100_000))
    priority = problems.take(lambda: _int(doc.get("priority", 0), "priority", -1_000_000, 1_000_000), 0)
    defaults = problems.take(lambda: _parse_defaults(doc.get("defaults") or {}), dict(DEFAULTS))
    specs = _parse_tasks(doc.get("tasks"), defaults, problems)
    params = problems.take(lambda: parse_params(doc.get("params")), None)
    if params is not None:
        problems.take(lambda: check_templates(specs.values(), params))
    max_cost = problems.take(lambda: parse_max_cost(doc.get("max_cost_usd")))
    workspace = problems.take(lambda: parse_workspace(doc.get("workspace")))
    problems.raise_any()
    assert isinstance(name, str)  # raise_any() has refused any other
    order = topological_order({k: s.deps for k, s in specs.items()})
    dag = Dag(name=name, max_parallel=max_parallel, priority=priority, defaults=defaults, params=params,
              max_cost_usd=max_cost)  # fmt: skip
    dag.workspace = workspace
    dag.tasks = [specs[k] for k in order]
    _annotate(dag)
    return dag


def _parse_defaults(raw: Any) -> dict:
    """The document's `defaults` over DEFAULTS (retry_delay_s may be 0, the others are >= 1)."""
    if not isinstance(raw, dict) or set(raw) - set(DEFAULTS):
        raise DagError(f"defaults may only set {', '.join(DEFAULTS)}", field="defaults")
    defaults = dict(DEFAULTS)
    for k, v in raw.items():
        defaults[k] = _int(v, f"defaults.{k}", 0 if k == "retry_delay_s" else 1)
    return defaults


def _parse_tasks(raw_tasks: Any, defaults: dict, problems: Problems) -> dict[str, TaskSpec]:
    """The document's valid tasks by key, in document order; the problems of the others, of repeated keys
    and of unknown or repeated deps are noted (a dependency typo with a "did you mean")."""
    if not isinstance(raw_tasks, list) or not raw_tasks:
        problems.found.append(DagError("tasks must be a non-empty list", field="tasks"))
        return {}
    if len(raw_tasks) > 20_000:
        problems.found.append(DagError("a document may hold at most 20000 tasks", field="tasks"))
        return {}
    specs: dict[str, TaskSpec] = {}
    keys = {raw["key"] for raw in raw_tasks if isinstance(raw, dict) and isinstance(raw.get("key"), str)}
    for raw in raw_tasks:
        spec = problems.take(partial(_parse_task, raw, defaults))
        if spec is None:
            continue
        if spec.key in specs:
            problems.found.append(DagError(f"duplicate task key {spec.key!r}", [spec.key], "key"))
            continue
        specs[spec.key] = spec
    # Every task's deps, the invalid tasks' too (as far as they are a list of names).
    for key, deps in _deps_of(raw_tasks):
        missing = [d for d in deps if d not in keys]
        if missing:
            named = ", ".join(d + _did_you_mean(d, keys - {key}) for d in missing)
            problems.found.append(DagError(f"task {key!r} depends on unknown key(s): {named}",
                                           [key, *missing], "deps"))  # fmt: skip
        if len(set(deps)) != len(deps):
            problems.found.append(DagError(f"task {key!r} lists a dependency twice", [key], "deps"))
    return specs


def _deps_of(raw_tasks: list) -> list[tuple[str, list[str]]]:
    """(key, deps) of each task whose key is a string and deps a list of strings, once per key."""
    seen: dict[str, list[str]] = {}
    for raw in raw_tasks:
        if not isinstance(raw, dict) or not isinstance(raw.get("key"), str) or raw["key"] in seen:
            continue
        deps = raw.get("deps") or []
        if isinstance(deps, list) and all(isinstance(d, str) for d in deps):
            seen[raw["key"]] = deps
    return list(seen.items())


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_templates(specs: Iterable[TaskSpec], params: dict) -> None:
    """Each task's prompt and command name only its deps' outputs and the run's params (every one that
    does not is reported)."""
    problems = Problems()
    for spec in specs:
        for what in ("prompt", "command"):
            try:
                check_template(getattr(spec, what), spec.deps, params)
            except TemplateError as exc:
                problems.found.append(DagError(f"task {spec.key!r}: {what}: {exc}", [spec.key], what))
    problems.raise_any()


def parse_workspace(raw: Any) -> Workspace | None:
    """`workspace: {repo, base, branch_prefix}`, checked (the repository itself is reached at submit)."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - WORKSPACE_FIELDS:
        raise DagError(f"workspace must be an object of {', '.join(sorted(WORKSPACE_FIELDS))}", field="workspace")
    repo = raw.get("repo")
    if (
        not isinstance(repo, str)
        or not 1 <= len(repo) <= 2000
        or repo.startswith("-")
        or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in repo)
    ):
        raise DagError(
            "workspace.repo must be a git URL of at most 2000 characters, without spaces, not starting with '-'",
            field="workspace",
        )
    base = raw.get("base")
    if base is not None and (not isinstance(base, str) or not REF_RE.fullmatch(base)):
        raise DagError("workspace.base must be a branch, tag or commit", field="workspace")
    prefix = raw.get("branch_prefix", DEFAULT_BRANCH_PREFIX)
    if not isinstance(prefix, str) or not BRANCH_PREFIX_RE.fullmatch(prefix):
        raise DagError(
            "workspace.branch_prefix must be up to 64 of [A-Za-z0-9._/-], without '..', '//' or a leading '-'/'/'",
            field="workspace",
        )
    return Workspace(repo=repo, base=base, branch_prefix=prefix)


def parse_max_cost(raw: Any) -> float | None:
    """The run's budget in US dollars: a number > 0 (null: none)."""
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 < raw <= MAX_COST_USD:
        raise DagError(f"max_cost_usd must be a number > 0 and <= {MAX_COST_USD}", field="max_cost_usd")
    return float(raw)


def parse_params(raw: Any) -> dict:
    """Run parameters: names to strings, numbers, booleans or null."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or len(raw) > 100:
        raise DagError("params must be an object of at most 100 parameters", field="params")
    for name, value in raw.items():
        if not PARAM_NAME_RE.fullmatch(name):
            raise DagError(f"parameter name {name!r} must be 1-64 of [A-Za-z0-9_.-], not starting with one of .-",
                           field="params")  # fmt: skip
        if not (value is None or isinstance(value, str | int | float | bool)):
            raise DagError(f"parameter {name!r} must be a string, number, boolean or null", field="params")
        if isinstance(value, str) and len(value) > 65536:
            raise DagError(f"parameter {name!r} is longer than 65536 characters", field="params")
    return dict(raw)


def with_overrides(
    document: Any, *, repo: str | None = None, base: str | None = None, params: dict | None = None
) -> Any:
    """The document with a start's overrides applied, before validation (the CLI's `submit --repo --base
    --param`, the admin's *Start a run…*, `workflows.start_run`): `repo`/`base` set or replace the workspace's
    (the rest of it kept), `params` override or add run parameters. None overrides nothing; the document
    itself is not changed. DagError when a base is given for a document without a workspace and no repo."""
    if not isinstance(document, dict) or (repo is None and base is None and not params):
        return document
    out = dict(document)
    if repo is not None or base is not None:
        workspace = document.get("workspace")
        if workspace is not None and not isinstance(workspace, dict):
            raise DagError(f"workspace must be an object of {', '.join(sorted(WORKSPACE_FIELDS))}", field="workspace")
        if workspace is None and repo is None:
            raise DagError(
                "a base was given, but the document has no workspace and no repository was given", field="workspace"
            )
        workspace = dict(workspace or {})
        if repo is not None:
            workspace["repo"] = repo
        if base is not None:
            workspace["base"] = base
        out["workspace"] = workspace
    if params:
        current = document.get("params")
        if current is not None and not isinstance(current, dict):
            raise DagError("params must be an object of at most 100 parameters", field="params")
        out["params"] = {**(current or {}), **params}
    return out


def params_from_pairs(pairs: Iterable[str]) -> dict:
    """Run parameters from `NAME=VALUE` strings (`submit --param`, the *Start a run…* form's lines). A value
    is always a string, kept as typed: templates render text, and reading `1.10`, `no` or `0755` as YAML
    would change them. DagError on an entry without `=`, a bad name or a name given twice."""
    params: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise DagError(f"a parameter is NAME=VALUE, not {pair!r}", field="params")
        if name in params:
            raise DagError(f"parameter {name!r} is given twice", field="params")
        params[name] = value
    parse_params(params)
    return params


def parse_task(raw: Any, defaults: dict | None = None) -> TaskSpec:
    """One task's own fields, checked as `parse_document` checks them; not its deps or its templates, which
    only the whole document can check (the editor's rows are checked alone first, then together)."""
    return _parse_task(raw, {**DEFAULTS, **(defaults or {})})


def _parse_task(raw: Any, defaults: dict) -> TaskSpec:
    """One task, every problem of its fields reported at once (its key and shape first: without them there
    is nothing to name the others by)."""
    if not isinstance(raw, dict):
        raise DagError("each task must be an object")
    key = raw.get("key")
    if not isinstance(key, str) or not NAME_RE.fullmatch(key):
        raise DagError(f"task key {key!r} must be 1-64 of [A-Za-z0-9._-]", [str(key)], "key")
    problems = Problems()
    unknown = set(raw) - TASK_FIELDS
    if unknown:
        problems.found.append(DagError(f"task {key!r}: unknown field(s) {', '.join(sorted(unknown))}", [key]))
    executor = raw.get("executor", "shell")
    if executor not in EXECUTORS:
        problems.found.append(
            DagError(f"task {key!r}: executor must be one of {', '.join(EXECUTORS)}", [key], "executor")
        )
    command = problems.take(lambda: _text(raw.get("command"), "command", key))
    prompt = problems.take(lambda: _text(raw.get("prompt"), "prompt", key))
    problems.take(lambda: _check_what_it_runs(raw, key, executor, command, prompt))
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        problems.found.append(DagError(f"task {key!r}: params must be an object", [key], "params"))
    else:
        problems.take(lambda: check_task_params(params, executor, key))
    estimate = raw.get("estimate_s")
    if estimate is not None and (isinstance(estimate, bool) or not isinstance(estimate, int | float) or estimate < 0):
        problems.found.append(DagError(f"task {key!r}: estimate_s must be a number >= 0", [key], "estimate_s"))
    title = problems.take(lambda: _text(raw.get("title"), "title", key)) or key
    if len(title) > 200:
        problems.found.append(DagError(f"task {key!r}: title is longer than 200 characters", [key], "title"))
    deps = problems.take(lambda: _names(raw.get("deps"), "deps", key, limit=10_000), [])
    requires = problems.take(lambda: _names(raw.get("requires"), "requires", key), [])
    numbers = _task_numbers(raw, key, executor, defaults, problems)
    problems.raise_any()
    return TaskSpec(
        key=key, title=title, deps=deps, requires=requires, executor=executor, command=command, prompt=prompt,
        params=params, estimate_s=float(estimate) if estimate is not None else None, **numbers,
    )  # fmt: skip


def _check_what_it_runs(raw: dict, key: str, executor: str, command: str | None, prompt: str | None) -> None:
    """A shell task's command, an AI task's prompt; nothing an agent would need on an approval task."""
    if executor == "shell" and not command:
        raise DagError(f"task {key!r}: a shell task needs a command", [key], "command")
    if executor in ("claude", "codex") and not prompt:
        raise DagError(f"task {key!r}: a {executor} task needs a prompt", [key], "prompt")
    if executor == APPROVAL_EXECUTOR:
        # No agent runs it: what an agent would need has no meaning here (the prompt is the question asked).
        given = sorted(f for f in ("command", "requires", "params") if raw.get(f))
        if given:
            raise DagError(f"task {key!r}: an approval task takes no {', '.join(given)}", [key], given[0])


def _task_numbers(raw: dict, key: str, executor: str, defaults: dict, problems: Problems) -> dict[str, int]:
    """priority, max_attempts, timeout_s and retry_delay_s, each checked (a bad one noted, 0 in its place)."""
    timeout = APPROVAL_TIMEOUT_S if executor == APPROVAL_EXECUTOR else defaults["timeout_s"]
    given = {"priority": 0, **defaults, "timeout_s": timeout}
    return {
        name: problems.take(partial(_int, raw.get(name, given[name]), name, lo, hi, key), 0)
        for name, (lo, hi) in TASK_NUMBERS.items()
    }


def topological_order(deps: dict[str, list[str]]) -> list[str]:
    """Kahn's algorithm, stable in the input order; a cycle raises DagError naming it in order."""
    indegree = {k: len(v) for k, v in deps.items()}
    dependents: dict[str, list[str]] = {k: [] for k in deps}
    for k, ds in deps.items():
        for d in ds:
            dependents[d].append(k)
    queue = [k for k, n in indegree.items() if n == 0]
    order: list[str] = []
    i = 0
    while i < len(queue):
        k = queue[i]
        i += 1
        order.append(k)
        for child in dependents[k]:
            indegree[child] -= 1
            if indegree[child] == 0:
                queue.append(child)
    if len(order) != len(deps):
        cycle = find_cycle({k: v for k, v in deps.items() if indegree[k] > 0})
        raise DagError(f"dependency cycle: {' -> '.join(cycle)}", cycle, "deps")
    return order


def find_cycle(deps: dict[str, list[str]]) -> list[str]:
    """One cycle among `deps` (every node of which lies on or leads into a cycle), first key repeated last."""
    start = next(iter(deps))
    seen: dict[str, int] = {}
    path: list[str] = []
    node = start
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = next(d for d in deps[node] if d in deps)
    # `path` follows "depends on" edges; report it in execution order (upstream first).
    cycle = path[seen[node] :] + [node]
    return list(reversed(cycle))


def _annotate(dag: Dag) -> None:
    """Depth = longest chain of dependencies above a task; critical path = longest estimate chain below it."""
    by_key = dag.by_key()
    for spec in dag.tasks:
        spec.depth = max((by_key[d].depth + 1 for d in spec.deps), default=0)
    dependents: dict[str, list[str]] = {t.key: [] for t in dag.tasks}
    for spec in dag.tasks:
        for d in spec.deps:
            dependents[d].append(spec.key)
    for spec in reversed(dag.tasks):
        below = max((by_key[c].critical_path_s for c in dependents[spec.key]), default=0.0)
        spec.critical_path_s = (spec.estimate_s or 0.0) + below


def critical_path(dag: Dag) -> tuple[float, list[str]]:
    """The longest chain of estimates through the DAG: (its length in seconds, its keys in order)."""
    by_key = dag.by_key()
    dependents: dict[str, list[str]] = {t.key: [] for t in dag.tasks}
    for spec in dag.tasks:
        for d in spec.deps:
            dependents[d].append(spec.key)
    roots = [t for t in dag.tasks if not t.deps]
    if not roots:
        return 0.0, []
    node = max(roots, key=lambda t: t.critical_path_s)
    total, chain = node.critical_path_s, [node.key]
    while dependents[node.key]:
        node = max((by_key[c] for c in dependents[node.key]), key=lambda t: t.critical_path_s)
        chain.append(node.key)
    return total, chain


def document_schema() -> dict:
    """The document as JSON Schema (the OpenAPI description of `POST /api/v1/runs`), from the tables the
    checks above use. It describes shapes; what only the whole document can tell (a cycle, an unknown
    dependency, a shell task without a command, a template's reference) is a 422 naming the task."""
    name = {"type": "string", "pattern": f"^(?:{NAME_RE.pattern})$"}
    names = {"type": "array", "items": name, "maxItems": 32}
    ai_params = {
        "type": "object",
        "description": "free-form for shell and simulated tasks; for claude and codex, one of these",
        "properties": {k: rule.schema for rules in AI_PARAMS.values() for k, rule in rules.items()},
    }
    numbers = {k: {"type": "integer", "minimum": lo, "maximum": hi} for k, (lo, hi) in TASK_NUMBERS.items()}
    task_properties = {
        "key": name,
        "title": {"type": "string", "maxLength": 200},
        "deps": {**names, "maxItems": 10_000},
        "requires": names,
        "executor": {"enum": list(EXECUTORS), "default": "shell"},
        "command": {"type": ["string", "null"]},
        "prompt": {"type": ["string", "null"]},
        "params": ai_params,
        "estimate_s": {"type": ["number", "null"], "minimum": 0},
        **numbers,
    }
    assert set(task_properties) == TASK_FIELDS  # one list of fields: a new one is described or this fails
    # What each executor needs (_check_what_it_runs): a shell task a command, an AI task a prompt.
    needs = [
        {"if": {"properties": {"executor": {"const": executor}}, **({"required": ["executor"]} if executor != "shell"
                                                                    else {})},
         "then": {"required": [what], "properties": {what: {"type": "string", "minLength": 1}}}}
        for executor, what in (("shell", "command"), ("claude", "prompt"), ("codex", "prompt"))
    ]  # fmt: skip
    task = {"type": "object", "required": ["key"], "additionalProperties": False, "properties": task_properties,
            "allOf": needs}  # fmt: skip
    param_value = {"type": ["string", "number", "boolean", "null"]}
    properties = {
        "name": {"type": "string", "minLength": 1, "maxLength": 128},
        "description": {},
        "max_parallel": {"type": ["integer", "null"], "minimum": 1, "maximum": 100_000},
        "priority": numbers["priority"],
        "defaults": {
            "type": "object",
            "additionalProperties": False,
            "properties": {k: {**numbers[k], "default": v} for k, v in DEFAULTS.items()},
        },
        "tasks": {"type": "array", "items": task, "minItems": 1, "maxItems": 20_000},
        "workspace": {
            "type": ["object", "null"],
            "required": ["repo"],
            "additionalProperties": False,
            "properties": {
                "repo": {"type": "string", "minLength": 1, "maxLength": 2000},
                "base": {"type": "string", "pattern": f"^(?:{REF_RE.pattern})$"},
                "branch_prefix": {"type": "string", "pattern": f"^(?:{BRANCH_PREFIX_RE.pattern})$"},
            },
        },
        "params": {"type": ["object", "null"], "maxProperties": 100, "additionalProperties": param_value},
        "max_cost_usd": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": MAX_COST_USD},
    }
    assert set(properties) == DOC_FIELDS
    return {
        "type": "object",
        "required": ["name", "tasks"],
        "additionalProperties": False,
        "properties": properties,
    }
