"""The bad-input catalogue (README "Errors"), each case against a real tritonserver.

Every case must end in exactly one error whose message names the problem and the fix,
typed INVALID_ARG (or the right code) both as Triton's code and as the message's first
word (a gRPC stream carries only the message); none may carry a traceback, and the server
keeps serving afterwards. Cases marked `triton` are Triton's own checks of the model
config (missing input, wrong dtype or shape), made before our models run.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from orchestrator.text.tokenizer import BuiltinTokenizer
from orchestrator.tools.client import generate, grpc_inputs
from orchestrator.tools.launch import TritonServer

TOK = BuiltinTokenizer()
IDS = TOK.encode("the cat sat on the mat and the dog sat on the log")
Tensors = dict[str, np.ndarray]


def text_request(prompt: str | bytes = "the cat sat on the mat", max_tokens: int = 4, **extra: Any) -> Tensors:
    """Ensemble inputs as TensorRT-LLM clients send them (leading batch dim); extras by type."""
    text = prompt.encode() if isinstance(prompt, str) else prompt
    out: Tensors = {
        "text_input": np.array([[text]], dtype=object),
        "max_tokens": np.array([[max_tokens]], dtype=np.int32),
    }
    for name, value in extra.items():
        if isinstance(value, np.ndarray):
            out[name] = value
        elif isinstance(value, bool):
            out[name] = np.array([[value]], dtype=bool)
        elif isinstance(value, int):
            out[name] = np.array([[value]], dtype=np.int32)
        elif isinstance(value, float):
            out[name] = np.array([[value]], dtype=np.float32)
        else:  # a word list
            out[name] = np.array([[w.encode() if isinstance(w, str) else w for w in value]], dtype=object)
    return out


def token_request(ids: list[int] = IDS, output_len: int = 4, **extra: np.ndarray) -> Tensors:
    """The tensorrt_llm contract's inputs (the orchestrator's and the engines')."""
    return {
        "input_ids": np.array([ids], dtype=np.int32),
        "input_lengths": np.array([[len(ids)]], dtype=np.int32),
        "request_output_len": np.array([[output_len]], dtype=np.int32),
        **extra,
    }


def without(tensors: Tensors, name: str) -> Tensors:
    return {k: v for k, v in tensors.items() if k != name}


@dataclass
class Outcome:
    responses: list[Any] = field(default_factory=list)
    error: InferenceServerException | None = None


def call(
    server: TritonServer, model: str, tensors: Tensors, request_id: str = "", params: dict[str, Any] | None = None
) -> Outcome:
    """One request over a gRPC stream; waits for its final response or its error."""
    outcome = Outcome()
    done = threading.Event()

    def callback(result: Any, error: Any) -> None:
        if error is not None:
            outcome.error = error
            done.set()
            return
        outcome.responses.append(result)
        if result.get_response().parameters["triton_final_response"].bool_param:
            done.set()

    inputs = grpc_inputs(tensors)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.start_stream(callback=callback)
        client.async_stream_infer(
            model, inputs, request_id=request_id, parameters=params, enable_empty_final_response=True
        )
        assert done.wait(60), "no final response and no error: the request hung"
        client.stop_stream()
    return outcome


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    tensors: Callable[[], Tensors]
    code: str  # our code word, or "triton" for Triton's own config checks
    message: str  # a part of the message that says what is wrong
    params: dict[str, Any] | None = None
    request_id: str = ""


def _blob(server: TritonServer, engine: str = "context_0", ids: list[int] = IDS) -> np.ndarray:
    out = call(server, engine, token_request(ids), "blob-source:ctx", {"request_type": "context_only"})
    assert out.error is None, out.error
    return out.responses[0].as_numpy("context_phase_params")


