"""Templates in a task's `prompt` and `command` (PROTOCOL.md v1.1): `${params.NAME}`, `${deps.KEY.output}`,
`${deps.KEY.commit}`, `${run.id}`; `$$` is a literal `$`.

Only those three namespaces are templates: any other `${...}` (a shell's `${HOME}`) is left as it is, so
shell commands keep working. A reference the document cannot satisfy (a key outside the task's deps, a
parameter the run does not define, a field other than output/commit) is refused at submit; rendering happens
when the task is assigned, with its dependencies' results. Pure functions, no ORM.
"""

from __future__ import annotations

import re

# `$$`, or `${namespace.rest}` for one of our namespaces; anything else is not ours.
TOKEN_RE = re.compile(r"\$\$|\$\{(params|deps|run)\.([^}]*)\}")
DEP_FIELDS = ("output", "commit")


class TemplateError(ValueError):
    """A reference the document cannot satisfy; the message names it."""


def references(text: str | None) -> list[tuple[str, str]]:
    """(namespace, rest) of every template reference in `text`."""
    return [(m.group(1), m.group(2)) for m in TOKEN_RE.finditer(text or "") if m.group(1)]


def check(text: str | None, deps: list[str], params: dict) -> None:
    """Raise TemplateError naming the first reference `text` cannot have."""
    for namespace, rest in references(text):
        ref = f"${{{namespace}.{rest}}}"
        if namespace == "params":
            if rest not in params:
                raise TemplateError(f"{ref} names no parameter of the run")
        elif namespace == "run":
            if rest != "id":
                raise TemplateError(f"{ref}: only ${{run.id}} is defined")
        else:
            key, _, what = rest.rpartition(".")
            if what not in DEP_FIELDS or not key:
                raise TemplateError(f"{ref}: write ${{deps.KEY.output}} or ${{deps.KEY.commit}}")
            if key not in deps:
                raise TemplateError(f"{ref} names {key!r}, which is not one of this task's deps")


def render(text: str | None, *, params: dict, inputs: dict, run_id: str) -> str | None:
    """`text` with every reference replaced (a dependency's missing commit renders empty)."""
    if text is None or "$" not in text:
        return text

    def value(m: re.Match) -> str:
        namespace, rest = m.group(1), m.group(2)
        if namespace is None:
            return "$"
        if namespace == "params":
            v = params.get(rest, "")
            return v if isinstance(v, str) else _scalar(v)
        if namespace == "run":
            return run_id
        key, _, what = rest.rpartition(".")
        return str((inputs.get(key) or {}).get(what) or "")

    return TOKEN_RE.sub(value, text)


def _scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "" if v is None else str(v)
