"""The executor names, written in three places that cannot share one definition: the daemon
(cp_agent.KNOWN_EXECUTORS, a stdlib-only file that imports nothing of the server), the DAG documents
(dag.EXECUTORS, with the approval executor only the server has) and the task column's choices
(models.EXECUTORS, SYSTEM_EXECUTORS, literal so that migrations do not move with the code)."""

from agents_app import cp_agent
from agents_app.preflight import EXECUTOR_RE
from tasks_app import dag, models, workspaces
from tasks_app.states import APPROVAL_EXECUTOR


def test_the_daemon_runs_every_executor_the_server_hands_agents_and_no_other():
    handed_to_agents = (set(dag.EXECUTORS) - {APPROVAL_EXECUTOR}) | set(models.SYSTEM_EXECUTORS)
    assert set(cp_agent.KNOWN_EXECUTORS) == handed_to_agents == set(models.AGENT_EXECUTORS)
    assert APPROVAL_EXECUTOR not in cp_agent.KNOWN_EXECUTORS  # a person runs it, never an agent


def test_the_task_columns_choices_are_the_documents_executors_and_the_servers_own():
    assert models.EXECUTORS == dag.EXECUTORS
    assert APPROVAL_EXECUTOR in models.EXECUTORS
    assert models.SYSTEM_EXECUTORS == (workspaces.RESULT_EXECUTOR,)


def test_every_executor_name_is_one_an_agent_may_declare():
    for name in set(cp_agent.KNOWN_EXECUTORS) | set(dag.EXECUTORS):
        assert EXECUTOR_RE.fullmatch(name) and len(name) <= 16, name
