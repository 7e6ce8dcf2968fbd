"""The task page's log and result as a person reads them: every attempt's log (a tab each, the latest first),
the result as pretty-printed JSON without what the log shows already, an AI CLI's final message as text, and
everything an agent sent escaped."""

import html
import json

import pytest

from tasks_app import actions
from tasks_app.models import Task
from tests.conftest import doc

pytestmark = pytest.mark.django_db
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def attempt(agent, log, outcome="failed", result=None, error="boom", exit_code=1):
    (got,) = actions.claim_ready_tasks(agent, 1)
    actions.record_progress(agent, got["attempt_id"], 0.5, "working", log)
    actions.complete_attempt(agent, got["attempt_id"], outcome, result or {}, error if outcome == "failed" else "",
                             exit_code)  # fmt: skip
    return got


def test_every_attempts_log_is_on_the_task_page_the_latest_shown(submit, make_agent, viewer):
    agent = make_agent("sh-1", labels=[])
    run = submit(doc({"key": "flaky", "max_attempts": 3, "retry_delay_s": 0}))
    attempt(agent, "first try\nTraceback: first failure\n")
    attempt(agent, "second try\nall good\n", outcome="succeeded", exit_code=0)
    page = viewer.get(f"/tasks/{Task.objects.get(run=run).id}/").content.decode()
    assert page.count('role="tab"') == 2 and 'data-log-tab="1"' in page and 'data-log-tab="2"' in page
    latest, earlier = page.index('<pre class="log" id="log-2"'), page.index('<pre class="log" id="log-1"')
    assert latest < earlier  # the latest first, shown; the earlier one hidden until its tab is chosen
    assert page[latest:].split("</pre>", 1)[0].endswith('aria-labelledby="log-tab-2">second try\nall good\n')
    assert page[earlier:].split("</pre>", 1)[0].endswith('aria-labelledby="log-tab-1" hidden>first try\n'
                                                         "Traceback: first failure\n")  # fmt: skip


def test_a_single_attempt_has_no_tabs(submit, make_agent, viewer):
    agent = make_agent("sh-1", labels=[])
    run = submit(doc({"key": "once"}))
    attempt(agent, "only\n", outcome="succeeded", exit_code=0)
    page = viewer.get(f"/tasks/{Task.objects.get(run=run).id}/").content.decode()
    assert 'role="tab"' not in page and 'data-testid="log">only\n</pre>' in page


def test_the_result_is_pretty_json_without_the_stdout_the_log_shows(submit, make_agent, viewer):
    agent = make_agent("sh-1", labels=[])
    run = submit(doc({"key": "build", "executor": "shell", "command": "make"}))
    attempt(agent, "compiling\n", outcome="succeeded", exit_code=0,
            result={"exit_code": 0, "stdout_tail": "compiling\n", "files": ["a.o", "b.o"]})  # fmt: skip
    page = viewer.get(f"/tasks/{Task.objects.get(run=run).id}/").content.decode()
    shown = page.split('data-testid="result">', 1)[1].split("</pre>", 1)[0]
    assert json.loads(html.unescape(shown)) == {"exit_code": 0, "files": ["a.o", "b.o"]}
    assert "\n  &quot;files&quot;: [\n    &quot;a.o&quot;,\n" in shown  # indented, one value a line
    assert "stdout_tail" not in shown and "Not repeated here: stdout_tail (in the log)." in page
    assert "{'exit_code'" not in page  # not a Python dict


def test_an_ai_tasks_final_message_is_text(submit, make_agent, viewer):
    agent = make_agent("cc-1", labels=[])
    run = submit(doc({"key": "write", "executor": "claude", "prompt": "Write it."}))
    result = {"output": "Done.\nI wrote README.md.", "exit_code": 0, "session_id": "s-1", "turns": 3}
    attempt(agent, "{...events...}\n", outcome="succeeded", exit_code=0, result=result)
    page = viewer.get(f"/tasks/{Task.objects.get(run=run).id}/").content.decode()
    assert 'data-testid="final-message">Done.\nI wrote README.md.</pre>' in page
    shown = page.split('data-testid="result">', 1)[1].split("</pre>", 1)[0]
    assert "output" not in shown and "&quot;turns&quot;: 3" in shown


def test_a_hostile_log_result_and_message_stay_escaped(submit, make_agent, viewer):
    agent = make_agent("evil-1", labels=[])
    run = submit(doc({"key": "evil", "executor": "claude", "prompt": "x", "max_attempts": 2, "retry_delay_s": 0}))
    attempt(agent, HOSTILE + "\n", error=HOSTILE)
    attempt(agent, HOSTILE, outcome="succeeded", exit_code=0, result={"output": HOSTILE, HOSTILE: [HOSTILE]})
    page = viewer.get(f"/tasks/{Task.objects.get(run=run).id}/").content.decode()
    assert "<script>alert" not in page and "<img src=x" not in page
    assert page.count("&lt;script&gt;alert(") >= 5  # both logs, the final message, the result's key and value
