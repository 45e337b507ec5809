"""The tensor contract (orchestrator.wire.contract, orchestrator.wire.stop_condition word lists) and config parsing.

Properties: accepted shapes parse to the same request, every rejected input raises
InvalidInput naming that input, word lists round-trip, responses honour sequence_length,
and every configuration error names the offending key.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.routing.policies import POLICIES, make_policy
from orchestrator.serving.config import OrchestratorConfig
from orchestrator.stub_engine.config import EngineConfig
from orchestrator.text.preprocess import TextLimits
from orchestrator.wire.contract import (
    FORWARDED_INPUTS,
    EngineOutput,
    EngineRequest,
    PerfMetrics,
    RequestType,
    SamplingParams,
    parse_request,
    with_batch_dim,
)
from orchestrator.wire.errors import ErrorCode, InvalidInput
from orchestrator.wire.stop_condition import StopCondition, build_word_list, parse_word_list

Tensors = dict[str, np.ndarray]
IDS = [259, 35, 102, 295, 35, 118]


def scalars(shape: tuple[int, ...]) -> Tensors:
    """A full request whose scalar inputs all have `shape` ([1] or [1, 1])."""

    def s(value: Any, dtype: Any) -> np.ndarray:
        return np.array(value, dtype=dtype).reshape(shape)

    return {
        "input_ids": np.array([IDS], dtype=np.int32),
        "input_lengths": s(len(IDS), np.int32),
        "request_output_len": s(9, np.int32),
        "end_id": s(2, np.int32),
        "pad_id": s(0, np.int32),
        "beam_width": s(1, np.int32),
        "num_return_sequences": s(1, np.int32),
        "runtime_top_k": s(7, np.int32),
        "runtime_top_p": s(0.5, np.float32),
        "temperature": s(0.75, np.float32),
        "seed": s(123, np.uint64),
        "min_tokens": s(1, np.int32),
        "streaming": s(True, bool),
        "exclude_input_in_output": s(True, bool),
        "return_num_input_tokens": s(True, bool),
        "stop_words_list": np.array([[[5, 6, 7], [2, 3, -1]]], dtype=np.int32),
    }


def minimal(**overrides: np.ndarray) -> Tensors:
    tensors: Tensors = {
        "input_ids": np.array([IDS], dtype=np.int32),
        "request_output_len": np.array([[4]], dtype=np.int32),
    }
    tensors.update(overrides)
    return tensors


def one(value: Any, dtype: Any = np.int32) -> np.ndarray:
    return np.array([[value]], dtype=dtype)


# -- parse_request ------------------------------------------------------------------------


def test_scalars_shaped_1_and_1x1_parse_identically() -> None:
    """Scalars as [1] (python backend batching) and [1, 1] give the same request, with every field read."""
    flat = parse_request(scalars((1,)), {"request_type": "generation_only"}, "rid")
    nested = parse_request(scalars((1, 1)), {"request_type": "generation_only"}, "rid")
    assert flat == nested
    assert flat == EngineRequest(
        request_id="rid",
        input_ids=tuple(IDS),
        stop=StopCondition(max_new_tokens=9, end_id=2, stop_words=((5, 6), (7,))),
        sampling=SamplingParams(temperature=0.75, top_k=7, top_p=0.5, seed=123, min_tokens=1),
        request_type=RequestType.GENERATION_ONLY,
        streaming=True,
        exclude_input_in_output=True,
        return_num_input_tokens=True,
    )


def test_input_lengths_cuts_input_ids_and_must_fit() -> None:
    """input_lengths selects a prefix of input_ids; a length beyond the row is InvalidInput."""
    assert parse_request(minimal(input_lengths=one(3))).input_ids == tuple(IDS[:3])
    with pytest.raises(InvalidInput, match="input_lengths"):
        parse_request(minimal(input_lengths=one(len(IDS) + 1)))


def test_negative_end_id_means_none() -> None:
    """end_id < 0 disables the end token (TensorRT-LLM's -1 convention)."""
    assert parse_request(minimal(end_id=one(-1))).stop.end_id is None
    assert parse_request(minimal()).stop.end_id is None


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"beam_width": one(2)}, "beam_width"),
        ({"num_return_sequences": one(2)}, "num_return_sequences"),
        ({"request_output_len": one(0)}, "request_output_len"),
        ({"request_output_len": one(-3)}, "request_output_len"),
        ({"temperature": one(np.nan, np.float32)}, "temperature"),
        ({"temperature": one(np.inf, np.float32)}, "temperature"),
        ({"temperature": one(-0.5, np.float32)}, "temperature"),
        ({"runtime_top_p": one(np.nan, np.float32)}, "runtime_top_p"),
        ({"runtime_top_k": one(-1)}, "runtime_top_k"),
        ({"min_tokens": one(-1)}, "min_tokens"),
        ({"input_ids": np.array([IDS, IDS], dtype=np.int32)}, "input_ids"),
        ({"input_ids": np.zeros((1, 0), dtype=np.int32)}, "input_ids"),
        ({"request_output_len": np.array([[4, 4]], dtype=np.int32)}, "request_output_len"),
        ({"stop_words_list": np.array([[[5, 6], [2, 1]]], dtype=np.int32)}, "stop_words_list"),
        ({"stop_words_list": np.array([[[5, 6], [3, -1]]], dtype=np.int32)}, "stop_words_list"),
        ({"stop_words_list": np.array([[5, 6, 7]], dtype=np.int32)}, "stop_words_list"),
    ],
    ids=["beam_width", "num_return_sequences", "output_len_0", "output_len_neg", "temp_nan", "temp_inf",
         "temp_neg", "top_p_nan", "top_k_neg", "min_tokens_neg", "batch_of_2", "empty_ids", "output_len_2_values",
         "stop_offsets_decrease", "stop_offsets_overrun", "word_list_not_2_rows"],
)  # fmt: skip
def test_parse_request_rejects_with_the_input_name(overrides: Tensors, names: str) -> None:
    """Each unsupported or invalid input raises InvalidInput (INVALID_ARG) whose message names it."""
    with pytest.raises(InvalidInput) as info:
        parse_request(minimal(**overrides))
    assert info.value.code is ErrorCode.INVALID_ARG
    assert names in str(info.value)


