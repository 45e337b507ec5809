"""One source for the tensor contract (orchestrator/wire/tensors.py): rendering it reproduces
every committed config.pbtxt byte for byte, the ensemble it describes is wired end to end,
a real engine's config carries the same blocks, and the adapters' name lists derived from it
hold what they held when they were written by hand."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from orchestrator.ops import model_configs
from orchestrator.ops.deployment import parse
from orchestrator.ops.trtllm_config import tensorrt_llm_config
from orchestrator.wire import contract, tensors
from orchestrator.wire.tensors import ENGINE, ENSEMBLE, ORCHESTRATOR, STEPS

ROOT = Path(__file__).resolve().parents[3]
REPOSITORY = ROOT / "model_repository"
CONFIGS = {model.name: model for model in model_configs.MODELS}

# The lists as they were written by hand before the table.
OLD_FORWARDED_INPUTS = (
    "input_ids", "input_lengths", "request_output_len", "end_id", "pad_id",
    "stop_words_list", "bad_words_list", "embedding_bias", "beam_width", "runtime_top_k",
    "runtime_top_p", "temperature", "len_penalty", "repetition_penalty", "min_tokens",
    "presence_penalty", "frequency_penalty", "seed", "num_return_sequences",
    "return_log_probs", "return_context_logits", "return_generation_logits",
    "return_perf_metrics", "return_num_input_tokens", "return_num_output_tokens",
)  # fmt: skip
OLD_PERF_OUTPUTS = (
    "arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns",
    "kv_cache_alloc_new_blocks", "kv_cache_reused_blocks", "kv_cache_alloc_total_blocks",
)  # fmt: skip
OLD_ENGINE_OUTPUTS = (
    "output_ids", "sequence_length", "context_phase_params", "cum_log_probs", "output_log_probs",
    "num_input_tokens", "num_output_tokens", *OLD_PERF_OUTPUTS,
)  # fmt: skip


def _parsed(text: str) -> Any:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


# -- rendering ------------------------------------------------------------------------------


def test_every_committed_config_is_rendered() -> None:
    assert sorted(p.parent.name for p in REPOSITORY.glob("*/config.pbtxt")) == sorted(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rendering_reproduces_the_committed_config(name: str) -> None:
    assert model_configs.render(CONFIGS[name]) == (REPOSITORY / name / "config.pbtxt").read_text()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rendered_tensors_are_the_table_rows(name: str) -> None:
    """Independently of the committed bytes: each declared tensor says what its row says."""
    model = CONFIGS[name].contract
    config = _parsed(model_configs.render(CONFIGS[name]))
    dtype = model_config_pb2.DataType.Name
    assert [t.name for t in config.input] == list(tensors.names(tensors.inputs_of(model)))
    for t in config.input:
        row = tensors.tensor(t.name)
        assert (dtype(t.data_type), tuple(t.dims), t.optional, t.allow_ragged_batch) == (
            row.dtype,
            row.dims,
            row.optional,
            row.ragged,
        )
        reshaped = model in tensors.RESHAPES_SCALARS and row.dims == (1,)
        assert t.HasField("reshape") == reshaped and list(t.reshape.shape) == []
    assert [t.name for t in config.output] == list(tensors.names(tensors.outputs_of(model)))
    for t in config.output:
        row = tensors.tensor(t.name)
        assert (dtype(t.data_type), tuple(t.dims)) == (row.dtype, row.dims)


def test_check_and_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert model_configs.main(["--check", str(REPOSITORY)]) == 0
    repo = tmp_path / "repo"
    shutil.copytree(REPOSITORY, repo, ignore=shutil.ignore_patterns("__pycache__"))
    stale = repo / "generation_1" / "config.pbtxt"
    stale.write_text(stale.read_text().replace("TYPE_UINT64", "TYPE_INT64"))
    (repo / "postprocessing" / "config.pbtxt").unlink()
    capsys.readouterr()
    assert model_configs.main(["--check", str(repo)]) == 1
    err = capsys.readouterr().err
    assert f"differs: {stale}" in err and f"differs: {repo / 'postprocessing' / 'config.pbtxt'}" in err
    assert "context_0" not in err
    assert model_configs.main(["--write", str(repo)]) == 0
    assert sorted(capsys.readouterr().out.split()) == sorted(
        ["wrote", str(stale), "wrote", str(repo / "postprocessing" / "config.pbtxt")]
    )
    assert model_configs.main(["--check", str(repo)]) == 0


def test_the_module_runs_as_a_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.ops.model_configs", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


# -- the table ------------------------------------------------------------------------------


def test_rows_are_consistent() -> None:
    assert len({t.name for t in tensors.TENSORS}) == len(tensors.TENSORS)
    for t in tensors.TENSORS:
        assert t.dtype.startswith("TYPE_") and hasattr(model_config_pb2, t.dtype), t.name
        assert set(t.inputs) | set(t.outputs) <= set(tensors.MODELS), t.name
        assert set(t.input_map) <= set(t.inputs) & set(STEPS), t.name
        assert set(t.output_map) <= set(t.outputs) & set(STEPS), t.name
        assert not t.forwarded or {ORCHESTRATOR, ENGINE} <= set(t.inputs), t.name
        assert not (t.requested or t.perf) or ENGINE in t.outputs, t.name
        assert not t.ragged_note or t.ragged, t.name


def test_listed_orders_only_order() -> None:
    """Each LISTED_ORDER entry names every tensor of its list once, and nothing else."""
    for (model, listing), order in tensors.LISTED_ORDER.items():
        if listing == "input":
            held = tensors.names(tensors.inputs_of(model))
        elif listing == "output":
            held = tensors.names(tensors.outputs_of(model))
        elif listing == "input_map":
            held = tuple(name for name, _ in tensors.step_input_map(model))
        else:
            held = tuple(name for name, _ in tensors.step_output_map(model))
        assert len(set(order)) == len(order) and set(order) == set(held), (model, listing)


def test_the_ensemble_is_wired_end_to_end() -> None:
    """Every step input is fed (by the client or an earlier step), every required one is
    mapped, and every ensemble output is written by exactly one step."""
    available = set(tensors.names(tensors.inputs_of(ENSEMBLE)))
    written: list[str] = []
    for step in STEPS:
        mapped = dict(tensors.step_input_map(step))
        assert set(mapped.values()) <= available, step
        required = {t.name for t in tensors.inputs_of(step) if not t.optional}
        assert required <= set(mapped), step
        outputs = [value for _, value in tensors.step_output_map(step)]
        available |= set(outputs)
        written += outputs
    assert sorted(name for name in written if not name.startswith("_")) == sorted(
        tensors.names(tensors.outputs_of(ENSEMBLE))
    )
    assert len(written) == len(set(written))


# -- the adapters' lists -------------------------------------------------------------------


def test_adapter_lists_hold_what_they_held() -> None:
    """Order aside (engines and Triton look tensors up by name), the lists are unchanged."""
    assert tensors.PERF_OUTPUTS == contract.PERF_OUTPUTS == OLD_PERF_OUTPUTS
    assert contract.FORWARDED_INPUTS is tensors.FORWARDED_INPUTS
    assert sorted(tensors.FORWARDED_INPUTS) == sorted(OLD_FORWARDED_INPUTS)
    assert len(set(tensors.FORWARDED_INPUTS)) == len(tensors.FORWARDED_INPUTS)
    assert sorted(tensors.ENGINE_OUTPUTS) == sorted(OLD_ENGINE_OUTPUTS)
    assert len(set(tensors.ENGINE_OUTPUTS)) == len(tensors.ENGINE_OUTPUTS)


def test_the_orchestrator_model_takes_its_engine_outputs_from_the_table() -> None:
    tree = ast.parse((REPOSITORY / "orchestrator" / "1" / "model.py").read_text())
    imported = {
        (node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names
    }
    assert ("orchestrator.wire.tensors", "ENGINE_OUTPUTS") in imported
    assigned = {
        t.id for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets if hasattr(t, "id")
    }
    assert "ENGINE_OUTPUTS" not in assigned


def _old_with_batch_dim(name: str, value: np.ndarray) -> np.ndarray:
    if name in {"input_ids", "embedding_bias", "context_phase_params"}:
        return value.reshape(1, -1)
    if name in {"stop_words_list", "bad_words_list"}:
        return value.reshape(1, 2, -1)
    return value.reshape(1, 1)


@pytest.mark.parametrize("name", [*tensors.names(tensors.inputs_of(ENGINE)), "not_in_the_table"])
def test_with_batch_dim_is_unchanged(name: str) -> None:
    dims = tensors.tensor(name).dims if name != "not_in_the_table" else (1,)
    shape = [3 if d == -1 else d for d in dims]
    for arrived in (shape, [1, *shape]):  # as the python backend hands it over, reshaped or not
        value = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(arrived)
        assert contract.with_batch_dim(name, value).shape == _old_with_batch_dim(name, value).shape


# -- a real engine's config ------------------------------------------------------------------

REAL = {
    "tokenizer_dir": "/tok",
    "pools": {
        "context": {"engines": 1, "kind": "tensorrtllm", "tensor_parallel": 2, "engine_dir": "/e/ctx",
                    "gpu_device_ids": [[0, 1]], "participant_ids": [[1, 2]]},
        "generation": {"engines": 1, "kind": "tensorrtllm", "engine_dir": "/e/gen",
                       "gpu_device_ids": [[2]], "participant_ids": [[3]]},
    },
}  # fmt: skip
_LOGITS = """  {
    name: "context_logits"
    data_type: TYPE_FP32
    dims: [ -1, -1 ]
  },
  {
    name: "generation_logits"
    data_type: TYPE_FP32
    dims: [ -1, -1, -1 ]
  }"""


def _from_stub_text(real: str, stub: str) -> str:
    """What the config was when it was made by editing the stub's text (the old way)."""
    blocks = [re.findall(rf"^{s} \[\n.*?^\]\n", stub, re.MULTILINE | re.DOTALL)[0] for s in ("input", "output")]
    outputs = blocks[1].rstrip()[: -len("]")].rstrip().rstrip(",") + ",\n" + _LOGITS + "\n]\n"
    head, rest = real.split("input [\n", 1)
    return head + blocks[0] + outputs + rest[rest.index("instance_group [") :]


@pytest.mark.parametrize("role", ["context", "generation"])
def test_a_real_engine_config_carries_the_table_blocks(role: str) -> None:
    deployment = parse(REAL)
    pool = next(p for p in deployment.pools if p.role == role)
    stub = (REPOSITORY / f"{role}_0" / "config.pbtxt").read_text()
    text = tensorrt_llm_config(f"{role}_0", pool, pool.real[0], "/tok")
    assert model_configs.inputs_block(ENGINE) in stub and model_configs.inputs_block(ENGINE) in text
    assert text == _from_stub_text(text, stub)
    config = _parsed(text)
    assert [t.name for t in config.output][-2:] == ["context_logits", "generation_logits"]
