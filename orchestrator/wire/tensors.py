"""Every tensor the served models exchange, declared once: the tensor contract as a table.

One row per tensor name: its Triton dtype and dims (without the batch dimension), whether
a request may leave it out, which models take it as an input or produce it as an output,
how the ensemble's steps map it (`input_map` / `output_map`: step model -> the ensemble
tensor it reads or writes), and what the orchestrator does with it towards the engines.

Everything else is derived from here: each model's `config.pbtxt` input and output blocks
and the ensemble's steps (orchestrator/ops/model_configs.py renders them; `python -m
orchestrator.ops.model_configs --check` says whether the committed ones match), a real
TensorRT-LLM engine's config (orchestrator/ops/trtllm_config.py), and the name lists the
adapters use (FORWARDED_INPUTS, ENGINE_OUTPUTS, PERF_OUTPUTS below).

The models:

    ensemble        the client-facing model (TensorRT-LLM's inflight_batcher_llm interface)
    preprocessing   text -> token ids, the ensemble's first step
    orchestrator    the disaggregated orchestrator, the second step, in the tensorrt_llm model's place
    postprocessing  token ids -> text, the last step
    engine          every engine model: the stubs (context_N, generation_N, aggregated_0) and a
                    real `tensorrt_llm` engine, which keep the tensorrt_llm backend's contract
    real_engine     declared by a real engine's config only, besides the engine's tensors

Written once from the committed configs; edit the rows, not the configs, then run
`python -m orchestrator.ops.model_configs --write model_repository`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

ENSEMBLE = "ensemble"
PREPROCESSING = "preprocessing"
ORCHESTRATOR = "orchestrator"
POSTPROCESSING = "postprocessing"
ENGINE = "engine"
REAL_ENGINE = "real_engine"
MODELS = (ENSEMBLE, PREPROCESSING, ORCHESTRATOR, POSTPROCESSING, ENGINE, REAL_ENGINE)
STEPS = (PREPROCESSING, ORCHESTRATOR, POSTPROCESSING)  # the ensemble's steps, in order

# Models whose [1] inputs are reshaped to [] (as the tensorrt_llm backend's config does), so
# the python backend hands them over as [batch]; contract.with_batch_dim restores [1, 1].
RESHAPES_SCALARS = (ORCHESTRATOR, ENGINE)

BOOL = "TYPE_BOOL"
UINT8 = "TYPE_UINT8"
INT32 = "TYPE_INT32"
INT64 = "TYPE_INT64"
UINT64 = "TYPE_UINT64"
FP32 = "TYPE_FP32"
STRING = "TYPE_STRING"


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # Triton's TYPE_*
    dims: tuple[int, ...]  # without the batch dimension
    inputs: tuple[str, ...] = ()  # the models that take it as an input
    outputs: tuple[str, ...] = ()  # the models that produce it
    optional: bool = False  # as an input: a request may leave it out
    ragged: bool = False  # as an input: requests of different lengths share a batch (allow_ragged_batch)
    ragged_note: str = ""  # why, a comment on that line of the config
    input_map: Mapping[str, str] = field(default_factory=dict)  # ensemble step -> the ensemble tensor it reads
    output_map: Mapping[str, str] = field(default_factory=dict)  # ensemble step -> the ensemble tensor it writes
    forwarded: bool = False  # the orchestrator forwards this input to engines unchanged
    requested: bool = False  # the orchestrator asks engines for this output
    perf: bool = False  # one of the outputs `return_perf_metrics` asks for


# Rows follow the tensorrt_llm model's config (inputs, then outputs); the ensemble's own
# names sit next to the engine tensor they become (top_k -> runtime_top_k).
# fmt: off
TENSORS: tuple[Tensor, ...] = (
    # -- Text-level inputs: the client's, turned into token ids by preprocessing.
    Tensor("text_input", STRING, (1,), inputs=(ENSEMBLE, PREPROCESSING),
           input_map={PREPROCESSING: "text_input"}),
    Tensor("max_tokens", INT32, (1,), inputs=(ENSEMBLE, PREPROCESSING),
           input_map={PREPROCESSING: "max_tokens"}),
    Tensor("bad_words", STRING, (-1,), inputs=(ENSEMBLE, PREPROCESSING), optional=True,
           input_map={PREPROCESSING: "bad_words"}),
    Tensor("stop_words", STRING, (-1,), inputs=(ENSEMBLE, PREPROCESSING), optional=True,
           input_map={PREPROCESSING: "stop_words"}),

    # -- The tensorrt_llm model's inputs (the orchestrator takes the same, but context_phase_params).
    Tensor("input_ids", INT32, (-1,), inputs=(ORCHESTRATOR, ENGINE), outputs=(PREPROCESSING,),
           optional=True, ragged=True, forwarded=True,
           input_map={ORCHESTRATOR: "_input_ids"}, output_map={PREPROCESSING: "_input_ids"}),
    Tensor("input_lengths", INT32, (1,), inputs=(ORCHESTRATOR, ENGINE), outputs=(PREPROCESSING,),
           forwarded=True,
           input_map={ORCHESTRATOR: "_input_lengths"}, output_map={PREPROCESSING: "_input_lengths"}),
    Tensor("request_output_len", INT32, (1,), inputs=(ORCHESTRATOR, ENGINE), outputs=(PREPROCESSING,),
           forwarded=True,
           input_map={ORCHESTRATOR: "_request_output_len"}, output_map={PREPROCESSING: "_request_output_len"}),
    Tensor("end_id", INT32, (1,), inputs=(ENSEMBLE, PREPROCESSING, ORCHESTRATOR, ENGINE),
           outputs=(PREPROCESSING,), optional=True, forwarded=True,
           input_map={PREPROCESSING: "end_id", ORCHESTRATOR: "_end_id"}, output_map={PREPROCESSING: "_end_id"}),
    Tensor("pad_id", INT32, (1,), inputs=(ENSEMBLE, PREPROCESSING, ORCHESTRATOR, ENGINE),
           outputs=(PREPROCESSING,), optional=True, forwarded=True,
           input_map={PREPROCESSING: "pad_id", ORCHESTRATOR: "_pad_id"}, output_map={PREPROCESSING: "_pad_id"}),
    Tensor("beam_width", INT32, (1,), inputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), optional=True, forwarded=True,
           input_map={ORCHESTRATOR: "beam_width"}),
    Tensor("top_k", INT32, (1,), inputs=(ENSEMBLE,), optional=True),
    Tensor("runtime_top_k", INT32, (1,), inputs=(ORCHESTRATOR, ENGINE), optional=True, forwarded=True,
           input_map={ORCHESTRATOR: "top_k"}),
    Tensor("min_tokens", INT32, (1,), inputs=(ENSEMBLE, PREPROCESSING, ORCHESTRATOR, ENGINE),
           outputs=(PREPROCESSING,), optional=True, forwarded=True,
           input_map={PREPROCESSING: "min_tokens", ORCHESTRATOR: "_min_tokens"},
           output_map={PREPROCESSING: "_min_tokens"}),
    Tensor("min_length", INT32, (1,), inputs=(ENSEMBLE, PREPROCESSING), optional=True,  # min_tokens' alias
           input_map={PREPROCESSING: "min_length"}),
    Tensor("num_return_sequences", INT32, (1,), inputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), optional=True,
           forwarded=True, input_map={ORCHESTRATOR: "num_return_sequences"}),
    Tensor("temperature", FP32, (1,), inputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), optional=True, forwarded=True,
           input_map={ORCHESTRATOR: "temperature"}),
    Tensor("top_p", FP32, (1,), inputs=(ENSEMBLE,), optional=True),
    Tensor("runtime_top_p", FP32, (1,), inputs=(ORCHESTRATOR, ENGINE), optional=True, forwarded=True,
           input_map={ORCHESTRATOR: "top_p"}),
    Tensor("length_penalty", FP32, (1,), inputs=(ENSEMBLE,), optional=True),
    Tensor("len_penalty", FP32, (1,), inputs=(ORCHESTRATOR, ENGINE), optional=True, forwarded=True,
           input_map={ORCHESTRATOR: "length_penalty"}),
    Tensor("repetition_penalty", FP32, (1,), inputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), optional=True,
           forwarded=True, input_map={ORCHESTRATOR: "repetition_penalty"}),
    Tensor("presence_penalty", FP32, (1,), inputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), optional=True,
           forwarded=True, input_map={ORCHESTRATOR: "presence_penalty"}),
    Tensor("frequency_penalty", FP32, (1,), inputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), optional=True,
           forwarded=True, input_map={ORCHESTRATOR: "frequency_penalty"}),
    Tensor("seed", UINT64, (1,), inputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), optional=True, forwarded=True,
           input_map={ORCHESTRATOR: "seed"}),
    Tensor("stop_words_list", INT32, (2, -1), inputs=(ORCHESTRATOR, ENGINE), outputs=(PREPROCESSING,),
           optional=True, ragged=True, forwarded=True,
           input_map={ORCHESTRATOR: "_stop_words_list"}, output_map={PREPROCESSING: "_stop_words_list"}),
    Tensor("bad_words_list", INT32, (2, -1), inputs=(ORCHESTRATOR, ENGINE), outputs=(PREPROCESSING,),
           optional=True, ragged=True, forwarded=True,
           input_map={ORCHESTRATOR: "_bad_words_list"}, output_map={PREPROCESSING: "_bad_words_list"}),
    Tensor("embedding_bias", FP32, (-1,), inputs=(ORCHESTRATOR, ENGINE), optional=True, ragged=True,
           forwarded=True),
    Tensor("stream", BOOL, (1,), inputs=(ENSEMBLE,), optional=True),
    # The orchestrator sets streaming and exclude_input_in_output itself for each engine request.
    Tensor("streaming", BOOL, (1,), inputs=(ORCHESTRATOR, ENGINE), optional=True,
           input_map={ORCHESTRATOR: "stream"}),
    Tensor("stop", BOOL, (1,), inputs=(ENSEMBLE, PREPROCESSING, ORCHESTRATOR, ENGINE), optional=True,
           input_map={PREPROCESSING: "stop", ORCHESTRATOR: "stop"}),
    Tensor("exclude_input_in_output", BOOL, (1,), inputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), optional=True,
           input_map={ORCHESTRATOR: "exclude_input_in_output"}),
    Tensor("return_log_probs", BOOL, (1,), inputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), optional=True,
           forwarded=True, input_map={ORCHESTRATOR: "return_log_probs"}),
    Tensor("return_context_logits", BOOL, (1,), inputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), optional=True,
           forwarded=True, input_map={ORCHESTRATOR: "return_context_logits"}),
    Tensor("return_generation_logits", BOOL, (1,), inputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), optional=True,
           forwarded=True, input_map={ORCHESTRATOR: "return_generation_logits"}),
    Tensor("return_perf_metrics", BOOL, (1,), inputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), optional=True,
           forwarded=True, input_map={ORCHESTRATOR: "return_perf_metrics"}),
    Tensor("return_num_input_tokens", BOOL, (1,), inputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), optional=True,
           forwarded=True, input_map={ORCHESTRATOR: "return_num_input_tokens"}),
    Tensor("return_num_output_tokens", BOOL, (1,), inputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), optional=True,
           forwarded=True, input_map={ORCHESTRATOR: "return_num_output_tokens"}),

    # -- The tensorrt_llm model's outputs (the orchestrator's: detok_window for context_phase_params).
    Tensor("output_ids", INT32, (-1, -1), outputs=(ORCHESTRATOR, ENGINE), requested=True),
    Tensor("sequence_length", INT32, (-1,), outputs=(ORCHESTRATOR, ENGINE), requested=True),
    # A context phase's handoff; the orchestrator passes it to the generation engine itself.
    Tensor("context_phase_params", UINT8, (-1,), inputs=(ENGINE,), outputs=(ENGINE,), optional=True,
           ragged=True, requested=True),
    Tensor("detok_window", INT32, (-1,), inputs=(POSTPROCESSING,), outputs=(ORCHESTRATOR,), ragged=True,
           ragged_note="each request is handled alone; windows of any length share a batch",
           input_map={POSTPROCESSING: "_detok_window"}, output_map={ORCHESTRATOR: "_detok_window"}),
    Tensor("text_output", STRING, (-1,), outputs=(ENSEMBLE, POSTPROCESSING),
           output_map={POSTPROCESSING: "text_output"}),
    Tensor("cum_log_probs", FP32, (-1,), outputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), requested=True,
           output_map={ORCHESTRATOR: "cum_log_probs"}),
    Tensor("output_log_probs", FP32, (-1, -1), outputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), requested=True,
           output_map={ORCHESTRATOR: "output_log_probs"}),
    Tensor("batch_index", INT32, (1,), outputs=(ENSEMBLE, ORCHESTRATOR, ENGINE),
           output_map={ORCHESTRATOR: "batch_index"}),
    Tensor("sequence_index", INT32, (1,), outputs=(ENSEMBLE, ORCHESTRATOR, ENGINE),
           output_map={ORCHESTRATOR: "sequence_index"}),
    Tensor("arrival_time_ns", INT64, (1,), outputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), requested=True, perf=True,
           output_map={ORCHESTRATOR: "arrival_time_ns"}),
    Tensor("first_scheduled_time_ns", INT64, (1,), outputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), requested=True,
           perf=True, output_map={ORCHESTRATOR: "first_scheduled_time_ns"}),
    Tensor("first_token_time_ns", INT64, (1,), outputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), requested=True,
           perf=True, output_map={ORCHESTRATOR: "first_token_time_ns"}),
    Tensor("last_token_time_ns", INT64, (1,), outputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), requested=True,
           perf=True, output_map={ORCHESTRATOR: "last_token_time_ns"}),
    Tensor("kv_cache_alloc_new_blocks", INT32, (1,), outputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), requested=True,
           perf=True, output_map={ORCHESTRATOR: "kv_cache_alloc_new_blocks"}),
    Tensor("kv_cache_reused_blocks", INT32, (1,), outputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), requested=True,
           perf=True, output_map={ORCHESTRATOR: "kv_cache_reused_blocks"}),
    Tensor("kv_cache_alloc_total_blocks", INT32, (1,), outputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), requested=True,
           perf=True, output_map={ORCHESTRATOR: "kv_cache_alloc_total_blocks"}),
    Tensor("num_input_tokens", INT32, (1,), outputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), requested=True,
           output_map={ORCHESTRATOR: "num_input_tokens"}),
    Tensor("num_output_tokens", INT32, (1,), outputs=(ENSEMBLE, ORCHESTRATOR, ENGINE), requested=True,
           output_map={ORCHESTRATOR: "num_output_tokens"}),
    # The tensorrt_llm backend reads its logits dtype from these two; the stubs never return logits.
    Tensor("context_logits", FP32, (-1, -1), outputs=(REAL_ENGINE,)),
    Tensor("generation_logits", FP32, (-1, -1, -1), outputs=(REAL_ENGINE,)),
)

# Where a config lists its tensors in another order than the rows above (TensorRT-LLM's
# inflight_batcher_llm ensemble and preprocessing templates have their own), that order:
# these names come first, in this order, and whatever else the list holds follows in row
# order. Only the order lives here; which tensors a list holds comes from the rows.
# Step maps follow the step model's own list unless named here.
LISTED_ORDER: dict[tuple[str, str], tuple[str, ...]] = {
    (ENSEMBLE, "input"): (
        "text_input", "max_tokens", "bad_words", "stop_words", "end_id", "pad_id", "top_k", "min_tokens",
        "min_length", "beam_width", "num_return_sequences", "stream", "exclude_input_in_output",
        "return_log_probs", "return_context_logits", "return_generation_logits", "return_perf_metrics",
        "return_num_input_tokens", "return_num_output_tokens", "top_p", "temperature", "length_penalty",
        "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "stop",
    ),
    (ENSEMBLE, "output"): (
        "text_output", "cum_log_probs", "output_log_probs", "batch_index", "sequence_index",
        "kv_cache_alloc_new_blocks", "kv_cache_reused_blocks", "kv_cache_alloc_total_blocks",
        "num_input_tokens", "num_output_tokens", "arrival_time_ns", "first_scheduled_time_ns",
        "first_token_time_ns", "last_token_time_ns",
    ),
    (PREPROCESSING, "output"): (
        "input_ids", "input_lengths", "request_output_len", "bad_words_list", "stop_words_list", "end_id",
        "pad_id", "min_tokens",
    ),
    (ORCHESTRATOR, "input_map"): (
        "stop", "input_ids", "input_lengths", "request_output_len", "bad_words_list", "stop_words_list",
        "end_id", "pad_id", "min_tokens", "runtime_top_k", "runtime_top_p", "temperature", "len_penalty",
        "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "beam_width",
        "num_return_sequences", "streaming", "exclude_input_in_output", "return_log_probs",
        "return_context_logits", "return_generation_logits", "return_perf_metrics",
        "return_num_input_tokens", "return_num_output_tokens",
    ),
}
# fmt: on

_BY_NAME = {t.name: t for t in TENSORS}


def tensor(name: str) -> Tensor:
    """The row of tensor `name` (KeyError when the contract has no such tensor)."""
    return _BY_NAME[name]


def names(tensors: Iterable[Tensor]) -> tuple[str, ...]:
    return tuple(t.name for t in tensors)


def _ordered(tensors: Iterable[Tensor], model: str, listing: str) -> tuple[Tensor, ...]:
    first = LISTED_ORDER.get((model, listing), ())
    rank = {name: i for i, name in enumerate(first)}
    return tuple(sorted(tensors, key=lambda t: rank.get(t.name, len(first))))  # stable: the rest in row order


def inputs_of(model: str) -> tuple[Tensor, ...]:
    """The inputs `model` declares, in its config's order."""
    return _ordered((t for t in TENSORS if model in t.inputs), model, "input")


def outputs_of(model: str) -> tuple[Tensor, ...]:
    """The outputs `model` declares, in its config's order."""
    return _ordered((t for t in TENSORS if model in t.outputs), model, "output")


def step_input_map(step: str) -> tuple[tuple[str, str], ...]:
    """The ensemble step's input_map: (its input, the ensemble tensor it reads), in config order."""
    mapped = _ordered((t for t in inputs_of(step) if step in t.input_map), step, "input_map")
    return tuple((t.name, t.input_map[step]) for t in mapped)


def step_output_map(step: str) -> tuple[tuple[str, str], ...]:
    """The ensemble step's output_map: (its output, the ensemble tensor it writes), in config order."""
    mapped = _ordered((t for t in outputs_of(step) if step in t.output_map), step, "output_map")
    return tuple((t.name, t.output_map[step]) for t in mapped)


# The adapters' name lists.
FORWARDED_INPUTS: tuple[str, ...] = names(t for t in inputs_of(ENGINE) if t.forwarded)
ENGINE_OUTPUTS: tuple[str, ...] = names(t for t in outputs_of(ENGINE) if t.requested)  # what the orchestrator asks for
PERF_OUTPUTS: tuple[str, ...] = names(t for t in outputs_of(ENGINE) if t.perf)
