"""The `tensorrt_llm` engine model's tensor contract as plain data.

Engines (our stubs) and the orchestrator speak this contract (the inputs, outputs and
request parameters of TensorRT-LLM's `tensorrt_llm` backend; README, "The stub engines").
Keeping the tensors <-> dataclass mapping here,
on numpy alone, lets both sides and the tests share one parser, and keeps every `model.py`
a thin adapter between `pb_utils.Tensor` and `dict[str, np.ndarray]`. Which tensors exist,
their dtypes and dims, and which of them the orchestrator forwards: the tensor table,
orchestrator/wire/tensors.py.

Scalars may arrive as [B] or [B, 1] (Python backend batching): both are accepted. One
request carries one sequence (B == 1), as the orchestrator and TensorRT-LLM clients send.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping

import numpy as np

from orchestrator.wire.errors import InvalidInput
from orchestrator.wire.stop_condition import StopCondition, parse_word_list
from orchestrator.wire.tensors import ENGINE, PERF_OUTPUTS, inputs_of
from orchestrator.wire.tensors import FORWARDED_INPUTS as FORWARDED_INPUTS  # re-exported: phases.py, tests

Tensors = Mapping[str, np.ndarray]


class RequestType(str, Enum):
    """The `request_type` request parameter; absent means both phases in one engine."""

    AGGREGATE = "aggregate"
    CONTEXT_ONLY = "context_only"
    GENERATION_ONLY = "generation_only"

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any]) -> "RequestType":
        """Absent (or TensorRT-LLM's `context_and_generation`) means both phases here.

        An unknown value is refused: silently serving a misspelt `generation_only` as a
        full request would hide the client's bug (the real backend falls back instead).
        """
        value = parameters.get("request_type")
        if value is None or value in ("", "context_and_generation"):
            return cls.AGGREGATE
        if value in (cls.CONTEXT_ONLY.value, cls.GENERATION_ONLY.value):
            return cls(value)
        raise InvalidInput(
            f"request parameter 'request_type'={value!r} is unknown: use 'context_only', 'generation_only', "
            "or leave it out for both phases"
        )


# An engine input's shape with its batch dimension: [1, T] ids, [1, 2, N] word lists, [1, 1] scalars.
_BATCHED_SHAPES: dict[str, tuple[int, ...]] = {t.name: (1, *t.dims) for t in inputs_of(ENGINE)}
MAX_WORD_LIST_IDS = 4096  # token ids per stop/bad word list; more is a client bug, not a use case


def is_stop_request(tensors: Tensors) -> bool:
    """TensorRT-LLM's cancellation contract: `stop=true` ends the in-flight request that has
    this request's id; the stop request itself gets one empty final response."""
    return flag(tensors, "stop")


def stop_tensors() -> dict[str, np.ndarray]:
    """A stop request's inputs: `stop` plus the inputs a real tensorrt_llm config requires."""
    return {
        "input_ids": np.zeros((1, 1), dtype=np.int32),
        "input_lengths": np.ones((1, 1), dtype=np.int32),
        "request_output_len": np.ones((1, 1), dtype=np.int32),
        "stop": np.ones((1, 1), dtype=bool),
    }


def with_batch_dim(name: str, value: np.ndarray) -> np.ndarray:
    """The full [1, ...] shape a BLS caller must send, whatever shape the input arrived in.

    Configs reshape scalars to [] (as the real tensorrt_llm config does), so the python
    backend hands them over as [1]; a child request must still carry [1, 1].
    """
    return value.reshape(_BATCHED_SHAPES.get(name, (1, 1)))


def scalar(tensors: Tensors, name: str, default: Any = None) -> Any:
    """The single value of a [1] or [1, 1] tensor, or `default` when the input is absent."""
    arr = tensors.get(name)
    if arr is None or arr.size == 0:
        return default
    if arr.size != 1:
        raise InvalidInput(f"input '{name}' must hold one value per request, got shape {list(arr.shape)}")
    value = arr.reshape(-1)[0]
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value)
    return value.item()


def flag(tensors: Tensors, name: str) -> bool:
    return bool(scalar(tensors, name, False))


def token_row(tensors: Tensors, name: str, length: int | None = None) -> tuple[int, ...]:
    """A [1, T] or [T] id tensor as a tuple, cut to `length` when given."""
    arr = tensors.get(name)
    if arr is None:
        return ()
    if arr.ndim == 2 and arr.shape[0] != 1:
        raise InvalidInput(f"input '{name}' must carry one sequence per request, got batch {arr.shape[0]}")
    row = arr.reshape(-1)
    if length is not None:
        if length < 0 or length > row.size:
            raise InvalidInput(f"input_lengths={length} does not fit input_ids of {row.size} tokens")
        row = row[:length]
    if row.size and np.issubdtype(row.dtype, np.signedinteger) and row.min() < 0:
        raise InvalidInput(f"input '{name}' must be token ids >= 0")
    return tuple(row.astype(np.int64, copy=False).tolist())  # one C call: 20x a per-element int()


