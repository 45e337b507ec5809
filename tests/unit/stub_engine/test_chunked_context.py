"""Chunked context (`enable_chunked_context`, orchestrator/stub_engine/chunking.py) on real
EngineCores: a long prompt's prefill spread over steps beside the running decodes, the same
tokens as without chunking on every path, the prefix cache never serving unwritten blocks,
every ending mid-prefill, and the knob's parsing.

Steps are read from `core.step_log` (prefill tokens, decoding, admitted) and priced with
`EngineConfig.step_seconds`, never timed; `run` checks after each scenario that no request,
lease or block is left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from orchestrator.stub_engine.config import EngineConfig
from orchestrator.stub_engine.core import EngineCore
from orchestrator.stub_engine.transfer import TcpTransport
from orchestrator.wire.contract import EngineRequest, RequestType
from orchestrator.wire.errors import ErrorCode
from tests.engine_harness import (
    SAMPLING_SETS,
    TEST_KEYS,
    RecordingSink,
    complete,
    generate,
    new_core,
    prompts,
    request,
    run,
    submit,
)

TPB = 4
BUDGET = 64  # max_num_tokens of the small engines below (a multiple of TPB, as chunking requires)


def small(name: str = "engine", chunked: bool = True, **config: Any) -> EngineCore:
    """A zero-cost engine with small blocks and a small step budget, so short prompts chunk."""
    settings: dict[str, Any] = {"tokens_per_block": TPB, "max_num_tokens": BUDGET, **config}
    return new_core(name, enable_chunked_context=chunked, **settings)


def text(length: int, seed: int = 7) -> tuple[int, ...]:
    """`length` prompt ids of varied text (repeats in it give the model something to copy)."""
    ids: list[int] = []
    while len(ids) < length:
        ids.extend(t for p in prompts(20, seed) for t in p)
        seed += 1
    return tuple(ids[:length])


async def until(condition: Callable[[], object]) -> None:
    """Yield to the engine loop until `condition` holds (a zero-cost step is one loop turn)."""
    for _ in range(100_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def prefilling(core: EngineCore, rid: str) -> bool:
    """The request is part-way through a chunked prefill: some of its prompt written, not all."""
    for seq in core.queues.prefilling:
        if seq.request.request_id == rid and seq.kv is not None and 0 < seq.kv.length < seq.prompt_tokens:
            return True
    return False


async def decoders(core: EngineCore, count: int, max_tokens: int = 200) -> list[RecordingSink]:
    """`count` streaming requests, returned once every one of them is decoding."""
    sinks = [
        await submit(core, request(ids, rid=f"run{i}", max_tokens=max_tokens, streaming=True))
        for i, ids in enumerate(prompts(count, seed=99))
    ]
    for sink in sinks:
        await sink.first.wait()
    return sinks


async def finish(sinks: list[RecordingSink]) -> None:
    for sink in sinks:
        await sink.done.wait()
        sink.assert_well_formed()


# -- step composition ------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
def test_a_long_prefill_spans_steps_beside_every_running_decode_only_when_chunked(chunked: bool) -> None:
    """A prompt of 4x the step budget while 3 sequences decode: unchunked, one step carries the
    whole prefill; chunked, several steps do, each with every running sequence decoding, within
    max_num_tokens - decoding, in whole blocks but the last; the first token follows the last chunk."""

    async def body() -> None:
        core = small(chunked=chunked)
        runners = await decoders(core, 3, max_tokens=40)
        mark = len(core.step_log)
        long = await submit(core, request(tuple(range(1000, 1000 + 4 * BUDGET)), rid="long", streaming=True))
        await long.done.wait()
        long.assert_well_formed()
        await finish(runners)
        steps = [(i, log) for i, log in enumerate(core.step_log[mark:], start=mark + 1) if log[0]]
        chunks = [prefill for _, (prefill, _, _) in steps]
        assert sum(chunks) == 4 * BUDGET
        assert all(decoding == 3 for _, (_, decoding, _) in steps), steps
        if not chunked:
            assert chunks == [4 * BUDGET]
        else:
            assert len(chunks) >= 4, chunks
            assert all(c <= BUDGET - 3 for c in chunks), chunks
            assert all(c % TPB == 0 for c in chunks[:-1]), chunks
            assert [admitted for _, (_, _, admitted) in steps] == [1] + [0] * (len(steps) - 1)
            assert [i for i, _ in steps] == list(range(steps[0][0], steps[-1][0] + 1)), "one chunk every step"
        assert long.calls[0].step == steps[-1][0], "the first token comes in the step of the last chunk"

    run(body)


def test_new_prompts_start_in_what_the_continuing_chunks_leave_and_hold_batch_slots() -> None:
    """A prompt part-way through its prefill goes first (whole blocks: 60 of the 63 tokens one
    decoding sequence leaves); a 3-token prompt starts in the same step with the rest; the
    sequence mid-prefill holds a batch slot, so a third prompt waits for one (max_batch_size 3)."""

    async def body() -> None:
        core = small(max_batch_size=3)
        runner = (await decoders(core, 1, max_tokens=60))[0]
        long = await submit(core, request(text(3 * BUDGET + 10), rid="long", max_tokens=4))
        await until(lambda: prefilling(core, "long"))
        short = await submit(core, request(tuple(range(2000, 2003)), rid="short", max_tokens=30, streaming=True))
        third = await submit(core, request(tuple(range(3000, 3003)), rid="third", max_tokens=2, streaming=True))
        await finish([long, short, third, runner])
        first_short = short.calls[0].step
        assert core.step_log[first_short - 1] == (BUDGET - 4 + 3, 1, 1), "a full-width chunk, then the short prompt"
        assert long.calls[0].step > first_short, "the long prompt was still prefilling"
        freed = min(s.calls[-1].step for s in (runner, long, short))
        assert third.calls[0].step > freed, "no batch slot for a third prompt while the long one prefilled"

    run(body)


def test_the_symbolic_backing_chunks_the_same_steps() -> None:
    """The simulator's backing (no K/V: `symbolic.py`) schedules the same chunks as the real one."""

    async def scenario(core: EngineCore) -> list[tuple[int, int, int]]:
        runners = await decoders(core, 3, max_tokens=12)
        long = await submit(core, request(tuple(range(1000, 1000 + 4 * BUDGET)), rid="long", max_tokens=3))
        await finish([long, *runners])
        return core.step_log

    async def body() -> None:
        config = EngineConfig.free(tokens_per_block=TPB, max_num_tokens=BUDGET, enable_chunked_context=True)
        symbolic = EngineCore("symbolic", config, transport=TcpTransport(TEST_KEYS), keys=TEST_KEYS, symbolic=True)
        try:
            expected = await scenario(small("real"))
            assert await scenario(symbolic) == expected
            assert max(prefill for prefill, _, _ in expected) < 4 * BUDGET
            await symbolic.wait_idle()
            symbolic.check_idle()
        finally:
            await symbolic.close()

    run(body)


