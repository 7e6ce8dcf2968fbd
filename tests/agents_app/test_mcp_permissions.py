"""Claude Code asks, a person answers, in real time (issue 11, item 2): the real claude CLI, run by the real
daemon against the real server, asks its --permission-prompt-tool (the daemon's own MCP relay) about a Bash
command it was not given; the daemon creates an input request and long-polls; an operator answers over the
API; claude runs the command (allow) or is told no in the person's words (deny); nobody answering within
params.input_timeout_s denies. The model API stand-in is the only thing stood in for.

The commands are ones Claude Code asks about in acceptEdits mode (a python3 one-liner; it lets `echo x > f`
through as an edit in the working directory)."""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission
from playwright.sync_api import expect, sync_playwright

from tasks_app.models import Attempt, InputRequest, Run
from tasks_app.states import AttemptState, RunState
from tests.agents_app.test_daemon_workspaces import ended, files_on
from tests.conftest import doc, http, ok, wait_for
from tests.model_api import ModelAPI, Received, text, tool_call
from tests.real_clis import CLAUDE, TEST_API_KEY, claude_env, cli_binary

pytestmark = pytest.mark.django_db(transaction=True)

PROMPT_TOOL = "mcp__cp_agent__permission_prompt"
WRITE_HELLO = "python3 -c \"open('hello.txt', 'w').write('hi')\""


class TimedModelAPI(ModelAPI):
    """The stand-in, each request stamped with its arrival (time.monotonic())."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.arrived: dict[int, float] = {}

    def _record(self, received: Received) -> None:
        self.arrived[id(received)] = time.monotonic()
        super()._record(received)

    def arrival(self, received: Received) -> float:
        return self.arrived[id(received)]


@pytest.fixture
def model_api():
    api = TimedModelAPI(api_key=TEST_API_KEY).start()
    yield api
    api.stop()


@pytest.fixture
def people_browser(live_server_proc, django_user_model):
    """people_browser(): a Chromium page logged in as an operator, on the overview."""
    from tests.tasks_app.dashboard.test_browser import CHROMIUM_ARGS, login

    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"  # Playwright's loop on this thread; the ORM calls are sync
    operator = django_user_model.objects.create_user("olga", password="pw-olga-12345")
    operator.user_permissions.add(Permission.objects.get(codename="operate_run"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield lambda: login(browser, live_server_proc, ("olga", "pw-olga-12345"))
        browser.close()
    os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)


@pytest.fixture
def claude_agent(fleet, model_api, tmp_path):
    """A daemon running the real claude, with a claude config dir of its own."""

    def start(name: str = "asker-1"):
        home = tmp_path / name
        home.mkdir()
        env = {**claude_env(home, model_api), "CP_CLAUDE_BIN": cli_binary(CLAUDE)}
        return fleet(name, [], executors=("shell", "claude"), env=env)

    return start


def submit(server, token: str, task: dict, **extra) -> str:
    """Submit a one-task document, one attempt at most."""
    document = doc({"max_attempts": 1, **task}, **extra)
    return ok(http("POST", f"{server.url}/api/v1/runs", document, token=token), 201)["run_id"]


def pending_request(run_id, after: int = 0, timeout: float = 60) -> InputRequest:
    """The run's next input request (the `after`+1-th), once the daemon has made it."""

    def found():
        asked = list(InputRequest.objects.filter(run_id=run_id).order_by("created_at"))
        return asked[after] if len(asked) > after else None

    return wait_for(found, timeout=timeout, interval=0.01, what="claude's permission prompt")


def answer(server, token: str, request: InputRequest, behavior: str, message: str = "") -> dict:
    url = f"{server.url}/api/v1/input-requests/{request.id}/answer"
    return ok(http("POST", url, {"behavior": behavior, "message": message}, token=token))