def word_list(tensors: Tensors, name: str) -> tuple[tuple[int, ...], ...]:
    arr = tensors.get(name)
    if arr is None or arr.size == 0:
        return ()
    if arr.ndim < 2 or arr.shape[-2] != 2 or arr.size != 2 * arr.shape[-1]:
        raise InvalidInput(f"input '{name}' must be INT32 [1, 2, N] (ids row, offsets row), got {list(arr.shape)}")
    if arr.shape[-1] > MAX_WORD_LIST_IDS:
        raise InvalidInput(f"input '{name}' holds {arr.shape[-1]} ids; at most {MAX_WORD_LIST_IDS} are accepted")
    pair = arr.reshape(2, -1)
    try:
        return parse_word_list(pair[0].tolist(), pair[1].tolist())
    except ValueError as exc:
        raise InvalidInput(f"input '{name}': {exc}") from None


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling inputs; the stub model folds them into its deterministic choice of tokens."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int = 0
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    len_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0.0 or (self.top_k == 0 and self.top_p == 0.0)

    def key(self) -> int:
        """A stable integer naming these sampling settings (same inputs -> same tokens)."""
        if self.greedy:
            return 0
        return hash((round(self.temperature, 6), self.top_k, round(self.top_p, 6), self.seed)) & 0x7FFFFFFF


def _sampling(tensors: Tensors) -> SamplingParams:
    def fp(name: str, default: float, low: float = 0.0, high: float = math.inf, above: bool = False) -> float:
        value = float(scalar(tensors, name, default))
        if math.isnan(value) or math.isinf(value) or value < low or value > high or (above and value == low):
            bounds = f"{'>' if above else '>='} {low}" + ("" if high == math.inf else f" and <= {high}")
            raise InvalidInput(f"input '{name}' must be a finite number {bounds}, got {value}")
        return value

    def i32(name: str, default: int) -> int:
        value = int(scalar(tensors, name, default))
        if value < 0:
            raise InvalidInput(f"input '{name}' must be >= 0, got {value}")
        return value

    return SamplingParams(
        temperature=fp("temperature", 1.0),
        top_k=i32("runtime_top_k", 0),
        top_p=fp("runtime_top_p", 0.0, high=1.0),
        seed=int(scalar(tensors, "seed", 0)),
        min_tokens=i32("min_tokens", 0),
        repetition_penalty=fp("repetition_penalty", 1.0, above=True),
        presence_penalty=fp("presence_penalty", 0.0, low=-math.inf),
        frequency_penalty=fp("frequency_penalty", 0.0, low=-math.inf),
        len_penalty=fp("len_penalty", 1.0, low=-math.inf),
    )


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One sequence's request to an engine (or to the orchestrator, which takes the same)."""

    request_id: str
    input_ids: tuple[int, ...]
    stop: StopCondition
    sampling: SamplingParams
    request_type: RequestType = RequestType.AGGREGATE
    streaming: bool = False
    exclude_input_in_output: bool = False
    context_phase_params: bytes | None = None
    return_perf_metrics: bool = False
    return_log_probs: bool = False
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False
    pad_id: int = 0
    bad_words: tuple[tuple[int, ...], ...] = ()  # validated; the stub model does not apply them


def parse_request(
    tensors: Tensors,
    parameters: Mapping[str, Any] | None = None,
    request_id: str = "",
    max_input_len: int | None = None,
) -> EngineRequest:
    """Validate and convert the contract's tensors; raises InvalidInput naming the input."""
    parameters = parameters or {}
    if "input_ids" not in tensors:
        raise InvalidInput("input 'input_ids' is required (INT32 [1, T] token ids)")
    length = scalar(tensors, "input_lengths")
    ids = token_row(tensors, "input_ids", None if length is None else int(length))
    if not ids:
        raise InvalidInput("input_ids is empty: send at least one prompt token")
    if max_input_len is not None and len(ids) > max_input_len:
        raise InvalidInput(
            f"prompt has {len(ids)} tokens, more than this engine's max_input_len={max_input_len}; shorten it"
        )
    out_len = scalar(tensors, "request_output_len")
    if out_len is None:
        raise InvalidInput("input 'request_output_len' is required (INT32 [1, 1], tokens to generate)")
    if int(out_len) <= 0:
        raise InvalidInput(f"request_output_len must be >= 1, got {int(out_len)}")
    for name in ("beam_width", "num_return_sequences"):
        value = int(scalar(tensors, name, 1))
        if value != 1:
            raise InvalidInput(f"{name}={value} is not supported: this deployment serves {name}=1 only")
    end_id = scalar(tensors, "end_id")
    cpp = tensors.get("context_phase_params")
    return EngineRequest(
        request_id=request_id,
        input_ids=ids,
        stop=StopCondition(
            max_new_tokens=int(out_len),
            end_id=None if end_id is None or int(end_id) < 0 else int(end_id),
            stop_words=word_list(tensors, "stop_words_list"),
        ),
        bad_words=word_list(tensors, "bad_words_list"),
        sampling=_sampling(tensors),
        request_type=RequestType.from_parameters(parameters),
        streaming=flag(tensors, "streaming"),
        exclude_input_in_output=flag(tensors, "exclude_input_in_output"),
        context_phase_params=None if cpp is None or cpp.size == 0 else cpp.astype(np.uint8).tobytes(),
        return_perf_metrics=flag(tensors, "return_perf_metrics"),
        return_log_probs=flag(tensors, "return_log_probs"),
        return_num_input_tokens=flag(tensors, "return_num_input_tokens"),
        return_num_output_tokens=flag(tensors, "return_num_output_tokens"),
        pad_id=int(scalar(tensors, "pad_id", 0)),
    )


