"""The engine's KV cache at work: transfers, layouts, leases, admission, cancellation, cost model.

Every scenario runs under `engine_harness.run`, which fails it if any engine still holds a
request, a lease or a block afterwards. Transports are real (TCP sockets, shared memory);
the fakes below wrap a real transport (gate it, corrupt what it returns), never replace
engine logic.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from orchestrator.stub_engine.config import EngineConfig
from orchestrator.stub_engine.handoff import Handoff
from orchestrator.stub_engine.transfer import KVTransport, TcpTransport, make_transport
from orchestrator.wire.contract import RequestType
from orchestrator.wire.errors import ErrorCode, InvalidInput
from tests.engine_harness import (
    PROMPT,
    SAMPLING_SETS,
    TEST_KEYS,
    RecordingSink,
    complete,
    context_blob,
    disaggregated,
    generate,
    new_core,
    prompts,
    request,
    run,
    submit,
)


class GatedTransport:
    """A real transport whose pulls wait until the test opens the gate."""

    name = "gated"

    def __init__(self, inner: KVTransport) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def pull(self, handoff: Handoff, first: int, count: int) -> np.ndarray:
        self.started.set()
        await self.gate.wait()
        return await self.inner.pull(handoff, first, count)


class CorruptingTransport:
    """A real transport that alters the received blocks: the engine must not notice, the output must."""

    name = "corrupting"

    def __init__(self, inner: KVTransport, how: str) -> None:
        self.inner, self.how = inner, how

    async def pull(self, handoff: Handoff, first: int, count: int) -> np.ndarray:
        shards = (await self.inner.pull(handoff, first, count)).copy()
        if self.how == "values":
            shards[:, :, :, 1] += 1.0  # every V value read back as a different digit
        elif self.how == "order":
            shards = shards[:, ::-1].copy()  # the blocks arrive in reverse order
        return shards


# -- the oracle: disaggregated == aggregated across transports and layouts ---------------

LAYOUTS = [((1, 1), (1, 1)), ((2, 1), (1, 1)), ((1, 1), (1, 2)), ((2, 2), (4, 1)), ((1, 4), (2, 1))]


@pytest.mark.parametrize("transport", ["tcp", "shm", "auto"])
@pytest.mark.parametrize(("ctx_layout", "gen_layout"), LAYOUTS, ids=lambda x: f"tp{x[0]}pp{x[1]}")
def test_disaggregated_equals_aggregated_over_transports_and_layouts(
    transport: str, ctx_layout: tuple[int, int], gen_layout: tuple[int, int]
) -> None:
    """KV crosses processes' worth of machinery (sockets, shm, re-sharding) and the tokens stay identical."""

    async def body() -> None:
        agg = new_core("agg", tokens_per_block=4)
        ctx = new_core(
            "ctx", tokens_per_block=4, tensor_parallel_size=ctx_layout[0], pipeline_parallel_size=ctx_layout[1]
        )
        gen = new_core(
            "gen", tokens_per_block=4, tensor_parallel_size=gen_layout[0], pipeline_parallel_size=gen_layout[1],
            kv_transport=transport,
        )  # fmt: skip
        for i, ids in enumerate(prompts(12)):
            req = request(ids, rid=str(i), max_tokens=20, sampling=SAMPLING_SETS[i % len(SAMPLING_SETS)])
            expected = await generate(agg, req)
            assert (await disaggregated(ctx, gen, req)).tokens == expected
        assert ctx.leases.completed == 12 and ctx.leases.expired == 0

    run(body)