@pytest.mark.parametrize("missing", ["input_ids", "request_output_len"])
def test_required_inputs(missing: str) -> None:
    """input_ids and request_output_len are required; the error names the missing one."""
    tensors = minimal()
    del tensors[missing]
    with pytest.raises(InvalidInput, match=missing):
        parse_request(tensors)


def test_max_input_len_is_enforced_by_parse_request() -> None:
    """parse_request's max_input_len accepts a prompt at the limit and rejects one above it."""
    assert parse_request(minimal(), max_input_len=len(IDS)).input_ids == tuple(IDS)
    with pytest.raises(InvalidInput, match="max_input_len"):
        parse_request(minimal(), max_input_len=len(IDS) - 1)


@pytest.mark.parametrize("value", [None, "", "context_and_generation"])
def test_absent_request_type_means_aggregate(value: object) -> None:
    params = {} if value is None else {"request_type": value}
    assert RequestType.from_parameters(params) is RequestType.AGGREGATE
    assert parse_request(minimal(), params).request_type is RequestType.AGGREGATE


@pytest.mark.parametrize("value", ["aggregate", "context-only", "CONTEXT_ONLY", 3, "generation"])
def test_unknown_request_type_is_refused_with_the_valid_values(value: object) -> None:
    """A misspelt phase must not silently run both phases (the real backend would fall back)."""
    with pytest.raises(InvalidInput, match="'request_type'.*unknown: use 'context_only', 'generation_only'"):
        parse_request(minimal(), {"request_type": value})


@pytest.mark.parametrize("kind", [RequestType.CONTEXT_ONLY, RequestType.GENERATION_ONLY])
def test_known_request_types_parse(kind: RequestType) -> None:
    assert RequestType.from_parameters({"request_type": kind.value}) is kind


def test_empty_context_phase_params_means_none() -> None:
    """A zero-length context_phase_params is no handoff; otherwise its bytes are kept exactly."""
    assert parse_request(minimal(context_phase_params=np.zeros((1, 0), dtype=np.uint8))).context_phase_params is None
    blob = bytes(range(256))
    tensors = minimal(context_phase_params=np.frombuffer(blob, dtype=np.uint8).reshape(1, -1))
    assert parse_request(tensors).context_phase_params == blob


# -- word lists ---------------------------------------------------------------------------

WORDS = st.lists(st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=6).map(tuple), max_size=10)


