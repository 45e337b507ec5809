"""Derive model repositories from the committed one: parameter overrides, renamed copies,
and the three-server split (context engines, generation engines, frontend).

A derived model gets its own `config.pbtxt` and a symlink to the source model's version
folder, so the code stays in one place (each `model.py` resolves the symlink to find the
`orchestrator` package).

    # one repository per server, the frontend reaching the engines over gRPC
    python scripts/repository.py split --out /srv/disagg \\
        --context-server 10.0.0.5:8001 --generation-server 10.0.0.6:8001
    # -> /srv/disagg/{context,generation,frontend}; start one tritonserver on each
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPOSITORY = REPO_ROOT / "model_repository"
FRONTEND_MODELS = ("ensemble", "preprocessing", "orchestrator", "postprocessing")


def _parameter_block(key: str, value: str) -> str:
    return f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}\n'


def set_parameters(pbtxt: str, overrides: Mapping[str, str]) -> str:
    """Set `parameters` string values in a config.pbtxt text (replaced in place or appended)."""
    for key, value in overrides.items():
        pattern = re.compile(r'(parameters\s*\{\s*key:\s*"' + re.escape(key) + r'"\s*value:\s*\{\s*string_value:\s*")[^"]*(")')
        pbtxt, count = pattern.subn(lambda m: m.group(1) + value + m.group(2), pbtxt)
        if count == 0:
            pbtxt = pbtxt.rstrip("\n") + "\n" + _parameter_block(key, value)
    return pbtxt


def rename_model(pbtxt: str, name: str) -> str:
    return re.sub(r'^name:\s*"[^"]*"', f'name: "{name}"', pbtxt, count=1, flags=re.MULTILINE)


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


def split(
    out: Path,
    context_server: str,
    generation_server: str,
    context: Sequence[str] = ("context_0", "context_1"),
    generation: Sequence[str] = ("generation_0", "generation_1"),
    orchestrator: Mapping[str, str] | None = None,
    source: Path = DEFAULT_REPOSITORY,
) -> dict[str, Path]:
    """Three repositories: engines of each phase on their own server, the rest on the frontend."""
    pools = {
        "context_engines": ",".join(f"grpc://{context_server}/{m}" for m in context),
        "generation_engines": ",".join(f"grpc://{generation_server}/{m}" for m in generation),
        **(orchestrator or {}),
    }
    frontend = {m: ModelSpec(m) for m in FRONTEND_MODELS}
    frontend["orchestrator"] = ModelSpec("orchestrator", pools)
    return {
        "context": derive(out / "context", {m: ModelSpec(m) for m in context}, source),
        "generation": derive(out / "generation", {m: ModelSpec(m) for m in generation}, source),
        "frontend": derive(out / "frontend", frontend, source),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("split", help="three repositories for a three-server deployment")
    cmd.add_argument("--out", type=Path, required=True)
    cmd.add_argument("--context-server", required=True, help="HOST:PORT of the context engines' gRPC endpoint")
    cmd.add_argument("--generation-server", required=True, help="HOST:PORT of the generation engines' gRPC endpoint")
    args = parser.parse_args(argv)
    for role, path in split(args.out, args.context_server, args.generation_server).items():
        print(f"{role}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
