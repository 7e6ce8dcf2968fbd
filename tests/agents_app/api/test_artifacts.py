"""POST /api/v1/attempts/ID/artifacts: uploads, their checksum, stale attempts, limits, names."""

from __future__ import annotations

import hashlib
import uuid

import pytest

from tests.agents_app.api.common import MIB
from tests.conftest import assert_error, ok


def test_artifact_upload_answers_201_with_a_matching_sha256(server, enroll, run_of):
    from tasks_app.models import Artifact

    run_of({"key": "a"})
    agent = enroll()
    attempt = agent.claim_one()
    content = b"report line\n" * 1000 + bytes(range(256))
    body = ok(agent.upload(attempt["attempt_id"], {"file": ("report.txt", content)}), 201)
    assert set(body) == {"artifact_id", "name", "size", "sha256"}
    assert (body["name"], body["size"], body["sha256"]) == ("report.txt", len(content),
                                                            hashlib.sha256(content).hexdigest())  # fmt: skip
    stored = Artifact.objects.get(pk=body["artifact_id"])
    assert bytes(stored.content) == content
    assert str(stored.task_id) == attempt["task"]["id"]


def test_artifact_upload_for_a_stale_attempt_is_409(server, enroll, run_of):
    from tasks_app.models import Artifact

    run_of({"key": "a"})
    agent, stranger = enroll("owner"), enroll("stranger")
    attempt = agent.claim_one()
    assert_error(stranger.upload(attempt["attempt_id"], {"file": ("x.txt", b"x")}), 409, "stale_attempt")
    ok(agent.complete(attempt["attempt_id"]))
    assert_error(agent.upload(attempt["attempt_id"], {"file": ("x.txt", b"x")}), 409, "stale_attempt")
    assert not Artifact.objects.exists()


def test_artifact_upload_for_an_unknown_attempt_is_404(server, enroll):
    agent = enroll()
    assert_error(agent.upload(str(uuid.uuid4()), {"file": ("x.txt", b"x")}), 404, "not_found")


def test_artifact_over_the_limit_is_413(server, enroll, run_of):
    from tasks_app.models import Artifact

    run_of({"key": "a"})
    agent = enroll()
    attempt = agent.claim_one()
    assert_error(agent.upload(attempt["attempt_id"], {"file": ("big.bin", b"\0" * (10 * MIB + 1))}), 413, "too_large")
    assert not Artifact.objects.exists()
    body = ok(agent.upload(attempt["attempt_id"], {"file": ("max.bin", b"\1" * (10 * MIB))}), 201)
    assert body["size"] == 10 * MIB


CONTROLS = ["bad\x00name.txt", "report\r.txt", "two\nlines.txt", "tab\there", "del\x7f", "c1\x85"]


@pytest.mark.parametrize("name", CONTROLS)
def test_an_artifact_name_with_a_control_character_is_400_and_nothing_is_stored(server, enroll, run_of, name):
    from agents_app.cp_agent import encode_artifact
    from tasks_app.models import Artifact

    run_of({"key": "a"})
    agent = enroll()
    attempt = agent.claim_one()
    raw, content_type = encode_artifact(name, b"x")
    path = f"/api/v1/attempts/{attempt['attempt_id']}/artifacts"
    assert_error(agent.post(path, raw=raw, headers={"Content-Type": content_type}), 400, "bad_request", "control")
    assert not Artifact.objects.exists()
    fine = "out/résumé – final.txt"  # any other Unicode is a fine name
    raw, content_type = encode_artifact(fine, b"x")
    assert ok(agent.post(path, raw=raw, headers={"Content-Type": content_type}), 201)["name"] == fine


def test_artifact_upload_without_the_file_field_is_400(server, enroll, run_of):
    run_of({"key": "a"})
    agent = enroll()
    attempt = agent.claim_one()
    path = f"/api/v1/attempts/{attempt['attempt_id']}/artifacts"
    assert_error(agent.upload(attempt["attempt_id"], {"other": ("x.txt", b"x")}), 400, "bad_request")
    assert_error(agent.post(path, {"file": "x"}), 400, "bad_request")  # JSON, not multipart