def relay_processes(under: Path) -> list[int]:
    """The MCP relays now running for agents whose work dirs are under `under` (`cp_agent.py
    --mcp-permissions SOCKET`, started by claude)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--mcp-permissions" in argv and str(under).encode() in argv[-2]:
                found.append(int(proc.name))
    return found


def test_a_person_allows_claudes_command_over_the_api_and_it_runs(
    live_server_proc, operator, model_api, claude_agent, origin, tmp_path
):
    _, token = operator
    url, _shas = origin
    model_api.script(tool_call("Bash", {"command": WRITE_HELLO}), text("Wrote hello.txt."))
    task = {"key": "hello", "executor": "claude", "prompt": "Write hello.txt."}
    run_id = submit(live_server_proc, token, task, workspace={"repo": url, "base": "main"})
    claude_agent()
    asked = pending_request(run_id)
    assert (asked.kind, asked.tool, asked.input, asked.state) == ("permission", "Bash", {"command": WRITE_HELLO},
                                                                  "pending")  # fmt: skip
    assert asked.question == f"May claude use Bash $ {WRITE_HELLO}?"
    attempt = Attempt.objects.get(task__run_id=run_id)
    wait_for(lambda: Attempt.objects.get(pk=attempt.pk).message == f"waiting for a person: Bash $ {WRITE_HELLO}",
             timeout=10, what="the progress message")  # fmt: skip
    tasks = ok(http("GET", f"{live_server_proc.url}/api/v1/runs/{run_id}", token=token))["tasks"]
    assert tasks[0]["awaiting"] == "input" and tasks[0]["state"] == "running"
    # The relay claude started holds no secret of the daemon's: neither its token nor the enrollment token.
    state = json.loads(next((tmp_path / "agents").glob("asker-1.state.json")).read_text())
    relays = relay_processes(tmp_path)
    assert relays, "no MCP relay is running while claude waits"
    for pid in relays:
        seen = Path(f"/proc/{pid}/environ").read_bytes() + Path(f"/proc/{pid}/cmdline").read_bytes()
        assert state["token"].encode() not in seen and b"CP_ENROLLMENT_TOKEN" not in seen
    assert len(model_api.turns) == 1  # claude waits: no tool result has gone back yet
    answer(live_server_proc, token, asked, "allow", "go ahead")
    run = ended(run_id, timeout=60)
    assert run.state == RunState.SUCCEEDED, Attempt.objects.get(pk=attempt.pk).error
    follow_up = model_api.turns[1]
    [result] = follow_up.tool_results()
    assert not result.get("is_error")
    branch = Run.objects.get(pk=run_id).result_branch
    assert "hello.txt" in files_on(Path(url.removeprefix("file://")), branch)
    asked.refresh_from_db()
    assert asked.state == "answered" and asked.answer == {"behavior": "allow", "message": "go ahead"}
    # The model was never offered the prompt tool itself.
    offered = {t.get("name") for r in model_api.turns for t in (r.json or {}).get("tools", [])}
    assert PROMPT_TOOL not in offered
    assert model_api.unscripted == []


def test_a_person_denies_and_claude_is_told_in_their_words(live_server_proc, operator, model_api, claude_agent):
    _, token = operator
    model_api.script(tool_call("Bash", {"command": WRITE_HELLO}), text("Understood, I left it."))
    run_id = submit(live_server_proc, token, {"key": "hello", "executor": "claude", "prompt": "Write hello.txt."})
    claude_agent()
    asked = pending_request(run_id)
    answer(live_server_proc, token, asked, "deny", "not before the release")
    run = ended(run_id, timeout=60)
    [result] = model_api.turns[1].tool_results()
    assert result["is_error"] is True and result["content"] == "not before the release"
    # claude ends its turn normally, with the refusal in its permission_denials: the task did not do what it was
    # asked, and fails saying so, in the person's words.
    attempt = Attempt.objects.get(task__run_id=run_id)
    assert run.state == RunState.FAILED and attempt.state == AttemptState.FAILED
    assert attempt.error == (f"permission_denied: claude was refused 1 tool call(s): $ {WRITE_HELLO} "
                             "(denied: not before the release)")  # fmt: skip


def test_nobody_answering_within_input_timeout_s_denies(live_server_proc, operator, model_api, claude_agent):
    _, token = operator
    model_api.script(tool_call("Bash", {"command": WRITE_HELLO}), text("Nobody said yes."))
    task = {"key": "hello", "executor": "claude", "prompt": "Write hello.txt.", "params": {"input_timeout_s": 2}}
    run_id = submit(live_server_proc, token, task)
    claude_agent()
    asked = pending_request(run_id)
    assert (asked.expires_at - asked.created_at).total_seconds() == pytest.approx(2, abs=0.5)
    started = time.monotonic()
    run = ended(run_id, timeout=60)
    assert time.monotonic() - started < 30
    [result] = model_api.turns[1].tool_results()
    assert result["is_error"] is True and "nobody answered in time (params.input_timeout_s)" in result["content"]
    asked.refresh_from_db()
    assert asked.state == "answered" and asked.answered_by == "system:timeout"
    attempt = Attempt.objects.get(task__run_id=run_id)
    assert run.state == RunState.FAILED and attempt.error.startswith("permission_denied: ")
    assert "nobody answered in time" in attempt.error


def test_allowed_tools_are_never_asked_about(live_server_proc, operator, model_api, claude_agent):
    _, token = operator
    model_api.script(tool_call("Bash", {"command": WRITE_HELLO}), text("Done."))
    task = {"key": "a", "executor": "claude", "prompt": "Write it.", "params": {"allowed_tools": ["Bash"]}}
    run_id = submit(live_server_proc, token, task)
    claude_agent()
    assert ended(run_id, timeout=60).state == RunState.SUCCEEDED
    assert not InputRequest.objects.exists()
    [result] = model_api.turns[1].tool_results()
    assert not result.get("is_error")


def test_on_permission_deny_refuses_at_once_as_before(live_server_proc, operator, model_api, claude_agent):
    _, token = operator
    model_api.script(tool_call("Bash", {"command": WRITE_HELLO}), text("Refused."))
    task = {"key": "d", "executor": "claude", "prompt": "Write it.", "params": {"on_permission": "deny"}}
    run_id = submit(live_server_proc, token, task)
    claude_agent()
    assert ended(run_id, timeout=60).state == RunState.FAILED
    assert Attempt.objects.get(task__run_id=run_id).error.startswith("permission_denied: ")
    assert not InputRequest.objects.exists()
    [refusal] = model_api.turns[1].tool_results()
    assert refusal["is_error"] is True


# 8 in the suite, enough for the bound to fail; bench/input_latency.py asks for 20 and reports the figures.
ANSWERS = int(os.environ.get("CP_BENCH_ANSWERS", "8"))


def percentiles(seconds: list[float]) -> dict:
    ms = sorted(x * 1000 for x in seconds)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 1), "p95_ms": round(p95, 1),
            "min_ms": round(ms[0], 1), "max_ms": round(ms[-1], 1)}  # fmt: skip


def test_an_answer_reaches_claude_within_a_second(live_server_proc, operator, model_api, claude_agent, capsys):
    """From the answer's POST to claude's next request to the model (it ran the command in between), over
    ANSWERS answers in one session; and, for scale, claude's own turn (one request to the next) running the same
    commands unasked (allowed_tools). Both printed (bench/input_latency.py runs this and reports them)."""
    _, token = operator
    commands = [f'python3 -c "print({i})"' for i in range(ANSWERS)]
    model_api.route("[asked]", *[tool_call("Bash", {"command": c}) for c in commands], text("All done."))
    model_api.route("[free]", *[tool_call("Bash", {"command": c}) for c in commands], text("All done."))
    run_id = submit(live_server_proc, token, {"key": "many", "executor": "claude", "prompt": "[asked] Print them."})
    claude_agent()
    latencies, posts, thinking = [], [], random.Random(11)
    for i, command in enumerate(commands):
        asked = pending_request(run_id, after=i)
        assert asked.input == {"command": command}
        before = len(model_api.routed("[asked]"))
        assert before == i + 1
        # A person takes a while to read the question: answering the instant it is made would always land just
        # after the server's first look (it looks every 0.2 s) and always wait the whole interval.
        time.sleep(thinking.uniform(0.2, 0.8))
        posted = time.monotonic()
        answer(live_server_proc, token, asked, "allow")
        posts.append(time.monotonic() - posted)
        resumed = wait_for(lambda n=before: model_api.routed("[asked]")[n:], timeout=30, interval=0.002,
                           what="claude's next model request")[0]  # fmt: skip
        latencies.append(model_api.arrival(resumed) - posted)
    assert ended(run_id, timeout=60).state == RunState.SUCCEEDED
    free = submit(live_server_proc, token, {"key": "free", "executor": "claude", "prompt": "[free] Print them.",
                                            "params": {"allowed_tools": ["Bash"]}})  # fmt: skip
    assert ended(free, timeout=120).state == RunState.SUCCEEDED
    arrivals = [model_api.arrival(r) for r in model_api.routed("[free]")]
    turns = [later - earlier for earlier, later in zip(arrivals, arrivals[1:], strict=False)]
    figures = {"answer_to_resume": percentiles(latencies), "answer_post": percentiles(posts),
               "claude_turn_unasked": percentiles(turns)}  # fmt: skip
    with capsys.disabled():
        print(f"\nINPUT_LATENCY {json.dumps(figures)}")
    assert figures["answer_to_resume"]["p95_ms"] < 1500, figures


def test_a_person_allows_from_the_browser_and_a_hostile_command_stays_inert(
    live_server_proc, operator, model_api, claude_agent, people_browser
):
    """The overview's Waiting for you in Chromium: the command claude asks to run, hostile markup and all, is
    shown as text (no script runs, no element is made of it); Allow is clicked there and the command runs."""
    _, token = operator
    hostile = WRITE_HELLO + " # <img src=x onerror=window.cpOwned=1><script>window.cpOwned=2</script>"
    model_api.script(tool_call("Bash", {"command": hostile}), text("Wrote hello.txt."))
    run_id = submit(live_server_proc, token, {"key": "hello", "executor": "claude", "prompt": "Write hello.txt."})
    page = people_browser()
    expect(page.locator("#live-status")).to_have_text("live", timeout=10_000)
    claude_agent()
    request = page.locator("[data-testid=input-request]")
    expect(request.locator("[data-testid=input-shown]")).to_have_text(hostile, timeout=30_000)
    assert page.evaluate("window.cpOwned === undefined")
    assert page.locator("[data-testid=input-request] img, [data-testid=input-request] script").count() == 0
    request.locator("input[name=message]").fill("fine")
    request.get_by_role("button", name="Allow").click()
    expect(page.locator("#flash .flash")).to_contain_text("Allowed", timeout=5_000)
    assert ended(run_id, timeout=60).state == RunState.SUCCEEDED
    [result] = model_api.turns[1].tool_results()
    assert not result.get("is_error")
    assert InputRequest.objects.get(run_id=run_id).answered_by == "user:olga"
    expect(request).to_have_count(0, timeout=10_000)  # the panel follows, live
