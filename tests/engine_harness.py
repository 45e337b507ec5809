"""Driving EngineCores directly on an asyncio loop: sinks, request builders, a leak-checked runner.

Engines here use `EngineConfig.free` (all costs 0), so a step is one loop turn; ordering is
asserted through `core.steps` (recorded at each output), `core.step_log` and shared logs of
outputs, never through time. `run` checks after every scenario that each engine it created
has no request, no lease and no block left (a lost handoff's lease expires after 0.5 s).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from orchestrator.stub_engine.config import EngineConfig
from orchestrator.stub_engine.core import EngineCore
from orchestrator.stub_engine.kv_auth import KeyRing
from orchestrator.text.tokenizer import WORDS, BuiltinTokenizer
from orchestrator.wire.contract import EngineOutput, EngineRequest, RequestType, SamplingParams
from orchestrator.wire.errors import RequestError
from orchestrator.wire.stop_condition import StopCondition

TOK = BuiltinTokenizer()
T = TypeVar("T")

GREEDY = SamplingParams()
SAMPLING_SETS: tuple[SamplingParams, ...] = (
    GREEDY,
    SamplingParams(temperature=0.0, top_k=50, seed=3),  # temperature 0: greedy despite top_k
    SamplingParams(temperature=0.8, top_k=5, seed=1),
    SamplingParams(temperature=1.0, top_p=0.9, seed=42),
    SamplingParams(temperature=0.7, top_k=40, top_p=0.95, seed=2**40 + 7),
)

PROMPT = tuple(TOK.encode("the cat sat on the mat and the dog sat on the log"))
OTHER_PROMPT = tuple(TOK.encode("a quick brown fox jumps over the lazy dog"))


def prompts(count: int, seed: int = 1234) -> list[tuple[int, ...]]:
    """`count` varied prompts (words, repeats, multi-byte text) as builtin-tokenizer ids."""
    rng = random.Random(seed)
    extras = ["héllo wörld", "你好世界", "🎉👍🏽", "naïve café", "x", "the the the"]
    out: list[tuple[int, ...]] = []
    for i in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 30))]
        if i % 3 == 0:
            words.insert(rng.randrange(len(words) + 1), rng.choice(extras))
        out.append(tuple(TOK.encode(" ".join(words))))
    return out


@dataclass
class Call:
    """One call a sink received: an output (send) or an error (fail), at engine step `step`."""

    request_id: str
    step: int
    final: bool
    output: EngineOutput | None = None
    error: RequestError | None = None


@dataclass
class RecordingSink:
    """Records every send/fail with the engine's step count; `done` is set on the terminal call.

    Setting `cancel` makes the engine see the client as gone (as Triton's is_cancelled does).
    """

    core: EngineCore
    request_id: str = ""
    log: list[Call] | None = None  # an optional log shared by several sinks, in call order
    calls: list[Call] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    first: asyncio.Event = field(default_factory=asyncio.Event)
    cancel: bool = False

    def _record(self, call: Call) -> None:
        self.calls.append(call)
        if self.log is not None:
            self.log.append(call)
        self.first.set()
        if call.final:
            self.done.set()

    def send(self, output: EngineOutput, final: bool) -> None:
        self._record(Call(self.request_id, self.core.steps, final, output=output))

    def fail(self, error: RequestError) -> None:
        self._record(Call(self.request_id, self.core.steps, True, error=error))

    def cancelled(self) -> bool:
        return self.cancel

    @property
    def outputs(self) -> list[EngineOutput]:
        return [c.output for c in self.calls if c.output is not None]

    @property
    def tokens(self) -> tuple[int, ...]:
        """All tokens sent, concatenated (the whole body for a non-streaming request)."""
        return tuple(t for o in self.outputs for t in o.tokens)

    @property
    def error(self) -> RequestError | None:
        return self.calls[-1].error if self.calls else None

    def assert_well_formed(self) -> None:
        """Exactly one terminal call, it is the last, and it is not an error."""
        assert self.calls, "no output at all"
        assert [c.final for c in self.calls].count(True) == 1
        assert self.calls[-1].final
        assert self.calls[-1].error is None, self.calls[-1].error

    def assert_failed(self) -> RequestError:
        """Exactly one terminal call, and it is an error."""
        assert [c.final for c in self.calls].count(True) == 1 and self.calls[-1].final
        assert self.calls[-1].error is not None, "expected an error"
        return self.calls[-1].error


def request(
    ids: Sequence[int],
    *,
    rid: str = "r",
    max_tokens: int = 16,
    request_type: RequestType = RequestType.AGGREGATE,
    streaming: bool = False,
    exclude_input: bool = True,
    end_id: int | None = None,
    stop_words: tuple[tuple[int, ...], ...] = (),
    sampling: SamplingParams = GREEDY,
    blob: bytes | None = None,
    perf: bool = False,
) -> EngineRequest:
    return EngineRequest(
        request_id=rid,
        input_ids=tuple(ids),
        stop=StopCondition(max_new_tokens=max_tokens, end_id=end_id, stop_words=stop_words),
        sampling=sampling,
        request_type=request_type,
        streaming=streaming,
        exclude_input_in_output=exclude_input,
        context_phase_params=blob,
        return_perf_metrics=perf,
    )


_CORES: list[EngineCore] = []


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a scenario on a fresh loop; afterwards every engine it made must be idle and leak-free."""

    async def main() -> T:
        _CORES.clear()
        try:
            result = await coro_fn()
            for core in _CORES:
                await asyncio.wait_for(core.wait_idle(), core.config.kv_lease_timeout_s + 10)
                core.check_idle()
            return result
        finally:
            for core in _CORES:
                await core.close()
            _CORES.clear()

    return asyncio.run(main())


TEST_KEYS = KeyRing.parse("engine-harness-secret-0001", "the test harness")
"""The deployment secret of the harness's engines (a real deployment reads its own)."""


def new_core(name: str = "engine", transport: Any = None, keys: KeyRing = TEST_KEYS, **config: Any) -> EngineCore:
    """A zero-cost engine (registered with `run` for the leak check and shutdown)."""
    settings: dict[str, Any] = {"kv_lease_timeout_s": 0.5, **config}
    core = EngineCore(name, EngineConfig.free(**settings), transport=transport, keys=keys)
    _CORES.append(core)
    return core


async def submit(core: EngineCore, req: EngineRequest, log: list[Call] | None = None) -> RecordingSink:
    await core.start()
    sink = RecordingSink(core, req.request_id, log)
    core.submit(req, sink)
    return sink


async def complete(core: EngineCore, req: EngineRequest) -> RecordingSink:
    sink = await submit(core, req)
    await sink.done.wait()
    sink.assert_well_formed()
    return sink


async def context_blob(core: EngineCore, req: EngineRequest) -> tuple[int, bytes]:
    """Run `req` as a context_only request; return its first token and handoff blob."""
    sink = await complete(core, replace(req, request_type=RequestType.CONTEXT_ONLY, context_phase_params=None))
    (out,) = sink.outputs
    assert len(out.tokens) == 1 and out.context_phase_params is not None
    return out.tokens[0], out.context_phase_params


async def generate(core: EngineCore, req: EngineRequest) -> tuple[int, ...]:
    """Tokens of `req` run as a non-streaming aggregated request (prompt excluded)."""
    return (
        await complete(
            core, replace(req, request_type=RequestType.AGGREGATE, streaming=False, exclude_input_in_output=True)
        )
    ).tokens


async def disaggregated(ctx: EngineCore, gen: EngineCore, req: EngineRequest) -> RecordingSink:
    """`req` through a context engine then a generation engine; the generation sink."""
    _, blob = await context_blob(ctx, req)
    return await complete(gen, replace(req, request_type=RequestType.GENERATION_ONLY, context_phase_params=blob))
