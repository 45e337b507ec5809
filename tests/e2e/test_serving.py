"""End to end through a real tritonserver: the ensemble, over gRPC and HTTP."""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from orchestrator.text.detokenize import completion_text
from orchestrator.text.tokenizer import BuiltinTokenizer
from orchestrator.tools.client import Delta, generate, grpc_inputs
from orchestrator.tools.launch import TritonServer

PROMPTS = {
    "ascii": "the cat sat on the mat and the dog sat on the log",
    "multibyte": "héllo wörld, naïve café: the crème brûlée was très bien",
    "cjk": "你好世界，今天天气很好。我们去公园散步吧，你好世界",
    "emoji": "party time 🎉👍🏽 then more 🎉 and 🚀🚀 and 👍🏽🎉",
}


def stream_text(server: TritonServer, prompt: str, max_tokens: int, **extra: object) -> list[Delta]:
    return list(generate(server.grpc_url, prompt, max_tokens, stream=True, **extra))


def single_text(server: TritonServer, prompt: str, max_tokens: int, **extra: object) -> str:
    responses = list(generate(server.grpc_url, prompt, max_tokens, stream=False, **extra))
    data = [r for r in responses if "text_output" in r.outputs]
    assert len(data) == 1, f"non-streaming must give exactly one response, got {len(data)}"
    return data[0].text


def http_generate(server: TritonServer, body: dict[str, object]) -> requests.Response:
    return requests.post(f"http://{server.http_url}/v2/models/ensemble/generate", json=body, timeout=60)


def sse_events(server: TritonServer, body: dict[str, object]) -> list[dict[str, object]]:
    """Raw server-sent events from /generate_stream, one dict per `data:` line."""
    with requests.post(
        f"http://{server.http_url}/v2/models/ensemble/generate_stream", json=body, stream=True, timeout=60
    ) as resp:
        assert resp.status_code == 200, resp.text
        return [json.loads(line[len(b"data: ") :]) for line in resp.iter_lines() if line.startswith(b"data: ")]


# -- loading ------------------------------------------------------------------------
# Lines a CPU-only machine always logs; anything else at error level is ours to fix.
NO_GPU_LINES = re.compile(r"CudaDriverHelper|CUDA driver version is insufficient|pinned memory|NVML|DCGM")


def test_no_error_lines_in_the_server_log(server: TritonServer) -> None:
    """Run late (this module runs after the bad-input and cancellation tests have loaded the
    server): no error line, and in particular not the python backend stub's
    `Cannot remove future from background; KeyError`, the mark of the async-execute race
    that crashed stubs under load (orchestrator/runtime/loop_thread.py)."""
    list(generate(server.grpc_url, "the cat sat on the mat", 8, stream=True))
    log = server.log_text()
    assert "Cannot remove future from background" not in log
    errors = [line for line in log.splitlines() if re.match(r"^E\d{4}", line) and not NO_GPU_LINES.search(line)]
    assert errors == []


def test_committed_configs_load_without_errors(server: TritonServer) -> None:
    log = server.log_text()
    for model in ("ensemble", "preprocessing", "orchestrator", "postprocessing",
                  "context_0", "context_1", "generation_0", "generation_1", "aggregated_0"):  # fmt: skip
        assert re.search(rf"\|\s*{model}\s*\|\s*1\s*\|\s*READY", log), f"{model} not READY"
    errors = [
        line for line in log.splitlines()
        if re.match(r"^E\d{4}", line) and not NO_GPU_LINES.search(line)
    ]  # fmt: skip
    assert errors == []


# -- gRPC -----------------------------------------------------------------------------
def test_grpc_streaming_first_response_has_text_and_final_flag_ends(server: TritonServer) -> None:
    deltas = stream_text(server, PROMPTS["ascii"], 12)
    assert deltas[0].text != "", "TTFT needs the first token's text in the first response"
    assert deltas[-1].final and not any(d.final for d in deltas[:-1])
    assert len([d for d in deltas if d.text]) >= 2, "deltas must stream, not arrive as one block"


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_streamed_deltas_concatenate_to_non_streaming_completion(server: TritonServer, kind: str) -> None:
    prompt = PROMPTS[kind]
    streamed = "".join(d.text for d in stream_text(server, prompt, 24))
    completion = single_text(server, prompt, 24, exclude_input_in_output=True)
    assert streamed.encode() == completion.encode()
    assert completion, "the stub continues every prompt"


def test_non_streaming_returns_prompt_plus_completion(server: TritonServer) -> None:
    prompt = PROMPTS["ascii"]
    full = single_text(server, prompt, 10)
    completion = single_text(server, prompt, 10, exclude_input_in_output=True)
    assert full == prompt + completion