GEN = {"request_type": "generation_only"}
CATALOGUE = [
    # -- text inputs (ensemble) --------------------------------------------------------
    Case(
        "text_input missing",
        "ensemble",
        lambda: without(text_request(), "text_input"),
        "triton",
        "missing required input(s) ['text_input']",
    ),
    Case(
        "text_input empty",
        "ensemble",
        lambda: text_request(""),
        "INVALID_ARG",
        "'text_input' is empty: send a non-empty prompt",
    ),
    Case(
        "text_input not UTF-8",
        "ensemble",
        lambda: text_request(b"caf\xe9 \xff"),
        "INVALID_ARG",
        "'text_input' is not valid UTF-8 (byte 3)",
    ),
    Case(
        "text_input wrong dtype",
        "ensemble",
        lambda: {**text_request(), "text_input": np.array([[7]], dtype=np.int32)},
        "triton",
        "data-type is",
    ),
    Case(
        "text_input two prompts in one request",
        "ensemble",
        lambda: {**text_request(), "text_input": np.array([[b"a", b"b"]], dtype=object)},
        "triton",
        "unexpected shape",
    ),
    Case(
        "text_input batch of two",
        "ensemble",
        lambda: {
            **text_request(),
            "text_input": np.array([[b"a"], [b"b"]], dtype=object),
            "max_tokens": np.array([[4], [4]], dtype=np.int32),
        },
        "INVALID_ARG",
        "one prompt per request",
    ),
    Case(
        "prompt longer than max_input_len",
        "ensemble",
        lambda: text_request("x" * 5000),
        "INVALID_ARG",
        "more than max_input_len=4096; shorten it",
    ),
    # -- max_tokens ------------------------------------------------------------------
    Case(
        "max_tokens missing",
        "ensemble",
        lambda: without(text_request(), "max_tokens"),
        "triton",
        "missing required input(s) ['max_tokens']",
    ),
    Case(
        "max_tokens zero",
        "ensemble",
        lambda: text_request(max_tokens=0),
        "INVALID_ARG",
        "'max_tokens' must be between 1 and 4096, got 0",
    ),
    Case(
        "max_tokens negative",
        "ensemble",
        lambda: text_request(max_tokens=-3),
        "INVALID_ARG",
        "'max_tokens' must be between 1 and 4096, got -3",
    ),
    Case(
        "max_tokens above the limit",
        "ensemble",
        lambda: text_request(max_tokens=4097),
        "INVALID_ARG",
        "'max_tokens' must be between 1 and 4096, got 4097",
    ),
    Case(
        "max_tokens wrong dtype",
        "ensemble",
        lambda: {**text_request(), "max_tokens": np.array([[4.0]], dtype=np.float32)},
        "triton",
        "data-type is",
    ),
    # -- unsupported features --------------------------------------------------------
    Case(
        "beam_width 2", "ensemble", lambda: text_request(beam_width=2), "INVALID_ARG", "beam_width=2 is not supported"
    ),
    Case(
        "num_return_sequences 3",
        "ensemble",
        lambda: text_request(num_return_sequences=3),
        "INVALID_ARG",
        "num_return_sequences=3 is not supported",
    ),
    # -- sampling values -------------------------------------------------------------
    Case(
        "temperature NaN",
        "ensemble",
        lambda: text_request(temperature=float("nan")),
        "INVALID_ARG",
        "'temperature' must be a finite number >= 0.0, got nan",
    ),
    Case(
        "temperature negative",
        "ensemble",
        lambda: text_request(temperature=-0.5),
        "INVALID_ARG",
        "'temperature' must be a finite number >= 0.0",
    ),
    Case(
        "top_p above 1",
        "ensemble",
        lambda: text_request(top_p=1.5),
        "INVALID_ARG",
        "'runtime_top_p' must be a finite number >= 0.0 and <= 1.0, got 1.5",
    ),
    Case(
        "top_p negative",
        "ensemble",
        lambda: text_request(top_p=-0.1),
        "INVALID_ARG",
        "'runtime_top_p' must be a finite number >= 0.0",
    ),
    Case(
        "top_k negative",
        "ensemble",
        lambda: text_request(top_k=-1),
        "INVALID_ARG",
        "'runtime_top_k' must be >= 0, got -1",
    ),
    Case(
        "repetition_penalty zero",
        "ensemble",
        lambda: text_request(repetition_penalty=0.0),
        "INVALID_ARG",
        "'repetition_penalty' must be a finite number > 0.0",
    ),
    Case(
        "length_penalty infinite",
        "ensemble",
        lambda: text_request(length_penalty=float("inf")),
        "INVALID_ARG",
        "'len_penalty' must be a finite number",
    ),
    Case(
        "presence_penalty NaN",
        "ensemble",
        lambda: text_request(presence_penalty=float("nan")),
        "INVALID_ARG",
        "'presence_penalty' must be a finite number",
    ),
    Case(
        "frequency_penalty infinite",
        "ensemble",
        lambda: text_request(frequency_penalty=float("-inf")),
        "INVALID_ARG",
        "'frequency_penalty' must be a finite number",
    ),
    Case(
        "min_tokens negative",
        "ensemble",
        lambda: text_request(min_tokens=-2),
        "INVALID_ARG",
        "'min_tokens' must be >= 0, got -2",
    ),
    Case(
        "end_id outside the vocabulary",
        "ensemble",
        lambda: text_request(end_id=10**6),
        "INVALID_ARG",
        "'end_id'=1000000 is not a token id: use -1 or 0..",
    ),
    Case(
        "pad_id outside the vocabulary",
        "ensemble",
        lambda: text_request(pad_id=-7),
        "INVALID_ARG",
        "'pad_id'=-7 is not a token id",
    ),
    # -- word lists ------------------------------------------------------------------
    Case(
        "stop_words too many entries",
        "ensemble",
        lambda: text_request(stop_words=[f"w{i}" for i in range(65)]),
        "INVALID_ARG",
        "'stop_words' has 65 entries; at most 64",
    ),
    Case(
        "bad_words too many entries",
        "ensemble",
        lambda: text_request(bad_words=[f"w{i}" for i in range(100)]),
        "INVALID_ARG",
        "'bad_words' has 100 entries; at most 64",
    ),
    Case(
        "stop word too long",
        "ensemble",
        lambda: text_request(stop_words=["z" * 5000]),
        "INVALID_ARG",
        "'stop_words' encodes to 5000 tokens; at most 4096",
    ),
    Case(
        "stop word not UTF-8",
        "ensemble",
        lambda: text_request(stop_words=[b"\xff\xfe"]),
        "INVALID_ARG",
        "'stop_words' entry is not valid UTF-8",
    ),
    Case(
        "stop_words_list oversized (token level)",
        "orchestrator",
        lambda: token_request(stop_words_list=np.zeros((1, 2, 5000), dtype=np.int32)),
        "INVALID_ARG",
        "'stop_words_list' holds 5000 ids; at most 4096",
    ),
    Case(
        "bad_words_list malformed offsets (token level)",
        "orchestrator",
        lambda: token_request(bad_words_list=np.array([[[1, 2, 3], [3, 1, -1]]], dtype=np.int32)),
        "INVALID_ARG",
        "'bad_words_list': word list offsets are not increasing",
    ),
    # -- token-level inputs ------------------------------------------------------------
    Case(
        "input_ids wrong dtype",
        "orchestrator",
        lambda: {**token_request(), "input_ids": np.array([IDS], dtype=np.float32)},
        "triton",
        "data-type is",
    ),
    Case(
        "input_lengths longer than input_ids",
        "orchestrator",
        lambda: {**token_request(), "input_lengths": np.array([[999]], dtype=np.int32)},
        "INVALID_ARG",
        "input_lengths=999 does not fit input_ids",
    ),
    Case(
        "request_output_len zero",
        "orchestrator",
        lambda: token_request(output_len=0),
        "INVALID_ARG",
        "request_output_len must be >= 1",
    ),
    Case(
        "prompt + max_tokens larger than the KV pool",
        "generation_0",
        lambda: token_request(output_len=40000),
        "INVALID_ARG",
        "lower max_tokens or raise max_tokens_in_paged_kv_cache",
    ),
    # -- request parameters ------------------------------------------------------------
    Case(
        "unknown request_type (orchestrator)",
        "orchestrator",
        token_request,
        "INVALID_ARG",
        "'request_type'='generation-only' is unknown",
        {"request_type": "generation-only"},
    ),
    Case(
        "unknown request_type (engine)",
        "context_1",
        token_request,
        "INVALID_ARG",
        "'request_type'='prefill' is unknown",
        {"request_type": "prefill"},
    ),
    Case(
        "unknown fault (engine)",
        "generation_1",
        token_request,
        "INVALID_ARG",
        "'fault'='explode' is unknown",
        {"fault": "explode"},
    ),
    # -- stop ------------------------------------------------------------------------------
    Case(
        "stop without a request id",
        "ensemble",
        lambda: text_request("", 1, stop=True),
        "INVALID_ARG",
        "stop=true needs the id of the request to stop",
    ),
    Case(
        "stop without a request id (engine)",
        "context_0",
        lambda: token_request(stop=np.array([[True]])),
        "INVALID_ARG",
        "a stop request needs the request id",
    ),
]


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.name for c in CATALOGUE])
def test_bad_input_catalogue(server: TritonServer, case: Case) -> None:
    outcome = call(server, case.model, case.tensors(), case.request_id, case.params)
    assert outcome.error is not None, f"{case.name}: expected an error, got {len(outcome.responses)} responses"
    message = outcome.error.message()
    assert case.message in message, message
    if case.code != "triton":
        assert f"{case.code}: " in message, message
    assert "Traceback" not in message and 'File "' not in message
    assert len(outcome.responses) == 0, "an error is the request's only response"


