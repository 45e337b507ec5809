"""Stub engine model; the adapter lives in orchestrator/stub_engine/triton_model.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root holds `orchestrator`

from orchestrator.stub_engine.triton_model import TritonPythonModel  # noqa: F401
