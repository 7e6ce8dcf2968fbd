"""The real Claude Code and Codex CLIs, as the tests run them: the npm packages pinned in package.json
(installed into node_modules/ by `./run test` and `.ci/run`), pointed at the scripted model API stand-in
(tests/model_api.py) on loopback, each in a fresh home of its own so nothing leaks between tests.

Neither CLI may need the internet: Claude Code's non-essential traffic (auto-update, telemetry, error
reports) is switched off by its documented variables, codex's plugin sync (GitHub) and analytics by its
config.toml. `test_*_reach_nothing_but_the_stand_in` checks it with strace.

    def test_x(tmp_path, model_api):
        model_api.script(tool_call("Write", {...}), text("Done."))
        run = run_cli(claude_command(session_id), claude_env(tmp_path, model_api), cwd, "the prompt")
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.model_api import ModelAPI

ROOT = Path(__file__).resolve().parent.parent
NODE_BIN = ROOT / "node_modules" / ".bin"
CLAUDE = NODE_BIN / "claude"
CODEX = NODE_BIN / "codex"
# The one key the stand-in accepts, in every form a CLI sends it (x-api-key, Bearer, an OAuth token).
TEST_API_KEY = "sk-ant-oat01-cp-test-key"
CODEX_PROVIDER = "standin"

# Claude Code's documented switches: no auto-update, telemetry or error reports, nothing but the model API.
CLAUDE_QUIET = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
}


def cli_binary(path: Path) -> str:
    """The binary's path; a missing one fails the test (never skips it): the suite installs them."""
    if not os.access(path, os.X_OK):
        pytest.fail(
            f"{path.name} is not installed at {path}: `./run test` and `.ci/run` install the pinned CLIs "
            "(package.json) with `npm ci`; run `npm ci --no-audit --no-fund` in the checkout",
            pytrace=False,
        )
    return str(path)


def pinned_versions() -> dict[str, str]:
    """package.json's exact versions, by package name."""
    return json.loads((ROOT / "package.json").read_text())["dependencies"]


def _base_env(tmp_path: Path) -> dict[str, str]:
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir(exist_ok=True)
    tmp.mkdir(exist_ok=True)
    # TMPDIR of its own: codex refuses to put its helper links (apply_patch) in a CODEX_HOME under $TMPDIR.
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8", "TMPDIR": str(tmp)}


def claude_env(
    tmp_path: Path, model_api: ModelAPI, *, api_key: str | None = TEST_API_KEY, oauth: bool = False, max_retries=0
) -> dict[str, str]:
    """Claude Code's whole environment: a fresh CLAUDE_CONFIG_DIR and HOME, ANTHROPIC_BASE_URL at the
    stand-in, the key as ANTHROPIC_API_KEY (or, with `oauth`, as a subscription's CLAUDE_CODE_OAUTH_TOKEN,
    which is what makes Claude Code report usage limits as rate_limit_event); `api_key=None` is not logged
    in. CLAUDE_CODE_MAX_RETRIES is 0 by default: a failing request fails the run at once."""
    env = {
        **_base_env(tmp_path),
        **CLAUDE_QUIET,
        "CLAUDE_CONFIG_DIR": str(tmp_path / "claude-config"),
        "ANTHROPIC_BASE_URL": model_api.url,
    }
    if api_key is not None:
        env["CLAUDE_CODE_OAUTH_TOKEN" if oauth else "ANTHROPIC_API_KEY"] = api_key
    if max_retries is not None:
        env["CLAUDE_CODE_MAX_RETRIES"] = str(max_retries)
    return env


def codex_config(model_api: ModelAPI, *, login: bool = False, request_max_retries=0, stream_max_retries=0) -> str:
    """codex's config.toml: a model provider at the stand-in speaking the Responses API over HTTP (custom
    providers never try WebSockets; the built-in openai provider does, for 7 s, before falling back). Its key
    comes from OPENAI_API_KEY (`env_key`), or with `login` from `codex login --with-api-key`'s auth.json
    (`requires_openai_auth`), the one `codex login status` can see. Retries are 0 by default (codex's own
    are 4 per request and 5 per stream: 30 requests over ~25 s on a 500)."""
    auth = "requires_openai_auth = true" if login else 'env_key = "OPENAI_API_KEY"'
    return f"""\
model = "gpt-5.5"
model_provider = "{CODEX_PROVIDER}"
check_for_update_on_startup = false

[model_providers.{CODEX_PROVIDER}]
name = "model API stand-in"
base_url = "{model_api.url}/v1"
wire_api = "responses"
{auth}
request_max_retries = {request_max_retries}
stream_max_retries = {stream_max_retries}

[features]
plugins = false  # else it syncs curated plugins from GitHub at start

[analytics]
enabled = false  # else it posts analytics events
"""


