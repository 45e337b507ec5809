"""Stream a completion from the ensemble to the terminal over gRPC.

    disagg client "the cat sat on the" --max-tokens 32 [--url 127.0.0.1:8001] [--no-stream]

`generate()` is the reusable part: it yields `Delta`s (text, final flag, arrival time)
from one request, and raises `tritonclient.utils.InferenceServerException` on a typed
server error. It bounds every wait, so a server that never answers is an error, not a hang.
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


@dataclass(frozen=True)
class Delta:
    request_id: str
    text: str
    final: bool
    received_ns: int
    outputs: dict[str, Any]


def ensemble_inputs(prompt: str | bytes, max_tokens: int, **extra: Any) -> list[grpcclient.InferInput]:
    """Inputs as TensorRT-LLM clients send them: every tensor with a leading batch dim."""
    text = prompt.encode() if isinstance(prompt, str) else prompt
    values: dict[str, np.ndarray] = {
        "text_input": np.array([[text]], dtype=object),
        "max_tokens": np.array([[max_tokens]], dtype=np.int32),
    }
    for name, value in extra.items():
        if isinstance(value, bool):
            values[name] = np.array([[value]], dtype=bool)
        elif isinstance(value, int):
            values[name] = np.array([[value]], dtype=np.uint64 if name == "seed" else np.int32)
        elif isinstance(value, float):
            values[name] = np.array([[value]], dtype=np.float32)
        elif isinstance(value, (list, tuple)):
            values[name] = np.array([[w.encode() if isinstance(w, str) else w for w in value]], dtype=object)
        else:
            values[name] = np.asarray(value)
    return grpc_inputs(values)


def grpc_inputs(values: Mapping[str, np.ndarray]) -> list[grpcclient.InferInput]:
    """numpy arrays -> tritonclient gRPC inputs (object arrays travel as BYTES)."""
    inputs = []
    for name, arr in values.items():
        dtype = "BYTES" if arr.dtype == object else grpcclient.np_to_triton_dtype(arr.dtype)
        tensor = grpcclient.InferInput(name, list(arr.shape), dtype)
        tensor.set_data_from_numpy(arr)
        inputs.append(tensor)
    return inputs


def token_inputs(ids: Sequence[int], max_tokens: int, **flags: bool) -> list[grpcclient.InferInput]:
    """Token-level inputs (the tensorrt_llm contract: orchestrator, engines), BOOL flags as [1, 1]."""
    return grpc_inputs({
        "input_ids": np.array([ids], dtype=np.int32),
        "input_lengths": np.array([[len(ids)]], dtype=np.int32),
        "request_output_len": np.array([[max_tokens]], dtype=np.int32),
        **{name: np.array([[value]], dtype=bool) for name, value in flags.items()},
    })  # fmt: skip


def generate(
    url: str,
    prompt: str | bytes,
    max_tokens: int,
    *,
    stream: bool = True,
    model: str = "ensemble",
    request_id: str | None = None,
    timeout_s: float = 60.0,
    **extra: Any,
) -> Iterator[Delta]:
    """One request over a gRPC stream; yields each response until the final flag."""
    rid = request_id or uuid.uuid4().hex[:12]
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(
            model, ensemble_inputs(prompt, max_tokens, stream=stream, **extra),
            request_id=rid, enable_empty_final_response=True,
        )  # fmt: skip
        while True:
            try:
                result, error = responses.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"no response for request {rid} within {timeout_s}s") from None
            if error is not None:
                raise error
            final = result.get_response().parameters["triton_final_response"].bool_param
            outputs = {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}
            text_arr = outputs.get("text_output")
            text = "" if text_arr is None else b"".join(text_arr.reshape(-1)).decode("utf-8")
            yield Delta(rid, text, final, time.monotonic_ns(), outputs)
            if final:
                return
    finally:
        client.stop_stream(cancel_requests=False)
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--url", default="127.0.0.1:8001", help="gRPC address of tritonserver")
    parser.add_argument("--no-stream", action="store_true", help="one response: prompt + completion")
    args = parser.parse_args(argv)
    try:
        for delta in generate(args.url, args.prompt, args.max_tokens, stream=not args.no_stream):
            print(delta.text, end="", flush=True)
    except InferenceServerException as exc:
        # A gRPC stream carries no status code; the message starts with it (INVALID_ARG: ...).
        print(f"\nerror: {exc.message()}", file=sys.stderr)
        return 1
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
