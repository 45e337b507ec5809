"""The `disagg` command as a user runs it: the entry point the set-up installs in the venv."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.tools.cli import COMMANDS, main

DISAGG = Path(sys.executable).parent / "disagg"


def test_help_lists_every_subcommand() -> None:
    done = subprocess.run([str(DISAGG), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert all(name in done.stdout for name in COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_subcommand_has_its_own_help(name: str) -> None:
    done = subprocess.run([str(DISAGG), name, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"disagg {name}" in done.stdout and "Traceback" not in done.stderr


def test_an_unknown_subcommand_says_what_exists(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sevre"]) == 2
    err = capsys.readouterr().err
    assert "unknown subcommand 'sevre'" in err and "serve" in err