def codex_env(
    tmp_path: Path, model_api: ModelAPI, *, api_key: str | None = TEST_API_KEY, login: bool = False, **retries
) -> dict[str, str]:
    """codex's whole environment: a fresh CODEX_HOME holding `codex_config(...)`, and HOME. With `login`
    the key is stored by `codex login --with-api-key` instead of passed as OPENAI_API_KEY; `api_key=None`
    is not logged in."""
    codex_home = tmp_path / "codex-home"
    codex_home.mkdir(exist_ok=True)
    (codex_home / "config.toml").write_text(codex_config(model_api, login=login, **retries))
    env = {**_base_env(tmp_path), "CODEX_HOME": str(codex_home)}
    if api_key is not None and login:
        login_command = [cli_binary(CODEX), "login", "--with-api-key"]
        subprocess.run(login_command, input=api_key, env=env, check=True, capture_output=True, text=True)
    elif api_key is not None:
        env["OPENAI_API_KEY"] = api_key
    return env


def claude_command(session_id: str, permission_mode: str | None = "acceptEdits", *extra: str) -> list[str]:
    """`claude -p` streaming JSON events; the prompt goes on stdin. `permission_mode=None` is the default
    mode, which denies what would need a person's approval."""
    mode = ["--permission-mode", permission_mode] if permission_mode else []
    return [
        cli_binary(CLAUDE), "-p", "--output-format", "stream-json", "--verbose", *mode,
        "--session-id", session_id, *extra,
    ]  # fmt: skip


def codex_command(
    workdir: Path, last_message: Path, sandbox: str = "workspace-write", git: bool = True, *extra: str
) -> list[str]:
    """`codex exec --json` in `workdir`, never asking for approval, the final message written to
    `last_message`, the prompt read from stdin (`-`); outside a git repository (`git=False`) it needs
    --skip-git-repo-check."""
    skip = [] if git else ["--skip-git-repo-check"]
    return [
        cli_binary(CODEX), "-a", "never", "exec", "--json", "-s", sandbox, *skip,
        "-C", str(workdir), "-o", str(last_message), *extra, "-",
    ]  # fmt: skip


@dataclass
class CliRun:
    """A finished CLI process: exit code, output, wall time, and stdout's JSON lines as `events`."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    events: list[dict] = field(default_factory=list)

    def of(self, type_: str, subtype: str | None = None) -> list[dict]:
        return [e for e in self.events if e.get("type") == type_ and (subtype is None or e.get("subtype") == subtype)]

    @property
    def result(self) -> dict:
        """Claude's final `result` event."""
        results = self.of("result")
        assert results, f"no result event (exit {self.returncode}):\n{self.stdout[-2000:]}\n{self.stderr[-2000:]}"
        return results[-1]

    def __str__(self) -> str:  # for assertion messages
        output = f"--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-2000:]}"
        return f"exit {self.returncode} in {self.seconds:.1f} s\n{output}"


def run_cli(command: list[str], env: dict[str, str], cwd: Path, prompt: str, timeout: float = 60) -> CliRun:
    """Run a CLI to the end in its own process group with `prompt` on stdin; past `timeout` the whole group
    is killed and the test fails."""
    started = time.monotonic()
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(prompt, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{Path(command[0]).name} ran past {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    events = []
    for line in stdout.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass  # claude and codex write only JSON lines to stdout in these modes; anything else is kept in stdout
    return CliRun(proc.returncode, stdout, stderr, time.monotonic() - started, events)


@pytest.fixture
def model_api():
    """The model API stand-in on a free loopback port, accepting TEST_API_KEY only."""
    api = ModelAPI(api_key=TEST_API_KEY).start()
    yield api
    api.stop()
