"""Derive model repositories from the committed one: parameter overrides, renamed copies.

A derived model gets its own `config.pbtxt` and a symlink to the source model's version
folder, so the code stays in one place (each `model.py` resolves the symlink to find the
`orchestrator` package). `orchestrator/tools/deploy.py` builds whole deployments on these helpers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_REPOSITORY = REPO_ROOT / "model_repository"
FRONTEND_MODELS = ("ensemble", "preprocessing", "orchestrator", "postprocessing")


def _keeping_quotes(value: str) -> Callable[[re.Match[str]], str]:
    """A replacement that puts `value` between the two captured halves, taken literally."""
    return lambda m: m.group(1) + value + m.group(2)


def _parameter_block(key: str, value: str) -> str:
    return f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}\n'


def set_parameters(pbtxt: str, overrides: Mapping[str, str]) -> str:
    """Set `parameters` string values in a config.pbtxt text (replaced in place or appended)."""
    for key, value in overrides.items():
        pattern = re.compile(
            r'(parameters\s*\{\s*key:\s*"' + re.escape(key) + r'"\s*value:\s*\{\s*string_value:\s*")[^"]*(")'
        )
        pbtxt, count = pattern.subn(_keeping_quotes(value), pbtxt)
        if count == 0:
            pbtxt = pbtxt.rstrip("\n") + "\n" + _parameter_block(key, value)
    return pbtxt


def set_max_batch_size(pbtxt: str, size: int) -> str:
    return re.sub(r"^max_batch_size:\s*\d+", f"max_batch_size: {size}", pbtxt, count=1, flags=re.MULTILINE)


def set_instance_count(pbtxt: str, count: int) -> str:
    """The first instance group's count (our configs have one group)."""
    return re.sub(r"(instance_group\s*\[\s*\{\s*count:\s*)\d+", lambda m: f"{m.group(1)}{count}", pbtxt, count=1)


def rename_model(pbtxt: str, name: str) -> str:
    """Set the model's name, and where a comment line quotes the old name, that too."""
    match = re.search(r'^name:\s*"([^"]*)"', pbtxt, flags=re.MULTILINE)
    if match is None:
        return f'name: "{name}"\n' + pbtxt
    old = f'"{match.group(1)}"'
    lines = [
        line.replace(old, f'"{name}"') if line.startswith("#") else line for line in pbtxt.splitlines(keepends=True)
    ]
    return re.sub(r'^name:\s*"[^"]*"', f'name: "{name}"', "".join(lines), count=1, flags=re.MULTILINE)


@dataclass(frozen=True)
class ModelSpec:
    """A model of a derived repository: which source model, and what to change in its config."""

    source: str
    parameters: Mapping[str, str] = field(default_factory=dict)


def write_model(
    dest: Path, name: str, spec: ModelSpec, source: Path = DEFAULT_REPOSITORY, code: Path | None = None
) -> Path:
    """Create (or rewrite the config of) `dest/name` from `source/spec.source`; the version
    folder links to `code` (a model's `1/` folder) when given, else to the source model's."""
    origin = source / spec.source
    text = (origin / "config.pbtxt").read_text()
    text = set_parameters(rename_model(text, name), spec.parameters)
    model_dir = dest / name
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text)
    version = model_dir / "1"
    if not version.exists():
        version.symlink_to((code or origin / "1").resolve(), target_is_directory=True)
    return model_dir


def derive(dest: Path, models: Mapping[str, ModelSpec], source: Path = DEFAULT_REPOSITORY) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name, spec in models.items():
        write_model(dest, name, spec, source)
    return dest