def test_same_prompt_same_tokens(server: TritonServer) -> None:
    a = single_text(server, PROMPTS["multibyte"], 16, exclude_input_in_output=True)
    b = single_text(server, PROMPTS["multibyte"], 16, exclude_input_in_output=True)
    assert a == b


def test_empty_word_lists_are_accepted(server: TritonServer) -> None:
    text = single_text(server, PROMPTS["ascii"], 8, bad_words=[""], stop_words=[""])
    assert text.startswith(PROMPTS["ascii"])


def test_stop_word_ends_generation(server: TritonServer) -> None:
    prompt = PROMPTS["ascii"]
    free = single_text(server, prompt, 24, exclude_input_in_output=True)
    assert " log" in free
    stopped = single_text(server, prompt, 24, exclude_input_in_output=True, stop_words=[" log"])
    assert stopped == free[: free.index(" log") + len(" log")]


def test_max_tokens_bounds_the_output(server: TritonServer) -> None:
    deltas = stream_text(server, PROMPTS["ascii"], 5, return_num_output_tokens=True)
    counts = [int(d.outputs["num_output_tokens"].reshape(-1)[0]) for d in deltas if "num_output_tokens" in d.outputs]
    assert counts[-1] == 5


def test_max_tokens_one_finishes_in_the_context_phase(server: TritonServer) -> None:
    deltas = stream_text(server, PROMPTS["ascii"], 1)
    assert [d.final for d in deltas] == [True] and deltas[0].text != ""
    assert deltas[0].text == single_text(server, PROMPTS["ascii"], 1, exclude_input_in_output=True)


def test_perf_outputs_on_every_streamed_response(server: TritonServer) -> None:
    deltas = stream_text(server, PROMPTS["ascii"], 6, return_perf_metrics=True)
    for d in deltas:
        if "text_output" not in d.outputs:
            continue
        t = {k: int(d.outputs[k].reshape(-1)[0]) for k in
             ("arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns")}  # fmt: skip
        assert (
            0
            < t["arrival_time_ns"]
            <= t["first_scheduled_time_ns"]
            <= t["first_token_time_ns"]
            <= t["last_token_time_ns"]
        )
    last = deltas[-1].outputs
    kv = {
        k: int(last[k].reshape(-1)[0])
        for k in ("kv_cache_alloc_new_blocks", "kv_cache_reused_blocks", "kv_cache_alloc_total_blocks")
    }
    # The prompt's blocks on the context engine plus prompt + output on the generation engine.
    assert kv["kv_cache_alloc_total_blocks"] >= 2
    assert kv["kv_cache_alloc_new_blocks"] + kv["kv_cache_reused_blocks"] == kv["kv_cache_alloc_total_blocks"]


def test_32_concurrent_streams_interleave_and_each_gets_its_own_output(server: TritonServer) -> None:
    prompts = [f"{PROMPTS['ascii']} number {i} is {'x' * (i % 5)} here" for i in range(32)]
    expected = [single_text(server, p, 16, exclude_input_in_output=True) for p in prompts]
    results: list[list[Delta] | BaseException] = [[] for _ in prompts]

    def run(i: int) -> None:
        try:
            results[i] = stream_text(server, prompts[i], 16)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    streams = [r for r in results if isinstance(r, list)]
    assert len(streams) == 32, [r for r in results if not isinstance(r, list)]
    assert ["".join(d.text for d in s) for s in streams] == expected
    # Concurrency shown by order: some request's first token arrived before another,
    # earlier-started request's last token (a serial orchestrator never interleaves).
    firsts = [s[0].received_ns for s in streams]
    lasts = [s[-1].received_ns for s in streams]
    overlapping = sum(
        1 for i in range(32) for j in range(32) if i != j and firsts[j] < lasts[i] and firsts[i] < firsts[j]
    )
    assert overlapping >= 31


# -- HTTP -----------------------------------------------------------------------------
def test_http_generate_returns_exactly_one_response(server: TritonServer) -> None:
    resp = http_generate(server, {"text_input": PROMPTS["emoji"], "max_tokens": 12})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["text_output"] == single_text(server, PROMPTS["emoji"], 12)


def test_http_generate_stream_one_event_per_delta(server: TritonServer) -> None:
    events = sse_events(server, {"text_input": PROMPTS["cjk"], "max_tokens": 12, "stream": True})
    assert len(events) >= 2 and all("error" not in e for e in events)
    streamed = "".join(str(e["text_output"]) for e in events)
    assert streamed == single_text(server, PROMPTS["cjk"], 12, exclude_input_in_output=True)


# -- bad input (the whole catalogue: tests/e2e/test_bad_input.py) ---------------------------
def test_bad_input_over_http_is_400_with_message(server: TritonServer) -> None:
    resp = http_generate(server, {"text_input": "hello", "max_tokens": 0})
    assert resp.status_code == 400
    assert "INVALID_ARG: 'max_tokens' must be between 1" in resp.json()["error"]


