"""Where an agent may be installed on a host: the rule that both a host's form (models) and deploy (provision)
apply. It is a module of its own so that the models, imported by every process of the server, do not import
provision and, with it, asyncssh (~130 ms at each start)."""

from __future__ import annotations


def remote_dir_problem(path: str) -> str:
    """Why `path` cannot be an install folder ("" when it can): it must be a folder of its own, never the
    login's home or one holding it, whose files uninstall would then go through."""
    rest = path.removeprefix("~/")
    parts = [p for p in rest.split("/") if p]
    if not parts or rest in ("~",):
        return "name a folder of its own (e.g. cp-agent), not the home folder itself"
    if any(p in (".", "..") for p in parts):
        return "'.' and '..' are not folder names here: name a folder of its own (e.g. cp-agent)"
    if rest.startswith("/") and (len(parts) < 2 or parts[0] in ("home", "Users") and len(parts) == 2):
        return f"{path} is a system folder or a home folder: name a folder of its own (e.g. /opt/cp-agent)"
    return ""