# -- the same tokens -------------------------------------------------------------------------


def _mixed_requests() -> list[EngineRequest]:
    """Short and long prompts (longer than the step budget too), every sampling set."""
    ids = [*prompts(12), text(3 * BUDGET + 5), text(BUDGET), text(BUDGET + 1, seed=3), text(500, seed=11)]
    return [
        request(p, rid=str(i), max_tokens=20, sampling=SAMPLING_SETS[i % len(SAMPLING_SETS)]) for i, p in enumerate(ids)
    ]


async def _all_at_once(core: EngineCore, reqs: list[EngineRequest]) -> list[tuple[int, ...]]:
    sinks = [await submit(core, r) for r in reqs]
    await finish(sinks)
    return [s.tokens for s in sinks]


def test_aggregate_outputs_are_the_same_with_chunking_on_and_off() -> None:
    """Many prompts at once, long and short, greedy and sampled: token for token the same."""

    async def body() -> None:
        reqs = _mixed_requests()
        on, off = small("on"), small("off", chunked=False)
        assert await _all_at_once(on, reqs) == await _all_at_once(off, reqs)
        assert max(prefill for prefill, _, _ in on.step_log) <= BUDGET < max(p for p, _, _ in off.step_log)

    run(body)


def test_a_chunked_context_phase_hands_off_the_same_kv() -> None:
    """context_only on a chunked engine, pulled by a generation engine: the aggregate's tokens."""

    async def body() -> None:
        reqs = _mixed_requests()
        off, ctx, gen = small("off", chunked=False), small("ctx"), small("gen")
        expected = await _all_at_once(off, reqs)
        contexts = [await submit(ctx, replace(r, request_type=RequestType.CONTEXT_ONLY)) for r in reqs]
        await finish(contexts)
        assert max(prefill for prefill, _, _ in ctx.step_log) <= BUDGET
        generations = []
        for r, c in zip(reqs, contexts):
            (out,) = c.outputs
            blob = out.context_phase_params
            generations.append(
                await submit(gen, replace(r, request_type=RequestType.GENERATION_ONLY, context_phase_params=blob))
            )
        await finish(generations)
        assert [g.tokens for g in generations] == expected
        assert [c.outputs[0].tokens for c in contexts] == [e[:1] for e in expected]

    run(body)


