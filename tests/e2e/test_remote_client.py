"""`GrpcEngineClient` against real tritonservers: the committed engines, and a probe model.

Each test runs one event loop with a fresh client (gRPC aio channels belong to their
loop), bounds it with a timeout, and checks that no task outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import textwrap
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcaio

from orchestrator.clients.endpoints import RemoteEndpoint
from orchestrator.clients.engine_client import EngineReply
from orchestrator.clients.remote import GrpcEngineClient
from orchestrator.tools.launch import TritonServer, free_port
from orchestrator.wire.contract import EngineOutput
from orchestrator.wire.errors import ErrorCode

T = TypeVar("T")
PROMPT = [259, 35, 102, 295, 35, 118, 295, 284]
CONTEXT = {"request_type": "context_only"}
GENERATION = {"request_type": "generation_only"}


def run(body: Callable[[GrpcEngineClient], Awaitable[T]], timeout_s: float = 60.0) -> T:
    """Run `body(client)` on a new loop with a fresh client; then no stream may be left open."""

    async def main() -> T:
        client = GrpcEngineClient()
        try:
            result = await asyncio.wait_for(body(client), timeout_s)
            await _no_task_left()  # before close(), which would end any stream left open
            return result
        finally:
            await client.close()
            await _no_task_left()

    return asyncio.run(main())


async def _no_task_left() -> None:
    """Every other task ends within moments. gRPC keeps one task per call until the call's
    status arrives, so a stream still open on the server (never cancelled) fails this."""
    others = asyncio.all_tasks() - {asyncio.current_task()}
    if others:
        _, pending = await asyncio.wait(others, timeout=2.0)
        assert not pending, f"tasks outlived the test: {pending}"


def endpoint(server: TritonServer, model: str) -> str:
    return f"grpc://{server.grpc_url}/{model}"


def engine_inputs(ids: list[int], max_tokens: int, streaming: bool = False, **extra: np.ndarray) -> dict[str, Any]:
    return {
        "input_ids": np.array([ids], dtype=np.int32),
        "input_lengths": np.array([[len(ids)]], dtype=np.int32),
        "request_output_len": np.array([[max_tokens]], dtype=np.int32),
        "streaming": np.array([[streaming]]),
        **extra,
    }


async def collect(
    client: GrpcEngineClient, engine: str, tensors: dict[str, Any], params: dict[str, Any]
) -> list[EngineReply]:
    return [reply async for reply in client.stream(engine, tensors, params, "test")]


async def context_blob(
    client: GrpcEngineClient, server: TritonServer, ids: list[int], max_tokens: int
) -> tuple[int, Any]:
    """Run the context phase on context_0: (first token, context_phase_params as sent on)."""
    replies = await collect(client, endpoint(server, "context_0"), engine_inputs(ids, max_tokens), CONTEXT)
    assert len(replies) == 1 and replies[0].error is None, replies
    output = EngineOutput.from_tensors(replies[0].tensors or {})
    assert output.context_phase_params is not None
    return output.tokens[-1], np.frombuffer(output.context_phase_params, dtype=np.uint8).reshape(1, -1)


# -- endpoints ------------------------------------------------------------------------
def test_endpoint_parse() -> None:
    ep = RemoteEndpoint.parse("grpc://10.0.0.5:8001/generation_0")
    assert (ep.host, ep.port, ep.model, ep.url) == ("10.0.0.5", 8001, "generation_0", "10.0.0.5:8001")
    assert str(ep) == "grpc://10.0.0.5:8001/generation_0"
    assert RemoteEndpoint.parse("grpc://[::1]:9/m").url == "[::1]:9"


@pytest.mark.parametrize(
    "text",
    ["context_0", "127.0.0.1:8001/context_0", "http://h:1/m", "grpc://h/m", "grpc://h:0/m", "grpc://h:99999/m",
     "grpc://h:x/m", "grpc://:1/m", "grpc://h:1", "grpc://h:1/", "grpc://h:1/a/b", "grpc://h:1/m?x=1"],
)  # fmt: skip
def test_endpoint_parse_rejects_malformed_text(text: str) -> None:
    with pytest.raises(ValueError, match=r"grpc://HOST:PORT/MODEL"):
        RemoteEndpoint.parse(text)


def test_malformed_endpoint_in_stream_is_one_error_not_an_exception() -> None:
    replies = run(lambda c: collect(c, "context_0", engine_inputs(PROMPT, 4), CONTEXT))
    assert len(replies) == 1 and replies[0].error is not None
    assert replies[0].error.code is ErrorCode.INTERNAL and "grpc://HOST:PORT/MODEL" in replies[0].error.message


# -- the committed engines ------------------------------------------------------------
def test_context_then_generation_give_the_aggregated_engines_tokens(server: TritonServer) -> None:
    async def body(client: GrpcEngineClient) -> None:
        ctx = await collect(client, endpoint(server, "context_0"), engine_inputs(PROMPT, 6), CONTEXT)
        assert len(ctx) == 1 and ctx[0].error is None and ctx[0].tensors is not None
        assert ctx[0].tensors["output_ids"].shape == (1, 1, 1)
        blob = ctx[0].tensors["context_phase_params"]
        assert blob.dtype == np.uint8 and blob.ndim == 2 and blob.size > 0
        first = int(ctx[0].tensors["output_ids"].reshape(-1)[0])

        gen_inputs = engine_inputs(PROMPT, 6, streaming=True, context_phase_params=blob)
        gen = await collect(client, endpoint(server, "generation_0"), gen_inputs, GENERATION)
        assert gen and all(r.error is None for r in gen)
        assert len(gen) >= 2, "a streaming generation request streams"
        tokens = [t for r in gen for t in EngineOutput.from_tensors(r.tensors or {}).tokens]
        assert tokens[0] == first, "the generation engine's first reply repeats the first token"

        agg_inputs = engine_inputs(PROMPT, 6, exclude_input_in_output=np.array([[True]]))
        agg = await collect(client, endpoint(server, "aggregated_0"), agg_inputs, {})
        assert len(agg) == 1
        assert tokens == list(EngineOutput.from_tensors(agg[0].tensors or {}).tokens)

    run(body)


def test_engine_error_keeps_its_code_without_the_prefix(server: TritonServer) -> None:
    replies = run(lambda c: collect(c, endpoint(server, "generation_0"), engine_inputs(PROMPT, 4), GENERATION))
    assert len(replies) == 1 and replies[0].error is not None
    assert replies[0].error.code is ErrorCode.INVALID_ARG
    assert replies[0].error.message.startswith("a generation_only request needs the context_phase_params")


def test_unreachable_endpoint_is_one_unavailable_error_naming_it() -> None:
    engine = f"grpc://127.0.0.1:{free_port()}/context_0"
    replies = run(lambda c: collect(c, engine, engine_inputs(PROMPT, 4), CONTEXT))
    assert len(replies) == 1 and replies[0].error is not None
    assert replies[0].error.code is ErrorCode.UNAVAILABLE and engine in replies[0].error.message


def test_unknown_model_is_one_unavailable_error_naming_it(server: TritonServer) -> None:
    engine = endpoint(server, "no_such_engine")
    replies = run(lambda c: collect(c, engine, engine_inputs(PROMPT, 4), CONTEXT))
    assert len(replies) == 1 and replies[0].error is not None
    assert replies[0].error.code is ErrorCode.UNAVAILABLE and engine in replies[0].error.message


def test_is_ready(server: TritonServer) -> None:
    async def body(client: GrpcEngineClient) -> list[bool]:
        return [
            await client.is_ready(endpoint(server, "context_0")),
            await client.is_ready(endpoint(server, "no_such_engine")),
            await client.is_ready(f"grpc://127.0.0.1:{free_port()}/context_0"),
        ]

    assert run(body, timeout_s=15) == [True, False, False]


def test_concurrent_streams_and_reuse_after_close(server: TritonServer) -> None:
    async def body(client: GrpcEngineClient) -> None:
        prompts = [[*PROMPT, 40 + i] for i in range(16)]
        together = await asyncio.gather(*(context_blob(client, server, p, 4) for p in prompts))
        one_by_one = [await context_blob(client, server, p, 4) for p in prompts]
        assert [first for first, _ in together] == [first for first, _ in one_by_one]
        await client.close()  # the next stream opens a new channel
        assert (await context_blob(client, server, prompts[0], 4))[0] == one_by_one[0][0]

    run(body)


def test_close_while_streaming_ends_the_stream_with_one_error(server: TritonServer) -> None:
    async def body(client: GrpcEngineClient) -> list[EngineReply]:
        got: list[EngineReply] = []
        async for reply in client.stream(endpoint(server, "aggregated_0"), engine_inputs(PROMPT, 2000, True), {}, "t"):
            got.append(reply)
            if len(got) == 2:
                await client.close()
        return got

    got = run(body)
    assert len(got) == 3 and got[0].error is None and got[1].error is None
    assert got[2].error is not None and got[2].error.code is ErrorCode.UNAVAILABLE
    assert "aggregated_0" in got[2].error.message


async def _generation_pool_tokens(server: TritonServer) -> int:
    async with grpcaio.InferenceServerClient(server.grpc_url) as admin:
        config = await admin.get_model_config("generation_0", headers=server.admin_headers("grpc"))  # a locked API
    return int(config.config.parameters["max_tokens_in_paged_kv_cache"].string_value)


@pytest.mark.parametrize("how", ["aclose", "task_cancel"])
def test_leaving_a_stream_cancels_the_remote_request(server: TritonServer, how: str) -> None:
    """The engine reserves KV for prompt + max_tokens (GUARANTEED_NO_EVICT). A long request
    holding 70% of the pool leaves no room for one needing 50%: the follow-up starts within
    the timeout only if leaving the first stream cancelled it on the remote server (running
    to the end would take minutes)."""

    async def body(client: GrpcEngineClient) -> None:
        pool = await _generation_pool_tokens(server)
        engine = endpoint(server, "generation_0")
        _, blob = await context_blob(client, server, PROMPT, 4)
        long_inputs = engine_inputs(PROMPT, int(pool * 0.7), streaming=True, context_phase_params=blob)
        got: list[EngineReply] = []
        if how == "aclose":
            async with contextlib.aclosing(client.stream(engine, long_inputs, GENERATION, "long")) as replies:
                async for reply in replies:
                    got.append(reply)
                    if len(got) == 2:
                        break
        else:
            two = asyncio.Event()

            async def consume() -> None:
                async for reply in client.stream(engine, long_inputs, GENERATION, "long"):
                    got.append(reply)
                    if len(got) == 2:
                        two.set()

            task = asyncio.create_task(consume())
            await two.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert len(got) == 2 and all(r.error is None for r in got)

        _, blob = await context_blob(client, server, PROMPT, 4)
        follow_inputs = engine_inputs(PROMPT, int(pool * 0.5), streaming=True, context_phase_params=blob)
        async with contextlib.aclosing(client.stream(engine, follow_inputs, GENERATION, "follow")) as replies:
            first = await asyncio.wait_for(anext(replies), 30)
        assert first.error is None, first.error

        # The engine keeps serving: a short request runs to its end.
        first_token, blob = await context_blob(client, server, PROMPT, 4)
        short_inputs = engine_inputs(PROMPT, 4, streaming=True, context_phase_params=blob)
        short = await collect(client, engine, short_inputs, GENERATION)
        assert short and all(r.error is None for r in short)

    run(body)


# -- a probe model: flags-only finals, request parameters, error texts ---------------
PROBE_CONFIG = """
name: "probe"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [
  { name: "n" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "data" data_type: TYPE_STRING dims: [ -1 ] optional: true }
]
output [
  { name: "out" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "params" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "data" data_type: TYPE_STRING dims: [ -1 ] }
]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