@dataclass(frozen=True, slots=True)
class PerfMetrics:
    """TensorRT-LLM's per-request perf outputs; times are wall-clock ns (time.time_ns)."""

    arrival_time_ns: int = 0
    first_scheduled_time_ns: int = 0
    first_token_time_ns: int = 0
    last_token_time_ns: int = 0
    kv_cache_alloc_new_blocks: int = 0
    kv_cache_reused_blocks: int = 0
    kv_cache_alloc_total_blocks: int = 0

    def tensors(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name in PERF_OUTPUTS:
            dtype = np.int64 if name.endswith("_ns") else np.int32
            out[name] = np.array([[getattr(self, name)]], dtype=dtype)
        return out

    @classmethod
    def from_tensors(cls, tensors: Tensors) -> "PerfMetrics | None":
        if "arrival_time_ns" not in tensors:
            return None
        return cls(**{name: int(scalar(tensors, name, 0)) for name in PERF_OUTPUTS})


@dataclass(frozen=True, slots=True)
class EngineOutput:
    """One engine response: `tokens` is exactly the row of `output_ids`."""

    tokens: tuple[int, ...]
    context_phase_params: bytes | None = None
    perf: PerfMetrics | None = None
    num_input_tokens: int = 0
    num_output_tokens: int = 0

    def tensors(self, request: EngineRequest) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {
            "output_ids": np.array([[self.tokens]], dtype=np.int32).reshape(1, 1, len(self.tokens)),
            "sequence_length": np.array([[len(self.tokens)]], dtype=np.int32),
        }
        if self.context_phase_params is not None:
            out["context_phase_params"] = np.frombuffer(self.context_phase_params, dtype=np.uint8).reshape(1, -1)
        if request.return_perf_metrics and self.perf is not None:
            out.update(self.perf.tensors())
        if request.return_log_probs:
            # The stub's model is deterministic: each chosen token has probability 1.
            out["cum_log_probs"] = np.zeros((1, 1), dtype=np.float32)
            out["output_log_probs"] = np.zeros((1, 1, len(self.tokens)), dtype=np.float32)
        if request.return_num_input_tokens:
            out["num_input_tokens"] = np.array([[self.num_input_tokens]], dtype=np.int32)
        if request.return_num_output_tokens:
            out["num_output_tokens"] = np.array([[self.num_output_tokens]], dtype=np.int32)
        return out

    @classmethod
    def from_tensors(cls, tensors: Tensors) -> "EngineOutput":
        """Parse a response (ours or a real TensorRT-LLM engine's), honouring sequence_length."""
        ids = tensors.get("output_ids")
        if ids is None:
            raise ValueError("engine response has no output_ids")
        row = ids.reshape(-1)[: ids.shape[-1]] if ids.ndim else ids.reshape(-1)  # first beam
        length = scalar(tensors, "sequence_length")
        if length is not None:
            row = row[: int(length)]
        cpp = tensors.get("context_phase_params")
        return cls(
            tokens=tuple(int(t) for t in row),
            context_phase_params=None if cpp is None else cpp.astype(np.uint8).tobytes(),
            perf=PerfMetrics.from_tensors(tensors),
            num_input_tokens=int(scalar(tensors, "num_input_tokens", 0)),
            num_output_tokens=int(scalar(tensors, "num_output_tokens", 0)),
        )


_CONCATENATED = frozenset({"output_ids", "output_log_probs"})  # per-token outputs: along the last axis
_SUMMED = frozenset({"sequence_length", "cum_log_probs"})


def coalesce(responses: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Several consecutive streamed responses of one request as one: token outputs joined,
    lengths summed, everything else (perf outputs, cumulative counts) from the latest.

    Lets a consumer that fell behind forward one response instead of many (each response
    sent from the python backend is an IPC round trip).
    """
    if len(responses) == 1:
        return dict(responses[0])
    out = dict(responses[-1])
    for name in _CONCATENATED:
        parts = [r[name] for r in responses if name in r]
        if parts:
            out[name] = np.concatenate([np.asarray(a) for a in parts], axis=-1)
    for name in _SUMMED:
        parts = [r[name] for r in responses if name in r]
        if parts:
            out[name] = np.sum([np.asarray(a) for a in parts], axis=0)
    return out