def test_prompts_reusing_a_cached_prefix_give_the_same_tokens_chunked() -> None:
    """Prompts sharing prefixes, one after another (each reuses what the last cached) and then
    all at once: the same tokens with chunking on and off, and the chunked engine did reuse."""

    async def body() -> None:
        base = text(5 * BUDGET)
        family = [base[:n] + tail for n, tail in ((4 * BUDGET, (1, 2, 3)), (100, (9,)), (5 * BUDGET, ()), (37, (5, 6)))]
        reqs = [request(ids, rid=f"p{i}", max_tokens=16, perf=True) for i, ids in enumerate(family)]
        on, off = small("on"), small("off", chunked=False)
        for core in (on, off):
            await generate(core, request(base, rid="warm", max_tokens=1))
        one_by_one = [await complete(on, r) for r in reqs]
        assert [s.tokens for s in one_by_one] == [await generate(off, r) for r in reqs]
        reused = [s.outputs[-1].perf.kv_cache_reused_blocks for s in one_by_one]  # type: ignore[union-attr]
        assert all(n > 0 for n in reused), reused
        assert await _all_at_once(on, reqs) == await _all_at_once(off, reqs)

    run(body)


def test_a_prompt_sharing_a_prefix_with_a_half_prefilled_one_reuses_only_written_blocks() -> None:
    """While A is part-way through its prefill, B = A's first 300 tokens + 1 arrives. Only A's
    written blocks may serve B (its last chunk would otherwise fit what A's chunk leaves in the
    step, and read blocks A has yet to write): B's tokens are the oracle's."""

    async def body() -> None:
        a_ids = text(10 * BUDGET, seed=21)
        b_ids = a_ids[:300] + (4242,)
        oracle = new_core("oracle")
        expected_a = await generate(oracle, request(a_ids, max_tokens=24))
        expected_b = await generate(oracle, request(b_ids, max_tokens=24))
        core = small()
        runner = await decoders(core, 1)  # a decoding sequence leaves a few tokens of each step's budget
        a = await submit(core, request(a_ids, rid="a", max_tokens=24))
        await until(lambda: prefilling(core, "a"))
        written = core.queues.prefilling[0].kv.length  # type: ignore[union-attr]
        assert written < 300 - BUDGET, "B shares blocks A has not written, nor will in the next step"
        b = await submit(core, request(b_ids, rid="b", max_tokens=24, perf=True))
        await a.done.wait()
        await b.done.wait()
        runner[0].cancel = True
        await runner[0].done.wait()
        a.assert_well_formed()
        b.assert_well_formed()
        assert a.tokens == expected_a
        assert b.tokens == expected_b
        assert b.outputs[-1].perf.kv_cache_reused_blocks == 300 // TPB  # type: ignore[union-attr]

    run(body)


# -- the cost model --------------------------------------------------------------------------