# Sends `n` replies and then a separate flags-only final (which Triton's gRPC frontend drops
# unless the request asks for empty final responses); with parameter `error`, one error.
PROBE_MODEL = """
import json

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            params = json.loads(request.parameters() or "{}")
            if "error" in params:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(params["error"])), flags=FINAL)
                continue
            n = int(pb_utils.get_input_tensor_by_name(request, "n").as_numpy().reshape(-1)[0])
            for i in range(n):
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("out", np.array([i], dtype=np.int32))]))
            data = pb_utils.get_input_tensor_by_name(request, "data")
            if data is not None:
                text = json.dumps(params, sort_keys=True).encode()
                params_out = pb_utils.Tensor("params", np.array([text], dtype=np.object_))
                sender.send(pb_utils.InferenceResponse([params_out, pb_utils.Tensor("data", data.as_numpy())]))
            sender.send(flags=FINAL)
        return None
"""


@pytest.fixture(scope="module")
def probe_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repo = tmp_path_factory.mktemp("probe_repository")
    (repo / "probe" / "1").mkdir(parents=True)
    (repo / "probe" / "config.pbtxt").write_text(textwrap.dedent(PROBE_CONFIG))
    (repo / "probe" / "1" / "model.py").write_text(PROBE_MODEL)
    with TritonServer(model_repository=Path(repo)) as srv:
        yield srv