@pytest.mark.parametrize("how", ["values", "order"])
def test_corrupted_transfer_changes_the_output(how: str) -> None:
    """The stub is an oracle: damaged or reordered KV gives different tokens (and no error)."""

    async def body() -> None:
        agg, ctx = new_core("agg", tokens_per_block=4), new_core("ctx", tokens_per_block=4)
        gen = new_core("gen", tokens_per_block=4, transport=CorruptingTransport(TcpTransport(TEST_KEYS), how))
        checked = [ids for ids in prompts(20) if len(ids) >= 5]  # "order" needs two blocks to reverse
        differ = 0
        for i, ids in enumerate(checked):
            req = request(ids, rid=str(i), max_tokens=12)
            expected = await generate(agg, req)
            differ += (await disaggregated(ctx, gen, req)).tokens != expected
        assert differ >= len(checked) // 2, f"only {differ} of {len(checked)} outputs changed"

    run(body)


# -- leases ---------------------------------------------------------------------------


def test_unpulled_lease_expires_and_frees_its_blocks() -> None:
    """A handoff nobody pulls is released after kv_lease_timeout_s; pulling it later is NOT_FOUND (the KV is gone)."""

    async def body() -> None:
        ctx, gen = new_core("ctx", kv_lease_timeout_s=0.2, tokens_per_block=4), new_core("gen", tokens_per_block=4)
        _, blob = await context_blob(ctx, request(PROMPT))
        assert len(ctx.leases) == 1 and ctx.kv.pool.num_free < ctx.kv.pool.num_blocks
        await ctx.wait_idle()  # returns once the lease has expired
        assert ctx.leases.expired == 1 and ctx.kv.pool.num_free == ctx.kv.pool.num_blocks
        sink = await submit(gen, request(PROMPT, request_type=RequestType.GENERATION_ONLY, blob=blob))
        await sink.done.wait()
        error = sink.assert_failed()
        assert error.code is ErrorCode.NOT_FOUND and "no such lease" in str(error)

    run(body)


def test_a_lease_is_pulled_once() -> None:
    """The same handoff again: the engine that pulled it refuses it at submit as a replay
    (before any connection); another engine's pull finds the lease gone (NOT_FOUND)."""

    async def body() -> None:
        ctx, gen, other = new_core("ctx"), new_core("gen"), new_core("other")
        _, blob = await context_blob(ctx, request(PROMPT))
        req = request(PROMPT, request_type=RequestType.GENERATION_ONLY, blob=blob)
        await complete(gen, req)
        with pytest.raises(InvalidInput, match="replay"):
            gen.submit(req, RecordingSink(gen, "again"))
        assert gen.active == 0
        again = await submit(other, req)
        await again.done.wait()
        assert again.assert_failed().code is ErrorCode.NOT_FOUND

    run(body)


def test_unreachable_context_engine_is_unavailable() -> None:
    """A handoff whose transfer server is gone fails the generation request with NOT_FOUND."""

    async def body() -> None:
        ctx, gen = new_core("ctx"), new_core("gen", kv_transport="tcp")
        _, blob = await context_blob(ctx, request(PROMPT))
        await ctx.exchange.server.close()
        sink = await submit(gen, request(PROMPT, request_type=RequestType.GENERATION_ONLY, blob=blob))
        await sink.done.wait()
        error = sink.assert_failed()
        assert error.code is ErrorCode.NOT_FOUND and "KV transfer server of 'ctx'" in str(error)

    run(body)


# -- prefix caching and admission -------------------------------------------------------


def test_prefix_cache_reuse_is_reported_and_skips_prefill() -> None:
    """The same prompt again reuses its full blocks: perf outputs say so, the step prefills less."""

    async def body() -> None:
        core = new_core(tokens_per_block=4)
        ids = PROMPT[:21]  # 5 full blocks + 1 partial; 3 more tokens stay in the partial block
        first = await complete(core, request(ids, max_tokens=3, perf=True))
        second = await complete(core, request(ids, max_tokens=3, perf=True))
        p1, p2 = first.outputs[-1].perf, second.outputs[-1].perf
        assert p1 is not None and p2 is not None
        assert (p1.kv_cache_reused_blocks, p1.kv_cache_alloc_new_blocks, p1.kv_cache_alloc_total_blocks) == (0, 6, 6)
        assert (p2.kv_cache_reused_blocks, p2.kv_cache_alloc_new_blocks, p2.kv_cache_alloc_total_blocks) == (5, 1, 6)
        prefill = [log[0] for log in core.step_log if log[2]]
        assert prefill == [21, 1]
        assert first.tokens == second.tokens

    run(body)