def test_catalogue_has_at_least_thirty_cases_and_the_server_keeps_serving(server: TritonServer) -> None:
    assert len(CATALOGUE) + len(BLOB_CASES) + 1 >= 30
    ok = call(server, "ensemble", text_request("the cat sat", 3), "after-bad-input")
    assert ok.error is None and ok.responses[-1].as_numpy("text_output").reshape(-1)[0].startswith(b"the cat sat")


# -- context_phase_params sent by a client straight to a generation engine -------------------
BLOB_CASES = ["missing", "forged", "truncated", "another prompt's"]


@pytest.mark.parametrize("kind", BLOB_CASES)
def test_bad_context_phase_params_are_invalid_arg(server: TritonServer, kind: str) -> None:
    blob = _blob(server)
    if kind == "missing":
        tensors = token_request()
    elif kind == "forged":
        forged = blob.copy()
        forged[0, -10] ^= 0xFF
        tensors = token_request(context_phase_params=forged)
    elif kind == "truncated":
        tensors = token_request(context_phase_params=blob[:, :-3])
    else:
        tensors = token_request(IDS[:-1], context_phase_params=blob)
    outcome = call(server, "generation_1", tensors, "blob-user:gen", GEN)
    assert outcome.error is not None and outcome.error.message().startswith("INVALID_ARG: ")
    assert "context_phase_params" in outcome.error.message()
    # nobody will pull that prefill: free it now rather than after kv_lease_timeout_s
    assert call(server, "context_0", token_request(stop=np.array([[True]])), "blob-source:ctx").error is None


