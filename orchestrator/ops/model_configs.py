"""The committed models' config.pbtxt files, rendered from the tensor table.

Each model's `input` and `output` blocks and the ensemble's steps come from
orchestrator/wire/tensors.py; what is particular to one model (its header comment, backend,
batching, instances, parameters and their comments) lives in MODELS below. Rendering
reproduces every committed `model_repository/*/config.pbtxt` byte for byte
(tests/unit/ops/test_model_configs.py), so a change to the contract is a change to the table and a
run of

    python -m orchestrator.ops.model_configs --write model_repository   # rewrite the configs
    python -m orchestrator.ops.model_configs --check model_repository   # exit 1 naming any that differ

A real TensorRT-LLM engine's config (orchestrator/ops/trtllm_config.py) takes its blocks
from here too.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from orchestrator.wire import tensors
from orchestrator.wire.tensors import Tensor

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def _dims(dims: Iterable[int]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def _comment(text: str) -> str:
    return "".join(f"# {line}\n" for line in text.splitlines()) if text else ""


def _input(t: Tensor, model: str) -> list[str]:
    lines = [f'name: "{t.name}"', f"data_type: {t.dtype}", f"dims: {_dims(t.dims)}"]
    if model in tensors.RESHAPES_SCALARS and t.dims == (1,):
        lines.append("reshape: { shape: [  ] }")
    if t.optional:
        lines.append("optional: true")
    if t.ragged:
        lines.append("allow_ragged_batch: true" + (f"  # {t.ragged_note}" if t.ragged_note else ""))
    return lines


def _output(t: Tensor) -> list[str]:
    return [f'name: "{t.name}"', f"data_type: {t.dtype}", f"dims: {_dims(t.dims)}"]


def _list(section: str, entries: Sequence[list[str]]) -> str:
    body = ",\n".join("  {\n" + "".join(f"    {line}\n" for line in entry) + "  }" for entry in entries)
    return f"{section} [\n{body}\n]\n"


def inputs_block(model: str) -> str:
    """The `input [...]` block of a config that carries the table model `model`'s inputs."""
    return _list("input", [_input(t, model) for t in tensors.inputs_of(model)])


def outputs_block(*models: str) -> str:
    """The `output [...]` block with the outputs of the table models `models`, in turn."""
    return _list("output", [_output(t) for model in models for t in tensors.outputs_of(model)])


def _maps(kind: str, pairs: Iterable[tuple[str, str]]) -> str:
    return "".join(
        f'      {kind} {{\n        key: "{key}"\n        value: "{value}"\n      }}\n' for key, value in pairs
    )


def ensemble_scheduling() -> str:
    """The ensemble's steps: each step model's input_map and output_map from the table."""
    steps = [
        f'    {{\n      model_name: "{step}"\n      model_version: -1\n'
        + _maps("input_map", tensors.step_input_map(step))
        + _maps("output_map", tensors.step_output_map(step))
        + "    }"
        for step in tensors.STEPS
    ]
    return "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n"


def parameters_block(values: Iterable[tuple[str, str]]) -> str:
    return "".join(
        f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}\n' for key, value in values
    )


@dataclass(frozen=True)
class ModelConfig:
    """What one committed model's config has besides its tensors (comments without the `# `)."""

    name: str
    contract: str  # the table's model whose tensors it carries (tensors.ENGINE for every engine)
    header: str
    backend: str = "python"  # the ensemble has none: platform "ensemble" and its steps instead
    max_batch_size: int = 64
    decoupled: bool = False
    dynamic_batching: tuple[str, ...] | None = None  # the block's lines
    dynamic_batching_note: str = ""
    instance_count: int = 1
    instance_note: str = ""
    parameters: tuple[tuple[str, str], ...] = ()
    parameters_note: str = ""