def test_chunking_lowers_the_worst_modelled_decode_step_during_a_long_prefill() -> None:
    """Priced with the engine's own (non-zero) cost model from its step log: the worst step a
    decoding sequence waits for is the whole prefill unchunked, about one budget's worth chunked."""
    costs = {"step_overhead_ms": 0.1, "prefill_us_per_token": 32.0, "decode_ms_per_step": 1.0,
             "decode_us_per_seq": 32.0, "max_num_tokens": 256}  # fmt: skip

    async def worst_decode_step(chunked: bool) -> tuple[float, int]:
        core = small(f"cost-{chunked}", chunked=chunked, **costs)
        runners = await decoders(core, 2, max_tokens=30)
        long = await submit(core, request(text(1024), rid="long", max_tokens=2))
        await long.done.wait()
        await finish(runners)
        worst = max(core.config.step_seconds(p, d) for p, d, _ in core.step_log if d)
        return worst, sum(p for p, _, _ in core.step_log)

    async def body() -> None:
        whole, whole_prefill = await worst_decode_step(False)
        chunked, chunked_prefill = await worst_decode_step(True)
        assert chunked_prefill == whole_prefill, "chunking moves prefill work between steps, adds none"
        priced = EngineConfig.free(**costs)
        assert whole >= priced.step_seconds(1024, 2)
        assert chunked <= priced.step_seconds(256, 2)
        assert chunked < whole / 3

    run(body)


# -- endings mid-prefill -----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["stop", "cancel", "crash", "shutdown"])
def test_every_ending_works_in_the_middle_of_a_chunked_prefill(how: str) -> None:
    """Stop, cancellation, an injected crash (a context phase crashes before its answer, after
    its last chunk) and shutdown reach a request part-way through its prefill: one final
    answer, every block back, the decoding sequence beside it untouched."""

    async def body() -> None:
        core = small()
        runner = (await decoders(core, 1, max_tokens=400))[0]
        req = request(text(16 * BUDGET), rid="long", max_tokens=8, streaming=True)
        sink = RecordingSink(core, "long")
        mark = len(core.step_log)
        if how == "crash":
            core.submit(replace(req, request_type=RequestType.CONTEXT_ONLY), sink, fault="crash")
        else:
            core.submit(req, sink)
        await until(lambda: prefilling(core, "long"))
        if how == "stop":
            assert core.stop("long") == 1
            sink.assert_well_formed()
            assert [o.tokens for o in sink.outputs] == [()]
        elif how == "cancel":
            sink.cancel = True
            await sink.done.wait()
            assert sink.assert_failed().code is ErrorCode.CANCELLED
        elif how == "crash":
            await sink.done.wait()
            error = sink.assert_failed()
            assert error.code is ErrorCode.UNAVAILABLE and "before the context response" in error.message
            assert len(core.leases) == 0
        else:
            await core.close()
            assert sum(prefill for prefill, _, _ in core.step_log[mark:]) < 16 * BUDGET
            assert sink.assert_failed().code is ErrorCode.UNAVAILABLE
            assert runner.assert_failed().code is ErrorCode.UNAVAILABLE
            core.check_idle()
            return
        assert all(seq.request.request_id != "long" for seq in core.queues.all())
        prefilled = sum(prefill for prefill, _, _ in core.step_log[mark:])
        assert (prefilled == 16 * BUDGET) == (how == "crash"), "only the crash waits for the last chunk"
        calls = len(sink.calls)
        steps = core.steps
        await until(lambda: core.steps >= steps + 3)
        assert len(sink.calls) == calls, "nothing more after the final answer"
        runner.cancel = True
        await runner.done.wait()

    run(body)


# -- configuration ---------------------------------------------------------------------------


def test_the_knob_parses_from_string_parameters_and_is_off_by_default() -> None:
    assert EngineConfig().enable_chunked_context is False
    for raw, value in (("true", True), ("false", False), ("True", True), ("0", False)):
        assert EngineConfig.from_parameters({"enable_chunked_context": raw}).enable_chunked_context is value
    with pytest.raises(ValueError, match="engine parameter 'enable_chunked_context' must be a bool, got 'maybe'"):
        EngineConfig.from_parameters({"enable_chunked_context": "maybe"})
    with pytest.raises(ValueError, match="'max_num_tokens'=100 must be a multiple of tokens_per_block=32"):
        EngineConfig.from_parameters({"enable_chunked_context": "true", "max_num_tokens": "100"})
    assert EngineConfig.from_parameters({"max_num_tokens": "100"}).max_num_tokens == 100, "only chunks need blocks"