def test_streaming_bad_input_ends_the_stream_with_the_error(server: TritonServer) -> None:
    with pytest.raises(InferenceServerException) as info:
        stream_text(server, "", 4)
    assert "text_input' is empty" in info.value.message()


# -- engines keep the tensorrt_llm contract -----------------------------------------
def engine_call(
    server: TritonServer, model: str, ids: list[int], params: dict[str, str], rid: str = "", **tensors: np.ndarray
) -> list:
    values = {
        "input_ids": np.array([ids], dtype=np.int32),
        "input_lengths": np.array([[len(ids)]], dtype=np.int32),
        "request_output_len": np.array([[6]], dtype=np.int32),
        **tensors,
    }
    inputs = grpc_inputs(values)
    results: list = []
    done = threading.Event()

    def callback(result: object, error: object) -> None:
        results.append(error if error is not None else result)
        if error is not None or result.get_response().parameters["triton_final_response"].bool_param:  # type: ignore[union-attr]
            done.set()

    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.start_stream(callback=callback)
        client.async_stream_infer(model, inputs, request_id=rid, parameters=params, enable_empty_final_response=True)
        assert done.wait(60)
        client.stop_stream()
    return results


def test_context_engine_returns_one_final_response_with_handoff(server: TritonServer) -> None:
    ids = [259, 35, 102, 295, 35, 118, 295, 284]
    results = engine_call(server, "context_0", ids, {"request_type": "context_only"}, rid="handoff:ctx")
    assert len(results) == 1 and not isinstance(results[0], Exception)
    assert results[0].as_numpy("output_ids").shape == (1, 1, 1)
    assert results[0].as_numpy("context_phase_params").dtype == np.uint8
    # nobody pulls it: a stop with the same id frees the lease now, not at kv_lease_timeout_s
    (ack,) = engine_call(server, "context_0", [0], {}, rid="handoff:ctx", stop=np.array([[True]]))
    assert not isinstance(ack, Exception) and ack.get_response().parameters["triton_final_response"].bool_param


# -- the client script and token-level callers --------------------------------------
def test_client_script_streams_the_completion(server: TritonServer) -> None:
    import subprocess
    import sys

    prompt = PROMPTS["emoji"]
    run = subprocess.run(
        [sys.executable, "orchestrator/tools/client.py", prompt, "--max-tokens", "12", "--url", server.grpc_url],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert run.stdout == single_text(server, prompt, 12, exclude_input_in_output=True) + "\n"
    bad = subprocess.run(
        [sys.executable, "orchestrator/tools/client.py", "", "--url", server.grpc_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "INVALID_ARG: 'text_input' is empty" in bad.stderr


def test_orchestrator_serves_token_level_clients_directly(server: TritonServer) -> None:
    ids = [259, 35, 102, 295, 35, 118, 295, 284, 260, 35, 112, 295]
    results = engine_call(server, "orchestrator", ids, {}, streaming=np.array([[True]]))
    tokens = [
        int(t) for r in results if r.as_numpy("output_ids") is not None for t in r.as_numpy("output_ids").reshape(-1)
    ]
    assert len(tokens) == 6  # request_output_len in engine_call
    whole = engine_call(server, "orchestrator", ids, {}, exclude_input_in_output=np.array([[True]]))
    assert [int(t) for t in whole[0].as_numpy("output_ids").reshape(-1)] == tokens


# -- the stub engines as an oracle: disaggregated == aggregated through the real server --
def test_ensemble_output_equals_the_aggregated_engine(server: TritonServer) -> None:
    """Each prompt through the ensemble (context engine -> KV pulled over shared memory, with
    tp2 -> tp1 re-sharding -> generation engine) gives exactly the tokens and text the
    aggregated engine computes alone, so the KV cache crossed processes intact."""
    tokenizer = BuiltinTokenizer()
    for prompt in [*PROMPTS.values(), "x " * 40 + "the end", "a b c d e f g a b c d e f g a b"]:
        ids = tokenizer.encode(prompt)
        max_tokens = np.array([[24]], dtype=np.int32)
        exclude = np.array([[True]])
        agg = engine_call(
            server, "aggregated_0", ids, {}, request_output_len=max_tokens, exclude_input_in_output=exclude
        )
        expected = [int(t) for t in agg[0].as_numpy("output_ids").reshape(-1)]
        assert len(expected) == 24
        orch = engine_call(
            server, "orchestrator", ids, {}, request_output_len=max_tokens, exclude_input_in_output=exclude
        )
        assert [int(t) for t in orch[0].as_numpy("output_ids").reshape(-1)] == expected, prompt
        text = single_text(server, prompt, 24, exclude_input_in_output=True)
        assert text == completion_text(tokenizer, ids, expected), prompt
