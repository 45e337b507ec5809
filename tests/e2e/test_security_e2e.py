"""The deployment secret and hostile input against a real tritonserver.

A client of Triton's ports can reach every model, engines included. So: a forged
`context_phase_params` sent straight to a generation engine is refused before the engine
connects anywhere (a socket named in it sees nothing), a pull without the secret is
refused by a context engine's transfer server, and property-based fuzzing throws random
and mutated values at every ensemble input, at handoff bytes and at the transfer
protocol's frames: each case gets a typed error or a well-formed answer, never a hang or a
crash, and every holding gauge returns to zero. Bounded in count and time, loopback only.
"""

from __future__ import annotations

import asyncio
import re
import select
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.stub_engine.handoff import Handoff
from orchestrator.stub_engine.kv_auth import KeyRing
from orchestrator.stub_engine.transfer import TcpTransport
from orchestrator.tools.launch import TritonServer
from orchestrator.tools.metrics import held, wait_released
from orchestrator.tools.overhead import ZERO_COST
from orchestrator.tools.repository import FRONTEND_MODELS, ModelSpec, derive
from orchestrator.wire.errors import ErrorCode
from tests.e2e.test_bad_input import GEN, call, text_request, token_request

CODES = tuple(f"{code.value}: " for code in ErrorCode)
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """The committed repository with free engines: fuzzed requests that run, run quickly."""
    repo = tmp_path_factory.mktemp("security_repository")
    engines = {m: ModelSpec(m, ZERO_COST) for m in ("context_0", "context_1", "generation_0", "generation_1")}
    derive(repo, {**{m: ModelSpec(m) for m in FRONTEND_MODELS}, **engines})
    with TritonServer(model_repository=Path(repo)) as srv:
        yield srv


def keys_of(server: TritonServer) -> KeyRing:
    return KeyRing.parse(server.kv_secret, "the test server's DISAGG_KV_SECRET")


def fresh_blob(server: TritonServer, engine: str = "context_0") -> bytes:
    out = call(server, engine, token_request(), "fuzz-source:ctx", {"request_type": "context_only"})
    assert out.error is None, out.error
    return out.responses[0].as_numpy("context_phase_params").tobytes()


def as_tensor(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.uint8).reshape(1, -1)


def assert_typed(outcome: Any, *, allow_triton: bool = False) -> str:
    """An error that says its type first (or, where allowed, one of Triton's own input checks);
    never INTERNAL, never a traceback, never a dead stub."""
    assert outcome.error is not None, "expected an error"
    message = re.sub(r"^in ensemble '\w+', ", "", outcome.error.message())  # Triton names the ensemble first
    assert "Traceback" not in message and "not healthy" not in message, message
    assert not message.startswith("INTERNAL"), message
    assert message.startswith(CODES) or allow_triton, message
    return message


def test_a_forged_handoff_never_makes_a_generation_engine_connect(server: TritonServer) -> None:
    """A blob naming a listening socket, signed with a key that is not the deployment's, is
    refused (INVALID_ARG) and the socket sees no connection; signed with the deployment's
    key, the same blob does reach the socket (the check could have seen a connection)."""
    genuine = Handoff.decode(fresh_blob(server), keys_of(server))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        aimed = replace(genuine, port=listener.getsockname()[1], mac=b"")
        forged = aimed.encode(KeyRing.parse("guessed-secret-0123456789", "attacker"))
        outcome = call(server, "generation_0", token_request(context_phase_params=as_tensor(forged)), "forged:gen", GEN)
        assert "not signed by this deployment" in assert_typed(outcome)
        assert outcome.error.message().startswith("INVALID_ARG: ")
        assert select.select([listener], [], [], 0)[0] == []  # refused at intake: nothing can connect later
        signed = aimed.encode(keys_of(server))
        control = call(server, "generation_0", token_request(context_phase_params=as_tensor(signed)), "aimed:gen", GEN)
        assert select.select([listener], [], [], 0)[0] == [listener]  # the engine did connect this time
        assert control.error is not None and control.error.message().startswith("NOT_FOUND: ")
    assert call(server, "context_0", token_request(stop=np.array([[True]])), "fuzz-source:ctx").error is None
    assert wait_released(server.metrics_url, 15) == {}


def test_a_pull_without_the_secret_is_refused_by_a_real_context_engine(server: TritonServer) -> None:
    keys = keys_of(server)
    handoff = Handoff.decode(fresh_blob(server), keys)
    outsider = TcpTransport(KeyRing.parse("not-the-deployment-secret", "outsider"))
    with pytest.raises(Exception, match="unauthenticated KV pull"):
        asyncio.run(outsider.pull(handoff, 0, 1))
    shards = asyncio.run(TcpTransport(keys).pull(handoff, 0, 1))  # the lease survived; the real secret pulls
    assert shards.shape[1] == 1
    assert wait_released(server.metrics_url, 15) == {}


# -- fuzzing -----------------------------------------------------------------------------

_INT32 = st.one_of(st.sampled_from([-(2**31), -1, 0, 1, 2, 7, 2**31 - 1]), st.integers(-(2**31), 2**31 - 1))
_SMALL = st.integers(-3, 24)  # a value of max_tokens that may run: free engines finish it at once
_FLOAT = st.one_of(st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e30]), st.floats(width=32))
_WORDS = st.lists(st.binary(max_size=12), max_size=4)
_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": st.one_of(_SMALL, _INT32),
    "bad_words": _WORDS, "stop_words": _WORDS,
    **{k: _INT32 for k in ("end_id", "pad_id", "top_k", "min_tokens", "min_length", "beam_width", "num_return_sequences")},
    **{k: st.booleans() for k in ("stream", "exclude_input_in_output", "return_log_probs", "return_context_logits",
                                  "return_generation_logits", "return_perf_metrics", "return_num_input_tokens",
                                  "return_num_output_tokens", "stop")},
    **{k: _FLOAT for k in ("top_p", "temperature", "length_penalty", "repetition_penalty", "presence_penalty",
                           "frequency_penalty")},
}  # fmt: skip


