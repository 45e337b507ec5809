"""The OpenAI-compatible frontend (`disagg openai`) with the official `openai` SDK, against a
real tritonserver (free engines) and the frontend in a thread on a free port."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest
import requests
import uvicorn
from openai import OpenAI

from orchestrator.frontend.app import FrontendConfig, create_app
from orchestrator.tools.client import generate
from orchestrator.tools.launch import TritonServer, free_port
from orchestrator.tools.metrics import samples, samples_until, total, wait_released
from orchestrator.tools.overhead import ZERO_COST
from orchestrator.tools.repository import FRONTEND_MODELS, ModelSpec, derive

pytestmark = pytest.mark.e2e
MODEL = "disagg"
PROMPT = "the cat sat on the mat and the dog sat on the"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repo = tmp_path_factory.mktemp("openai_repository")
    engines = {m: ModelSpec(m, ZERO_COST) for m in ("context_0", "context_1", "generation_0", "generation_1")}
    derive(repo, {**{m: ModelSpec(m) for m in FRONTEND_MODELS}, **engines})
    with TritonServer(model_repository=Path(repo)) as srv:
        yield srv


@pytest.fixture(scope="module")
def frontend(server: TritonServer) -> Iterator[str]:
    """The ASGI app under uvicorn in a thread; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(
        create_app(FrontendConfig(triton_url=server.grpc_url, model_name=MODEL, log_requests=True)),
        host="127.0.0.1", port=port, log_level="warning",
    )  # fmt: skip
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the frontend did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(timeout=15)


@pytest.fixture()
def client(frontend: str) -> OpenAI:
    return OpenAI(base_url=f"{frontend}/v1", api_key="none", max_retries=0, timeout=60)


def ensemble_reference(server: TritonServer, prompt: str, max_tokens: int, **extra: Any) -> tuple[str, int, int]:
    """The ensemble's own answer: text, num_input_tokens, num_output_tokens."""
    text, n_in, n_out = "", 0, 0
    for delta in generate(
        server.grpc_url, prompt, max_tokens, exclude_input_in_output=True,
        return_num_input_tokens=True, return_num_output_tokens=True, **extra,
    ):  # fmt: skip
        text += delta.text
        if "num_input_tokens" in delta.outputs:
            n_in = int(delta.outputs["num_input_tokens"].reshape(-1)[0])
        if "num_output_tokens" in delta.outputs:
            n_out = int(delta.outputs["num_output_tokens"].reshape(-1)[0])
    return text, n_in, n_out


def test_models_lists_the_served_name(client: OpenAI, frontend: str) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert requests.get(f"{frontend}/health", timeout=10).status_code == 200


def test_completion_matches_the_ensemble_streamed_or_not(client: OpenAI, server: TritonServer) -> None:
    text, n_in, n_out = ensemble_reference(server, PROMPT, 12, seed=7)
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, seed=7)
    assert whole.choices[0].text == text and text
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (n_in, n_out)
    assert whole.choices[0].finish_reason == ("length" if n_out == 12 else "stop")
    chunks = list(client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, seed=7, stream=True, stream_options={"include_usage": True},
    ))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == n_out
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_chat_streamed_equals_not_streamed(client: OpenAI) -> None:
    messages: Any = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, seed=3)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    text = whole.choices[0].message.content
    assert text
    assert whole.usage is not None and whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, seed=3, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_max_tokens_ends_with_length(client: OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
    assert out.usage is not None and out.usage.completion_tokens == 3
    assert out.choices[0].finish_reason == "length"


def test_a_stop_string_ends_the_text_before_it(client: OpenAI, server: TritonServer) -> None:
    text, _, _ = ensemble_reference(server, PROMPT, 24, seed=1)
    assert len(text) > 6
    stop = text[3:6]  # from inside the text: ends it at its first occurrence, whatever the tokens
    expected = text[: text.find(stop)]
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, seed=1, stop=stop)
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, seed=1, stop=[stop],
                                            stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert wait_released(server.metrics_url) == {}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 2),
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("tool_choice", "auto"),
        ("functions", [{"name": "f", "parameters": {}}]),
        ("logprobs", True),
        ("response_format", {"type": "json_object"}),
    ],
)
def test_unsupported_fields_are_refused_by_name(client: OpenAI, field: str, value: Any) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body={field: value}
        )  # fmt: skip
    assert err.value.status_code == 400
    assert isinstance(err.value.body, dict) and err.value.body.get("param") == field