def test_generation_engine_pulls_only_blocks_it_does_not_cache() -> None:
    """A generation engine that already caches the prompt's prefix pulls the rest only."""

    async def body() -> None:
        ctx, gen = new_core("ctx", tokens_per_block=4), new_core("gen", tokens_per_block=4)
        agg = new_core("agg", tokens_per_block=4)
        req = request(PROMPT[:21], max_tokens=8, perf=True)  # 5 full blocks + 1 partial
        expected = await generate(agg, req)
        one = await disaggregated(ctx, gen, req)
        two = await disaggregated(ctx, gen, req)
        assert one.tokens == two.tokens == expected
        p1, p2 = one.outputs[-1].perf, two.outputs[-1].perf
        assert p1 is not None and p2 is not None
        assert p1.kv_cache_reused_blocks == 0 and p2.kv_cache_reused_blocks == 5

    run(body)


def test_request_waits_for_blocks_instead_of_failing() -> None:
    """With room for one request's blocks, the second waits in the queue and then runs."""

    async def body() -> None:
        core = new_core(tokens_per_block=4, max_tokens_in_paged_kv_cache=32)  # 8 blocks
        a = await submit(core, request(tuple(range(10, 22)), rid="a", max_tokens=16, streaming=True))  # 7 blocks
        b = await submit(core, request(tuple(range(30, 42)), rid="b", max_tokens=16, streaming=True))
        await a.done.wait()
        await b.done.wait()
        a.assert_well_formed()
        b.assert_well_formed()
        assert b.calls[0].step > a.calls[-1].step, "b started only after a gave its blocks back"

    run(body)


def test_request_that_can_never_fit_is_rejected_with_the_fix() -> None:
    """prompt + max_tokens beyond the whole pool is INVALID_ARG at submit, naming the knob."""

    async def body() -> None:
        core = new_core(tokens_per_block=4, max_tokens_in_paged_kv_cache=32)
        await core.start()
        with pytest.raises(InvalidInput, match="max_tokens_in_paged_kv_cache"):
            core.submit(request(tuple(range(10, 22)), max_tokens=40), None)  # type: ignore[arg-type]

    run(body)


# -- cancellation and shutdown ---------------------------------------------------------


@pytest.mark.parametrize("where", ["running", "waiting", "pulling"])
def test_cancelled_request_ends_cancelled_and_frees_its_blocks(where: str) -> None:
    """A client that goes away gets CANCELLED wherever its request is; run() checks the blocks."""

    async def body() -> None:
        gated = GatedTransport(TcpTransport(TEST_KEYS))
        core = new_core("gen", tokens_per_block=4, max_tokens_in_paged_kv_cache=32, transport=gated)
        ctx = new_core("ctx", tokens_per_block=4)
        blocker = await submit(core, request(tuple(range(10, 22)), rid="blocker", max_tokens=16, streaming=True))
        await blocker.first.wait()
        if where == "pulling":
            _, blob = await context_blob(ctx, request((5, 6, 7), max_tokens=4))
            victim = await submit(
                core, request((5, 6, 7), rid="v", max_tokens=4, request_type=RequestType.GENERATION_ONLY, blob=blob)
            )
            await gated.started.wait()
        elif where == "waiting":
            victim = await submit(core, request(tuple(range(30, 42)), rid="v", max_tokens=16))  # no blocks yet
        else:
            victim, blocker = blocker, None  # type: ignore[assignment]
        victim.cancel = True
        await victim.done.wait()
        assert victim.assert_failed().code is ErrorCode.CANCELLED
        gated.gate.set()
        if blocker is not None:
            blocker.cancel = True
            await blocker.done.wait()

    run(body)