@settings(max_examples=300, deadline=None)
@given(words=WORDS)
def test_word_list_round_trip(words: list[tuple[int, ...]]) -> None:
    """parse_word_list(build_word_list(w)) == w, rows are equally long, and parse_request reads it back."""
    flat, offsets = build_word_list(words)
    assert len(flat) == len(offsets)
    assert parse_word_list(flat, offsets) == tuple(words)
    tensor = np.array([flat, offsets], dtype=np.int32).reshape(1, 2, -1)
    assert parse_request(minimal(stop_words_list=tensor)).stop.stop_words == tuple(words)


@settings(max_examples=100, deadline=None)
@given(words=st.lists(st.lists(st.integers(0, 1000), max_size=4).map(tuple), max_size=8))
def test_word_list_drops_empty_words(words: list[tuple[int, ...]]) -> None:
    """Empty words carry no stop condition and are dropped on parse."""
    assert parse_word_list(*build_word_list(words)) == tuple(w for w in words if w)


@pytest.mark.parametrize("shape", [(2, 0), (1, 2, 0)])
def test_empty_word_list(shape: tuple[int, ...]) -> None:
    """An empty list arrives as [2, 0] (or [1, 2, 0]) and means no words."""
    assert build_word_list([]) == ([], [])
    assert parse_word_list([], []) == ()
    assert parse_request(minimal(stop_words_list=np.zeros(shape, dtype=np.int32))).stop.stop_words == ()


def test_word_list_padding_and_bad_offsets() -> None:
    """Offsets padded with -1 stop the parse; offsets that go back or overrun are ValueErrors."""
    assert parse_word_list([5, 6, 7, 0], [2, 3, -1, -1]) == ((5, 6), (7,))
    with pytest.raises(ValueError, match="offsets"):
        parse_word_list([5, 6], [2, 1])
    with pytest.raises(ValueError, match="offsets"):
        parse_word_list([5, 6], [3, -1])