def render(model: ModelConfig) -> str:
    """The full config.pbtxt text of `model`."""
    ensemble = model.contract == tensors.ENSEMBLE
    text = _comment(model.header) + f'name: "{model.name}"\n'
    text += 'platform: "ensemble"\n' if ensemble else f'backend: "{model.backend}"\n'
    text += f"max_batch_size: {model.max_batch_size}\n"
    if model.decoupled:
        text += "model_transaction_policy {\n  decoupled: true\n}\n"
    text += inputs_block(model.contract) + outputs_block(model.contract)
    if ensemble:
        return text + ensemble_scheduling()
    if model.dynamic_batching is not None:
        text += _comment(model.dynamic_batching_note) + "dynamic_batching {\n"
        text += "".join(f"  {line}\n" for line in model.dynamic_batching) + "}\n"
    text += _comment(model.instance_note)
    text += f"instance_group [\n  {{\n    count: {model.instance_count}\n    kind: KIND_CPU\n  }}\n]\n"
    return text + _comment(model.parameters_note) + parameters_block(model.parameters)


_STUB_ENGINE = """\
that keeps the tensorrt_llm model's tensor contract. To serve a real TensorRT-LLM
engine instead, replace this file with the tensorrt_llm backend's config (backend
"tensorrtllm", its engine parameters); callers need no change."""


def _stub_engine(name: str, tensor_parallel_size: int, role: str = "", chunked_context: bool = False) -> ModelConfig:
    """A committed stub engine; `chunked_context` turns TensorRT-LLM's enable_chunked_context on
    (the aggregated baseline runs with it, as an aggregated TensorRT-LLM deployment does)."""
    chunking = (("enable_chunked_context", "true"),) if chunked_context else ()
    lead = (
        f'Stub engine "{name}": {role}\nOne engine = one in-flight batching loop (orchestrator/stub_engine/core.py)'
        if role
        else f'Stub engine "{name}": one in-flight batching engine (orchestrator/stub_engine/core.py)'
    )
    return ModelConfig(
        name=name,
        contract=tensors.ENGINE,
        header=f"{lead}\n{_STUB_ENGINE}",
        decoupled=True,
        parameters_note=(
            "Stub engine knobs and cost model (Llama-3.1-8B on one H100): see orchestrator/stub_engine/config.py."
        ),
        parameters=(
            ("max_batch_size", "64"),
            ("max_num_tokens", "8192"),
            ("max_input_len", "4096"),
            *chunking,
            ("tokens_per_block", "32"),
            ("max_tokens_in_paged_kv_cache", "32768"),
            ("enable_kv_cache_reuse", "true"),
            ("kv_transport", "auto"),
            ("kv_transfer_host", "127.0.0.1"),
            ("kv_lease_timeout_s", "30"),
            ("tensor_parallel_size", str(tensor_parallel_size)),
            ("pipeline_parallel_size", "1"),
            ("step_overhead_ms", "0.5"),
            ("prefill_us_per_token", "32"),
            ("decode_ms_per_step", "6"),
            ("decode_us_per_seq", "32"),
            ("decode_ns_per_kv_token", "49"),
            ("transfer_us_per_token", "5.2"),
        ),
    )