def test_close_fails_in_flight_requests_unavailable() -> None:
    """Shutting an engine down ends every request with UNAVAILABLE and frees every block."""

    async def body() -> None:
        core = new_core(tokens_per_block=4)
        sinks = [
            await submit(core, request(ids, rid=str(i), max_tokens=50, streaming=True))
            for i, ids in enumerate(prompts(5))
        ]
        await sinks[0].first.wait()
        await core.close()
        for sink in sinks:
            assert sink.assert_failed().code is ErrorCode.UNAVAILABLE
        core.check_idle()

    run(body)


# -- scheduling: interference and overlap ----------------------------------------------


def test_long_prefill_shares_a_step_with_decodes_only_in_an_aggregated_engine() -> None:
    """The seed's claim, by step composition: in an aggregated engine a long prompt's prefill
    lands in a step that also carries running sequences' decodes (their next token waits for
    it); a generation-only engine never runs a prefill step."""

    async def body() -> None:
        agg, ctx, gen = new_core("agg"), new_core("ctx"), new_core("gen")
        long_prompt = tuple(range(100, 1100))
        for engine in (agg, gen):
            runner = await submit(engine, request(PROMPT, rid="run", max_tokens=30, streaming=True))
            await runner.first.wait()
            req = request(long_prompt, rid="long", max_tokens=4)
            if engine is gen:
                _, blob = await context_blob(ctx, req)
                req = replace(req, request_type=RequestType.GENERATION_ONLY, context_phase_params=blob)
            late = await submit(engine, req)
            await late.done.wait()
            await runner.done.wait()
        mixed = [s for s in agg.step_log if s[0] >= 1000 and s[1] > 0]
        assert mixed, f"no step mixed the long prefill with decodes: {agg.step_log}"
        assert all(prefill == 0 for prefill, decoding, _ in gen.step_log if decoding), gen.step_log
        cost = EngineConfig()  # the default (H100-calibrated) cost model prices both logs
        worst_agg = max(cost.step_seconds(p, d) for p, d, _ in agg.step_log if d)
        worst_gen = max(cost.step_seconds(p, d) for p, d, _ in gen.step_log if d)
        assert worst_agg > 3 * worst_gen

    run(body)


def test_generation_engine_keeps_decoding_while_a_transfer_is_in_flight() -> None:
    """A pull in progress does not stop the running batch: its tokens keep coming."""

    async def body() -> None:
        gated = GatedTransport(TcpTransport(TEST_KEYS))
        ctx, gen = new_core("ctx"), new_core("gen", transport=gated)
        runner = await submit(gen, request(PROMPT, rid="run", max_tokens=40, streaming=True))
        await runner.first.wait()
        req = request(PROMPT[:9], rid="new", max_tokens=5)
        _, blob = await context_blob(ctx, req)
        newcomer = await submit(gen, replace(req, request_type=RequestType.GENERATION_ONLY, context_phase_params=blob))
        await gated.started.wait()
        before = len(runner.calls)
        while len(runner.calls) < before + 5 and not runner.done.is_set():
            await asyncio.sleep(0)  # let the engine loop step; the pull is parked at the gate
        assert len(runner.calls) >= before + 5, "the running sequence stalled during the transfer"
        assert not newcomer.calls
        gated.gate.set()
        await newcomer.done.wait()
        newcomer.assert_well_formed()
        await runner.done.wait()

    run(body)


# -- configuration and the cost model --------------------------------------------------