def test_used_context_phase_params_are_a_replay_or_not_found(server: TritonServer) -> None:
    """A blob whose KV was already pulled: the engine that pulled it refuses it as a replay
    (INVALID_ARG, before any connection); another engine finds the lease gone (NOT_FOUND; the
    orchestrator would re-run the context phase, a direct client sees the code)."""
    blob = _blob(server, "context_1")
    first = call(server, "generation_0", token_request(context_phase_params=blob), "stale-1:gen", GEN)
    assert first.error is None
    again = call(server, "generation_0", token_request(context_phase_params=blob), "stale-2:gen", GEN)
    assert again.error is not None and again.error.message().startswith("INVALID_ARG: ")
    assert "replay" in again.error.message()
    elsewhere = call(server, "generation_1", token_request(context_phase_params=blob), "stale-3:gen", GEN)
    assert elsewhere.error is not None and elsewhere.error.message().startswith("NOT_FOUND: ")
    assert "no such lease" in elsewhere.error.message()


def test_duplicate_in_flight_request_id_is_already_exists(server: TritonServer) -> None:
    """The second request with an id in flight is refused; the first is untouched."""
    first = generate(server.grpc_url, "the cat sat on the mat", 200, stream=True, request_id="dup-id")
    assert next(first).text  # in flight: its first token has arrived
    second = call(server, "ensemble", text_request("a dog", 2), "dup-id")
    assert second.error is not None
    assert "ALREADY_EXISTS: request id 'dup-id' is already in flight" in second.error.message()
    rest = list(first)
    assert rest[-1].final and sum(len(d.text) > 0 for d in rest) > 10