MODELS: tuple[ModelConfig, ...] = (
    ModelConfig(
        name="ensemble",
        contract=tensors.ENSEMBLE,
        header=(
            "The client-facing model: TensorRT-LLM's inflight_batcher_llm ensemble interface,\n"
            "served by preprocessing -> orchestrator (disaggregated) -> postprocessing."
        ),
        backend="",
    ),
    ModelConfig(
        name="preprocessing",
        contract=tensors.PREPROCESSING,
        header=(
            "Text -> token ids (orchestrator/text/preprocess.py). tokenizer_dir empty = built-in tokenizer;\n"
            "set it to a local Hugging Face tokenizer folder (needs `pip install tokenizers`)."
        ),
        parameters=(("tokenizer_dir", ""), ("max_input_len", "4096"), ("max_output_len", "4096")),
    ),
    ModelConfig(
        name="orchestrator",
        contract=tensors.ORCHESTRATOR,
        header=(
            "The disaggregated orchestrator (orchestrator/serving/pipeline.py): takes the tensorrt_llm\n"
            "step's place in the ensemble with the same token-level inputs and outputs, sends the\n"
            "context phase to a context engine and the generation phase to a generation engine.\n"
            "One instance serves many requests at once (async execute)."
        ),
        decoupled=True,
        instance_note=(
            "One instance: it serves requests concurrently (async), and stop=true must reach the\n"
            "instance that holds the request it names."
        ),
        parameters_note="Routing, failover and timeout knobs: see orchestrator/serving/config.py and the README.",
        parameters=(
            ("context_engines", "context_0,context_1"),
            ("generation_engines", "generation_0,generation_1"),
            ("context_policy", "kv_aware"),
            ("generation_policy", "kv_aware"),
            ("max_retries", "2"),
            ("engine_timeout_s", "60"),
            ("breaker_backoff_s", "1.0"),
            ("breaker_backoff_max_s", "30"),
            ("health_check_s", "2.0"),
            ("tokens_per_block", "32"),
            ("local_prefill_max_tokens", "0"),
            ("context_queue_threshold", "0"),
            ("log_routing", "false"),
            ("request_timeout_s", "0"),
            ("context_timeout_s", "0"),
            ("generation_timeout_s", "0"),
            ("cancel_check_ms", "100"),
        ),
    ),
    ModelConfig(
        name="postprocessing",
        contract=tensors.POSTPROCESSING,
        header=(
            "Token ids -> text (orchestrator/text/postprocess.py): exact streaming deltas from the\n"
            "orchestrator's detok_window, without state between responses. tokenizer_dir must\n"
            "match preprocessing's. Any instance count: preserve_ordering (below) keeps a stream's\n"
            "deltas in order."
        ),
        dynamic_batching_note=(
            "Batches: one execute (one IPC round trip) for what queued meanwhile. preserve_ordering:\n"
            "responses leave in the order requests came, so with several instances a stream's deltas\n"
            "still reach the client in order."
        ),
        dynamic_batching=("preserve_ordering: true",),
        parameters=(("tokenizer_dir", ""),),
    ),
    _stub_engine("context_0", tensor_parallel_size=2),
    _stub_engine("context_1", tensor_parallel_size=2),
    _stub_engine("generation_0", tensor_parallel_size=1),
    _stub_engine("generation_1", tensor_parallel_size=1),
    _stub_engine(
        "aggregated_0",
        tensor_parallel_size=1,
        role=(
            "both phases in one in-flight batching engine, the IFB\n"
            "baseline (not used by the ensemble; call it directly with no request_type)."
        ),
        chunked_context=True,
    ),
)


def rendered() -> dict[str, str]:
    """Each committed model's name -> its config.pbtxt text."""
    return {model.name: render(model) for model in MODELS}


def differing(repository: Path) -> list[Path]:
    """The config files under `repository` that are missing or differ from their rendering."""
    out = []
    for name, text in rendered().items():
        path = repository / name / "config.pbtxt"
        if not path.is_file() or path.read_text() != text:
            out.append(path)
    return out


def write(repository: Path) -> list[Path]:
    """Write every rendered config under `repository`; returns the files that changed."""
    changed = differing(repository)
    for path in changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rendered()[path.parent.name])
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.ops.model_configs",
        description="Render each committed model's config.pbtxt from the tensor table (orchestrator/wire/tensors.py).",
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", metavar="REPOSITORY", type=Path, nargs="?", const=REPOSITORY,
                        help="write the configs into this model repository (default: the committed one)")  # fmt: skip
    action.add_argument("--check", metavar="REPOSITORY", type=Path, nargs="?", const=REPOSITORY,
                        help="exit 1, naming each config that differs from its rendering")  # fmt: skip
    args = parser.parse_args(argv)
    if args.write is not None:
        for path in write(args.write):
            print(f"wrote {path}")
        return 0
    stale = differing(args.check)
    for path in stale:
        print(f"differs: {path}", file=sys.stderr)
    if stale:
        print("regenerate with: python -m orchestrator.ops.model_configs --write", args.check, file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