def test_cost_model_formula() -> None:
    """step_seconds adds overhead, prefill per token and (if decoding) per-step, per-seq and per-KV-token costs."""
    c = EngineConfig(step_overhead_ms=1, prefill_us_per_token=10, decode_ms_per_step=5, decode_us_per_seq=100,
                     decode_ns_per_kv_token=1000, transfer_us_per_token=2)  # fmt: skip
    assert c.step_seconds(0, 0) == pytest.approx(0.001)
    assert c.step_seconds(1000, 0) == pytest.approx(0.011)
    assert c.step_seconds(0, 10, kv_tokens=2000) == pytest.approx(0.001 + 0.005 + 0.001 + 0.002)
    assert c.transfer_seconds(500) == pytest.approx(0.001)
    d = EngineConfig()
    assert d.step_seconds(4000, 0) > 10 * d.step_seconds(0, 1, kv_tokens=100), "a long prefill dwarfs a decode step"


def test_tensor_parallelism_divides_the_work_and_adds_its_all_reduces() -> None:
    """tp GPUs share prefill, decode and transfer work; tp > 1 pays ring all-reduces per token and per step."""
    costs = dict(step_overhead_ms=1, prefill_us_per_token=10, decode_ms_per_step=5, decode_us_per_seq=100,
                 decode_ns_per_kv_token=1000, transfer_us_per_token=2, tp_comm_us_per_token=1, tp_comm_ms_per_step=0.5)  # fmt: skip
    one, four = EngineConfig(**costs), EngineConfig(**costs, tensor_parallel_size=4)  # type: ignore[arg-type]
    assert one.step_seconds(1000, 0) == pytest.approx(0.011), "tp=1 has no all-reduce"
    # prefill: 10/4 us compute + 1 us x 2(4-1)/4 all-reduce per token, + 0.5 ms per step
    assert four.step_seconds(1000, 0) == pytest.approx(0.001 + 0.0005 + 1000 * (2.5 + 1.5) / 1e6)
    assert four.step_seconds(0, 10, kv_tokens=2000) == pytest.approx(0.001 + 0.0005 + (0.005 + 0.001 + 0.002) / 4)
    assert four.transfer_seconds(500) == pytest.approx(one.transfer_seconds(500) / 4)
    assert EngineConfig(tensor_parallel_size=8).layout.tp == 8, "8 KV heads: tp up to 8"
    with pytest.raises(ValueError, match="must divide the model's 8 heads"):
        EngineConfig(tensor_parallel_size=3)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"enable_kv_cache_reuse": "maybe"}, "'enable_kv_cache_reuse' must be a bool"),
        ({"kv_transport": "ucx"}, "'kv_transport' must be one of"),
        ({"tensor_parallel_size": "3"}, "tensor_parallel_size=3"),
        ({"pipeline_parallel_size": "3"}, "pipeline_parallel_size=3"),
        ({"tokens_per_block": "0"}, "'tokens_per_block' must be >= 1"),
        ({"max_tokens_in_paged_kv_cache": "8", "tokens_per_block": "16"}, "'max_tokens_in_paged_kv_cache'"),
        ({"kv_lease_timeout_s": "0"}, "'kv_lease_timeout_s' must be > 0"),
        ({"prefill_us_per_token": "-1"}, "'prefill_us_per_token' must be >= 0"),
        ({"max_batch_size": "x"}, "'max_batch_size' must be a int"),
    ],
)  # fmt: skip
def test_bad_engine_parameters_name_their_key(params: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig.from_parameters(params)


def test_engine_parameters_parse_and_ignore_foreign_keys() -> None:
    c = EngineConfig.from_parameters(
        {
            "enable_kv_cache_reuse": "false",
            "kv_transport": "tcp",
            "tensor_parallel_size": "2",
            "gpt_model_type": "inflight_fused_batching",
        }
    )
    assert (c.enable_kv_cache_reuse, c.kv_transport, c.tensor_parallel_size) == (False, "tcp", 2)
    assert make_transport("shm", TEST_KEYS).name == "shm"
    with pytest.raises(ValueError, match="kv_transport"):
        make_transport("nixl", TEST_KEYS)