@st.composite
def ensemble_requests(draw: st.DrawFn) -> tuple[dict[str, np.ndarray], str]:
    """A well-formed request with some inputs replaced by random values of their type, and a
    few malformed on purpose (a wrong dtype, an extra dimension): Triton's own checks."""
    prompt = draw(st.one_of(st.binary(max_size=64), st.text(max_size=40).map(str.encode), st.just(b"the cat sat on")))
    tensors = text_request(prompt, draw(_SMALL))
    for name in draw(st.lists(st.sampled_from(sorted(_FIELDS)), max_size=6, unique=True)):
        value = draw(_FIELDS[name])
        tensors[name] = (
            np.array([[value]], dtype=np.int32) if name == "max_tokens" else text_request("", 1, **{name: value})[name]
        )
    if draw(st.booleans()):
        tensors["seed"] = np.array([[draw(st.integers(0, 2**64 - 1))]], dtype=np.uint64)
    mangle = draw(st.sampled_from(["none"] * 6 + ["dtype", "shape"]))
    if mangle == "dtype":
        tensors["max_tokens"] = tensors["max_tokens"].astype(np.int64)
    elif mangle == "shape":
        tensors["text_input"] = np.concatenate([tensors["text_input"]] * 2, axis=1)
    return tensors, mangle


@FUZZ
@given(case=ensemble_requests(), rid=st.one_of(st.just(""), st.text(max_size=20)))
def test_fuzzed_ensemble_inputs_get_an_answer_or_a_typed_error(server: TritonServer, case: Any, rid: str) -> None:
    tensors, mangle = case
    outcome = call(server, "ensemble", tensors, rid)
    if outcome.error is None:
        final = outcome.responses[-1].get_response().parameters["triton_final_response"].bool_param
        assert final and all(
            r.as_numpy("text_output") is not None for r in outcome.responses if r.get_response().outputs
        )
        assert mangle == "none"
    else:
        assert_typed(outcome, allow_triton=mangle != "none")


@st.composite
def mutated_blobs(draw: st.DrawFn, genuine: bytes) -> bytes:
    how = draw(st.sampled_from(["random", "flip", "truncate", "extend", "splice"]))
    if how == "random":
        return draw(st.binary(max_size=300))
    if how == "flip":
        at = draw(st.integers(0, len(genuine) - 1))
        return genuine[:at] + bytes([genuine[at] ^ draw(st.integers(1, 255))]) + genuine[at + 1 :]
    if how == "truncate":
        return genuine[: draw(st.integers(0, len(genuine) - 1))]
    if how == "extend":
        return genuine + draw(st.binary(min_size=1, max_size=40))
    at = draw(st.integers(0, len(genuine)))
    return genuine[:at] + draw(st.binary(min_size=1, max_size=40)) + genuine[at:]


@pytest.fixture(scope="module")
def genuine_blob(server: TritonServer) -> Iterator[bytes]:
    blob = fresh_blob(server, "context_1")
    yield blob
    call(server, "context_1", token_request(stop=np.array([[True]])), "fuzz-source:ctx")


@FUZZ
@given(data=st.data())
def test_fuzzed_context_phase_params_are_invalid_arg(
    server: TritonServer, genuine_blob: bytes, data: st.DataObject
) -> None:
    """Straight to a generation engine: any change to a genuine handoff, or random bytes, is
    INVALID_ARG (never a connection, never a pull: the lease of the genuine blob stays)."""
    blob = data.draw(mutated_blobs(genuine_blob))
    outcome = call(
        server,
        "generation_1",
        token_request(context_phase_params=as_tensor(blob) if blob else np.zeros((1, 0), np.uint8)),
        "",
        GEN,
    )
    message = assert_typed(outcome)
    assert message.startswith("INVALID_ARG: ") and "context_phase_params" in message, message


@FUZZ
@given(frame=st.one_of(st.binary(max_size=120), st.binary(max_size=100).map(lambda b: b"KVP2" + b)))
def test_fuzzed_transfer_frames_are_refused_without_harm(
    server: TritonServer, genuine_blob: bytes, frame: bytes
) -> None:
    """Random pull frames to a real context engine's transfer server: it answers an error or
    closes, never serves (no frame carries a valid MAC), and stays up."""
    handoff = Handoff.decode(genuine_blob, keys_of(server))
    with socket.create_connection((handoff.host, handoff.port), timeout=10) as conn:
        challenge = _read(conn, 20)
        assert challenge[:4] == b"KVC2"
        conn.sendall(frame)
        conn.shutdown(socket.SHUT_WR)
        reply = _read(conn, 1 << 16)
    assert reply == b"" or reply[0] == 1, reply[:40]


def _read(conn: socket.socket, limit: int) -> bytes:
    data = b""
    while len(data) < limit:
        chunk = conn.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_after_the_fuzzing_the_server_serves_and_holds_nothing(server: TritonServer, genuine_blob: bytes) -> None:
    """Last in the module: the genuine lease fuzzed at is still pullable, a normal request
    still streams its tokens, and every holding gauge returns to zero."""
    shards = asyncio.run(TcpTransport(keys_of(server)).pull(Handoff.decode(genuine_blob, keys_of(server)), 0, 1))
    assert shards.shape[1] == 1
    outcome = call(server, "ensemble", text_request("the cat sat on the mat", 8))
    assert outcome.error is None and outcome.responses
    assert wait_released(server.metrics_url, 15) == {}
    assert held(server.metrics_url) == {}