# -- with_batch_dim -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        ("request_output_len", (1,), (1, 1)),
        ("request_output_len", (1, 1), (1, 1)),
        ("request_output_len", (), (1, 1)),
        ("temperature", (1,), (1, 1)),
        ("input_ids", (7,), (1, 7)),
        ("input_ids", (1, 7), (1, 7)),
        ("embedding_bias", (5,), (1, 5)),
        ("context_phase_params", (40,), (1, 40)),
        ("stop_words_list", (2, 3), (1, 2, 3)),
        ("stop_words_list", (1, 2, 3), (1, 2, 3)),
        ("bad_words_list", (2, 0), (1, 2, 0)),
    ],
)
def test_with_batch_dim_shapes(name: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    """Every input gets the [1, ...] shape a BLS child request needs, values unchanged."""
    value = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    out = with_batch_dim(name, value)
    assert out.shape == expected
    assert out.reshape(-1).tolist() == value.reshape(-1).tolist()


def test_every_forwarded_input_gets_a_batch_dim() -> None:
    """All forwarded inputs of a parsed request round-trip through with_batch_dim unchanged."""
    tensors = scalars((1,))
    batched = {name: with_batch_dim(name, tensors[name]) for name in FORWARDED_INPUTS if name in tensors}
    assert all(v.shape[0] == 1 for v in batched.values())
    keep = {k: v for k, v in tensors.items() if k not in batched}
    assert parse_request({**keep, **batched}, {}, "rid") == parse_request(tensors, {}, "rid")


# -- EngineOutput -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 6), (1, 6), (6,)])
def test_engine_output_honours_sequence_length(shape: tuple[int, ...]) -> None:
    """from_tensors keeps only the first sequence_length ids of the (padded) output row."""
    ids = np.array([11, 12, 13, 0, 0, 0], dtype=np.int32).reshape(shape)
    out = EngineOutput.from_tensors({"output_ids": ids, "sequence_length": np.array([[3]], dtype=np.int32)})
    assert out.tokens == (11, 12, 13)
    assert EngineOutput.from_tensors({"output_ids": ids}).tokens == (11, 12, 13, 0, 0, 0)
    assert EngineOutput.from_tensors({"output_ids": ids, "sequence_length": np.array([0], dtype=np.int32)}).tokens == ()


def test_engine_output_round_trips_through_tensors() -> None:
    """tensors() then from_tensors() gives back tokens, blob, perf and counts (when requested)."""
    request = parse_request(minimal(return_perf_metrics=one(True, bool), return_num_input_tokens=one(True, bool),
                                    return_num_output_tokens=one(True, bool), return_log_probs=one(True, bool)))  # fmt: skip
    perf = PerfMetrics(arrival_time_ns=1, first_scheduled_time_ns=2, first_token_time_ns=3, last_token_time_ns=4)
    for tokens in [(7,), (7, 8, 9)]:
        original = EngineOutput(
            tokens=tokens,
            context_phase_params=b"\x00\xffblob",
            perf=perf,
            num_input_tokens=6,
            num_output_tokens=len(tokens),
        )
        tensors = original.tensors(request)
        assert tensors["output_ids"].shape == (1, 1, len(tokens))
        assert tensors["output_log_probs"].shape == (1, 1, len(tokens))
        assert EngineOutput.from_tensors(tensors) == original


@pytest.mark.parametrize("shape", [(1, 1, 0), (1, 0), (0,)])
def test_engine_output_parses_an_empty_response(shape: tuple[int, ...]) -> None:
    """An empty response (an engine's final output once end_id is reached) parses to no tokens."""
    ids = np.zeros(shape, dtype=np.int32)
    assert (
        EngineOutput.from_tensors({"output_ids": ids, "sequence_length": np.array([[0]], dtype=np.int32)}).tokens == ()
    )
    assert EngineOutput.from_tensors({"output_ids": ids}).tokens == ()


def test_engine_output_empty_round_trip() -> None:
    """EngineOutput(tokens=()).tensors() is [1, 1, 0] and parses back to the same output."""
    tensors = EngineOutput(tokens=()).tensors(parse_request(minimal()))
    assert tensors["output_ids"].shape == (1, 1, 0)
    assert EngineOutput.from_tensors(tensors) == EngineOutput(tokens=())


def test_engine_output_tensors_omit_unrequested_outputs() -> None:
    """Without the return_* flags only output_ids, sequence_length (and a blob if any) are sent."""
    tensors = EngineOutput(tokens=(1, 2), perf=PerfMetrics(), num_input_tokens=3).tensors(parse_request(minimal()))
    assert set(tensors) == {"output_ids", "sequence_length"}
    assert EngineOutput.from_tensors(tensors) == EngineOutput(tokens=(1, 2))


def test_engine_output_without_ids_is_an_error() -> None:
    with pytest.raises(ValueError, match="output_ids"):
        EngineOutput.from_tensors({"sequence_length": np.array([[1]], dtype=np.int32)})


# -- configuration ------------------------------------------------------------------------


def test_orchestrator_config_parses_lists_and_policies() -> None:
    """Comma-separated pools are split and stripped; policies default to round_robin."""
    config = OrchestratorConfig.from_parameters(
        {"context_engines": " context_0, context_1 ,", "generation_engines": "generation_0"}
    )
    assert config == OrchestratorConfig(("context_0", "context_1"), ("generation_0",))
    assert (config.context_policy, config.generation_policy) == ("round_robin", "round_robin")


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"generation_engines": "g"}, "context_engines"),
        ({"context_engines": "c,c", "generation_engines": "g"}, "context_engines"),
        ({"context_engines": " , ,", "generation_engines": ""}, "generation_engines"),
        ({"context_engines": "c"}, "generation_engines"),
        ({"context_engines": "c", "generation_engines": "g,g"}, "generation_engines"),
        ({"context_engines": "c", "generation_engines": "g", "context_policy": "fastest"}, "context_policy"),
        ({"context_engines": "c", "generation_engines": "g", "generation_policy": "sticky"}, "generation_policy"),
    ],
)
def test_orchestrator_config_errors_name_the_key(params: dict[str, str], key: str) -> None:
    """Empty or duplicate pools and unknown policies fail at load, naming the key."""
    with pytest.raises(ValueError) as info:
        OrchestratorConfig.from_parameters(params)
    assert f"'{key}'" in str(info.value)
    if key.endswith("_policy"):
        assert all(name in str(info.value) for name in POLICIES), "the error lists the valid policies"


def test_make_policy_unknown_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        make_policy("fastest", key="context_policy")
    assert "context_policy" in str(info.value) and "round_robin" in str(info.value)


