"""The project as a whole: its models and migrations agree, and the code is as ruff and mypy want it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.django_db
def test_every_model_change_has_its_migration():
    call_command("makemigrations", "--check", "--dry-run", verbosity=0)  # exits 1 when one is missing


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff_is_content(args):
    ruff = Path(sys.executable).with_name("ruff")
    done = subprocess.run([str(ruff), *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_finds_no_errors():
    """mypy with django-stubs over the modules [tool.mypy] in pyproject.toml names (the state machine, the DAG,
    the transitions, the scheduler's queries and the agent daemon)."""
    # The django-stubs plugin runs django.setup() on the settings; that connects to no database.
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