def test_flags_only_final_ends_the_stream_and_is_no_reply(probe_server: TritonServer) -> None:
    n = {"n": np.array([3], dtype=np.int32)}
    replies = run(lambda c: collect(c, endpoint(probe_server, "probe"), n, {}), timeout_s=15)
    assert [r.error for r in replies] == [None] * 3
    assert [int(r.tensors["out"][0]) for r in replies if r.tensors] == [0, 1, 2]


def test_request_parameters_and_bytes_tensors_arrive(probe_server: TritonServer) -> None:
    params = {"request_type": "context_only", "count": 7, "flag": True, "ratio": 0.5}
    data = np.array([b"caf\xc3\xa9", b"", b"\x00\xff"], dtype=np.object_)
    tensors = {"n": np.array([0], dtype=np.int32), "data": data}
    replies = run(lambda c: collect(c, endpoint(probe_server, "probe"), tensors, params), timeout_s=15)
    assert len(replies) == 1 and replies[0].tensors is not None
    assert json.loads(replies[0].tensors["params"][0]) == params
    assert replies[0].tensors["data"].tolist() == data.tolist()


@pytest.mark.parametrize(
    ("text", "code", "message"),
    [
        ("INVALID_ARG: fix the input", ErrorCode.INVALID_ARG, "fix the input"),
        ("UNAVAILABLE: pool drained", ErrorCode.UNAVAILABLE, "pool drained"),
        ("CANCELLED: request cancelled by the client", ErrorCode.CANCELLED, "request cancelled by the client"),
        ("something broke", ErrorCode.UNAVAILABLE, "failed: something broke"),
        ("NOT_A_CODE: text", ErrorCode.UNAVAILABLE, "failed: NOT_A_CODE: text"),
    ],
)
def test_error_text_maps_to_code(probe_server: TritonServer, text: str, code: ErrorCode, message: str) -> None:
    engine = endpoint(probe_server, "probe")
    replies = run(lambda c: collect(c, engine, {"n": np.array([1], dtype=np.int32)}, {"error": text}), timeout_s=15)
    assert len(replies) == 1 and replies[0].error is not None
    assert replies[0].error.code is code
    if code is ErrorCode.UNAVAILABLE and message.startswith("failed"):
        assert engine in replies[0].error.message and replies[0].error.message.endswith(message)
    else:
        assert replies[0].error.message == message


def test_reserved_parameter_name_is_one_internal_error(probe_server: TritonServer) -> None:
    tensors = {"n": np.array([1], dtype=np.int32)}
    replies = run(lambda c: collect(c, endpoint(probe_server, "probe"), tensors, {"triton_x": 1}), timeout_s=15)
    assert len(replies) == 1 and replies[0].error is not None and replies[0].error.code is ErrorCode.INTERNAL