def test_engine_config_from_parameters_types_and_ignores_foreign_keys() -> None:
    """Known keys are parsed to their field types; other backends' keys are ignored."""
    config = EngineConfig.from_parameters(
        {
            "max_batch_size": "8",
            "step_overhead_ms": "1.5",
            "decode_us_per_seq": "2",
            "gpt_model_type": "inflight_fused_batching",
        }
    )
    assert config == EngineConfig(max_batch_size=8, step_overhead_ms=1.5, decode_us_per_seq=2.0)
    assert type(config.max_batch_size) is int and type(config.decode_us_per_seq) is float


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"max_batch_size": "abc"}, "max_batch_size"),
        ({"max_batch_size": "1.5"}, "max_batch_size"),
        ({"max_batch_size": "0"}, "max_batch_size"),
        ({"max_num_tokens": "-4"}, "max_num_tokens"),
        ({"max_input_len": "0"}, "max_input_len"),
        ({"step_overhead_ms": "-1"}, "step_overhead_ms"),
        ({"prefill_us_per_token": "-0.001"}, "prefill_us_per_token"),
        ({"decode_ms_per_step": "fast"}, "decode_ms_per_step"),
        ({"decode_us_per_seq": "-2"}, "decode_us_per_seq"),
    ],
)
def test_engine_config_errors_name_the_key(params: dict[str, str], key: str) -> None:
    """Bad numbers and out-of-range values (negative costs, sizes < 1) fail naming the key."""
    with pytest.raises(ValueError) as info:
        EngineConfig.from_parameters(params)
    assert f"'{key}'" in str(info.value)


@pytest.mark.parametrize("key", ["step_overhead_ms", "prefill_us_per_token", "decode_ms_per_step", "decode_us_per_seq"])
def test_engine_config_constructor_rejects_negative_cost(key: str) -> None:
    with pytest.raises(ValueError, match=key):
        EngineConfig(**{key: -1.0})  # type: ignore[arg-type]


def test_engine_config_step_seconds() -> None:
    """The cost model: overhead + prefill per token, plus decode costs only when something decodes."""
    config = EngineConfig(
        step_overhead_ms=1.0, prefill_us_per_token=500.0, decode_ms_per_step=2.0, decode_us_per_seq=1000.0
    )
    assert config.step_seconds(0, 0) == pytest.approx(0.001)
    assert config.step_seconds(4, 0) == pytest.approx(0.003)
    assert config.step_seconds(4, 3) == pytest.approx(0.008)
    assert EngineConfig.free().step_seconds(1000, 64) == 0.0


def test_text_limits_parse_and_errors_name_the_key() -> None:
    """TextLimits: blank means default; non-integers and values < 1 fail naming the key."""
    assert TextLimits.from_parameters({"max_input_len": "128", "max_output_len": " "}) == TextLimits(128, 4096)
    for key in ("max_input_len", "max_output_len"):
        for raw in ("abc", "0", "-5", "2.5"):
            with pytest.raises(ValueError) as info:
                TextLimits.from_parameters({key: raw})
            assert f"'{key}'" in str(info.value)


def test_coalesce_joins_token_outputs_and_keeps_the_latest_of_the_rest() -> None:
    from orchestrator.wire.contract import coalesce

    first = {"output_ids": np.array([[[5, 6]]], dtype=np.int32), "sequence_length": np.array([[2]], dtype=np.int32),
             "num_output_tokens": np.array([[3]], dtype=np.int32), "last_token_time_ns": np.array([[10]], dtype=np.int64)}  # fmt: skip
    second = {"output_ids": np.array([[[7]]], dtype=np.int32), "sequence_length": np.array([[1]], dtype=np.int32),
              "num_output_tokens": np.array([[4]], dtype=np.int32), "last_token_time_ns": np.array([[20]], dtype=np.int64)}  # fmt: skip
    joined = coalesce([first, second])
    assert joined["output_ids"].tolist() == [[[5, 6, 7]]] and joined["sequence_length"].tolist() == [[3]]
    assert joined["num_output_tokens"].tolist() == [[4]] and joined["last_token_time_ns"].tolist() == [[20]]
    assert EngineOutput.from_tensors(joined).tokens == (5, 6, 7)
    assert coalesce([first]) == first


def test_negative_token_ids_are_refused_where_tensors_become_a_request() -> None:
    """One numpy check at the wire; engines take the ids as checked (no per-token loop per engine)."""
    request_len = np.array([[4]], np.int32)
    with pytest.raises(InvalidInput, match="input 'input_ids' must be token ids >= 0"):
        parse_request({"input_ids": np.array([[1, -2, 3]], np.int32), "request_output_len": request_len})
    ids = parse_request({"input_ids": np.array([[1, 2, 3, -1]], np.int32), "input_lengths": np.array([[3]], np.int32),
                         "request_output_len": request_len}).input_ids  # fmt: skip
    assert ids == (1, 2, 3), "padding beyond input_lengths is not looked at"