def test_echo_and_bad_values_are_refused(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, echo=True)
    assert isinstance(err.value.body, dict) and err.value.body.get("param") == "echo"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=5)
    assert isinstance(err.value.body, dict) and err.value.body.get("param") == "temperature"


def test_an_ensemble_invalid_arg_is_a_400_with_its_message(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=100000)
    assert "max_tokens" in str(err.value) and "Traceback" not in str(err.value)


def test_unknown_model_is_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-nothing", prompt=PROMPT, max_tokens=4)


def test_a_mid_stream_disconnect_stops_the_request(client: OpenAI, server: TritonServer, frontend: str) -> None:
    stops_before = total(samples(server.metrics_url), "disagg_orchestrator_stops_total")
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2000, stream=True,
                                       extra_headers={"x-request-id": "oai-disconnect-1"})  # fmt: skip
    seen = 0
    for _chunk in stream:
        seen += 1
        if seen == 2:
            break
    stream.close()
    assert wait_released(server.metrics_url, timeout_s=30) == {}
    stops = samples_until(server.metrics_url, lambda s: total(s, "disagg_orchestrator_stops_total") > stops_before)
    assert total(stops, "disagg_orchestrator_stops_total") > stops_before  # the frontend sent stop=true
    metrics = requests.get(f"{frontend}/metrics", timeout=10).text
    assert 'disagg_frontend_requests_total{endpoint="/v1/completions",outcome="disconnected"}' in metrics
    assert 'disagg_frontend_in_flight{endpoint="/v1/completions"} 0.0' in metrics


def test_eight_concurrent_clients(client: OpenAI, server: TritonServer) -> None:
    def one(i: int) -> str:
        out = client.completions.create(model=MODEL, prompt=f"{PROMPT} {i}", max_tokens=8, seed=i)
        return out.choices[0].text

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(8)))
    assert all(texts)
    assert wait_released(server.metrics_url) == {}


def test_disagg_serve_starts_the_frontend_the_readme_uses(tmp_path: Path) -> None:
    """The README's first command, as a user runs it: `disagg serve` (what ./scripts/serve
    runs) brings the OpenAI API up next to tritonserver; a chat completion through the
    official client works; Ctrl-C (SIGINT) takes both down."""
    http, grpc, metrics, port = free_port(), free_port(), free_port(), free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "disagg"), "serve", "--http-port", str(http), "--grpc-port", str(grpc),
             "--metrics-port", str(metrics), "--openai-port", str(port), "--admin-key-file", str(tmp_path / "key")],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not _answers(f"{base}/health"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        chat = OpenAI(base_url=f"{base}/v1", api_key="none").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=8
        )
        assert chat.choices[0].message.content and chat.usage is not None and chat.usage.completion_tokens <= 8
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=90)
    assert code == 0, log.read_text(errors="replace")[-3000:]
    assert not _answers(f"{base}/health")  # the frontend went with it


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_every_request_is_logged_with_its_id(client: OpenAI, caplog: pytest.LogCaptureFixture) -> None:
    """log_requests: one line per finished request naming its id, the Triton request id."""
    with caplog.at_level(logging.INFO, logger="disagg.frontend"):
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=2, extra_headers={"x-request-id": "oai-logged-1"}
        )
        deadline = time.monotonic() + 10
        while "id=oai-logged-1" not in caplog.text:  # written by the server thread once the answer is sent
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
    assert "endpoint=/v1/completions outcome=ok" in caplog.text
