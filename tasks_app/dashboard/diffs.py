"""A task's diff for the dashboard: a unified diff (what `git diff` prints) read into files and lines, cut to
a size a page can show. Pure functions; the text is the agent's, so the templates escape every line."""

from __future__ import annotations

from dataclasses import dataclass, field

SHOW_MAX_LINES = 4000  # over all files; the whole patch stays downloadable


@dataclass
class FileDiff:
    path: str
    old_path: str = ""
    status: str = "modified"  # added, deleted, renamed, modified, binary
    added: int = 0
    removed: int = 0
    lines: list[tuple[str, str]] = field(default_factory=list)  # (kind: add|del|ctx|hunk, text)
    cut: bool = False


def parse(text: str, max_lines: int = SHOW_MAX_LINES) -> tuple[list[FileDiff], bool]:
    """(files, cut): every file of the diff with its counts; lines kept up to `max_lines` in all."""
    files: list[FileDiff] = []
    current: FileDiff | None = None
    shown = 0
    cut = False
    for line in text.splitlines():
        if line.startswith("diff --git "):
            a, _, b = line[len("diff --git ") :].partition(" b/")
            current = FileDiff(path=b or a.removeprefix("a/"), old_path=a.removeprefix("a/"))
            files.append(current)
            continue
        if current is None or _read_header(current, line):
            continue
        kind = {"+": "add", "-": "del", "@": "hunk"}.get(line[:1], "ctx")
        if kind == "add":
            current.added += 1
        elif kind == "del":
            current.removed += 1
        if shown < max_lines:
            current.lines.append((kind, line))
            shown += 1
        else:
            current.cut = cut = True
    return files, cut


def _read_header(current: FileDiff, line: str) -> bool:
    """A file's header line (mode, rename, binary, ---/+++, index) read into `current`: True; else False."""
    if line.startswith("new file mode"):
        current.status = "added"
    elif line.startswith("deleted file mode"):
        current.status = "deleted"
    elif line.startswith("rename from "):
        current.status, current.old_path = "renamed", line[len("rename from ") :]
    elif line.startswith("rename to "):
        current.path = line[len("rename to ") :]
    elif line.startswith("Binary files "):
        current.status = "binary"
    elif not line.startswith(("--- ", "+++ ", "index ", "similarity index", "old mode", "new mode")):
        return False
    return True
