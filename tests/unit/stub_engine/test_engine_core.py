"""EngineCore driven directly on an asyncio loop: phases, handoff, batching, stopping.

The harness (`tests/engine_harness.py`) runs zero-cost engines, asserts order through step
counts rather than time, and checks after every scenario that no block or lease is left.
KV-cache, transfer and cost-model behaviour is in `test_engine_kv.py`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.stub_engine.core import EngineCore
from orchestrator.stub_engine.handoff import MAGIC, Handoff
from orchestrator.stub_engine.kv_auth import KeyRing
from orchestrator.stub_engine.kv_layout import Geometry, Layout
from orchestrator.wire.contract import RequestType, SamplingParams
from orchestrator.wire.errors import InvalidInput
from tests.engine_harness import (
    OTHER_PROMPT,
    PROMPT,
    SAMPLING_SETS,
    TEST_KEYS,
    TOK,
    Call,
    RecordingSink,
    complete,
    context_blob,
    generate,
    new_core,
    request,
    run,
    submit,
)
from tests.engine_harness import prompts as _prompts

# -- phases ---------------------------------------------------------------------------


def test_context_only_sends_one_final_output_with_first_token_and_blob() -> None:
    """context_only: one final output, exactly one token (the aggregate's first) and a blob."""

    async def body() -> None:
        core = new_core()
        reference = await generate(core, request(PROMPT, max_tokens=8))
        for streaming in (False, True):
            sink = await complete(core, request(PROMPT, request_type=RequestType.CONTEXT_ONLY, streaming=streaming))
            assert len(sink.calls) == 1 and sink.calls[0].final
            (out,) = sink.outputs
            assert out.tokens == reference[:1]
            assert out.context_phase_params is not None
            handoff = Handoff.decode(out.context_phase_params, TEST_KEYS)
            assert handoff.first_token == reference[0] and handoff.source_engine == "engine"
        assert core.active == 0

    run(body)


def test_generation_only_repeats_first_token_then_continues() -> None:
    """generation_only (streaming): the first output starts with the handoff's token, then decoding goes on."""

    async def body() -> None:
        ctx, gen, agg = new_core("ctx"), new_core("gen"), new_core("agg")
        reference = await generate(agg, request(PROMPT, max_tokens=10))
        first, blob = await context_blob(ctx, request(PROMPT, max_tokens=10))
        sink = await complete(
            gen, request(PROMPT, request_type=RequestType.GENERATION_ONLY, blob=blob, streaming=True, max_tokens=10)
        )
        assert sink.outputs[0].tokens[0] == first
        assert sink.tokens == reference
        assert len(sink.outputs) > 1, "a streaming generation sends more than one output"

    run(body)


@pytest.mark.parametrize("request_type", [RequestType.AGGREGATE, RequestType.GENERATION_ONLY])
def test_streaming_concatenates_to_non_streaming(request_type: RequestType) -> None:
    """Streamed outputs concatenate to the non-streaming (exclude_input) body for every prompt."""

    async def body() -> None:
        ctx, core = new_core("ctx"), new_core("gen")

        async def blob(ids: tuple[int, ...]) -> bytes | None:
            """A fresh handoff per request: a lease is pulled once."""
            if request_type is not RequestType.GENERATION_ONLY:
                return None
            return (await context_blob(ctx, request(ids, max_tokens=12)))[1]

        for ids in _prompts(10):
            req = request(ids, request_type=request_type, max_tokens=12)
            whole = await complete(core, replace(req, streaming=False, context_phase_params=await blob(ids)))
            streamed = await complete(core, replace(req, streaming=True, context_phase_params=await blob(ids)))
            assert len(whole.outputs) == 1
            assert streamed.tokens == whole.tokens
            assert len(whole.tokens) == 12

    run(body)


def test_non_streaming_includes_prompt_unless_excluded() -> None:
    """Non-streaming body is prompt + generated, or generated alone with exclude_input_in_output."""

    async def body() -> None:
        core = new_core()
        excluded = (await complete(core, request(PROMPT, max_tokens=6, exclude_input=True))).tokens
        included = (await complete(core, request(PROMPT, max_tokens=6, exclude_input=False))).tokens
        assert included == PROMPT + excluded

    run(body)


@pytest.mark.parametrize("sampling", SAMPLING_SETS, ids=lambda s: f"k{s.top_k}-t{s.temperature}-p{s.top_p}-s{s.seed}")
def test_disaggregated_equals_aggregated(sampling: SamplingParams) -> None:
    """The oracle: context_only + generation_only yields the aggregate's tokens, for 50 prompts at once."""

    async def body() -> None:
        agg, ctx, gen = new_core("agg"), new_core("ctx"), new_core("gen")
        prompts = _prompts(50)
        reqs = [request(ids, rid=str(i), max_tokens=24, sampling=sampling) for i, ids in enumerate(prompts)]
        agg_sinks = [await submit(agg, r) for r in reqs]
        ctx_sinks = [await submit(ctx, replace(r, request_type=RequestType.CONTEXT_ONLY)) for r in reqs]
        for s in ctx_sinks:
            await s.done.wait()
            s.assert_well_formed()
        gen_sinks = []
        for r, c in zip(reqs, ctx_sinks):
            (out,) = c.outputs
            gen_sinks.append(
                await submit(
                    gen,
                    replace(r, request_type=RequestType.GENERATION_ONLY, context_phase_params=out.context_phase_params),
                )
            )
        for a, g, c in zip(agg_sinks, gen_sinks, ctx_sinks):
            await a.done.wait()
            await g.done.wait()
            a.assert_well_formed()
            g.assert_well_formed()
            assert len(a.tokens) == 24
            assert g.tokens == a.tokens
            assert c.outputs[0].tokens == a.tokens[:1]
        assert agg.active == ctx.active == gen.active == 0

    run(body)


# -- handoff validation ---------------------------------------------------------------


def _flip(blob: bytes, pos: int) -> bytes:
    return blob[:pos] + bytes([blob[pos] ^ 0x40]) + blob[pos + 1 :]


def _rejected(core: EngineCore, ids: Sequence[int], blob: bytes | None) -> InvalidInput:
    """Submit a generation_only request that must be refused; nothing may stay queued."""
    req = request(ids, request_type=RequestType.GENERATION_ONLY, blob=blob)
    sink = RecordingSink(core, "bad")
    with pytest.raises(InvalidInput) as info:
        core.submit(req, sink)
    assert "context_phase_params" in str(info.value)
    assert core.active == 0
    assert sink.calls == []
    return info.value


def test_every_flipped_byte_of_a_handoff_is_rejected() -> None:
    """A handoff with any single byte altered is refused at submit with InvalidInput."""

    async def body() -> None:
        ctx, gen = new_core("ctx"), new_core("gen")
        _, blob = await context_blob(ctx, request(PROMPT))
        for pos in range(len(blob)):
            _rejected(gen, PROMPT, _flip(blob, pos))
        assert gen.steps == 0

    run(body)


def test_truncated_handoff_is_rejected() -> None:
    """A handoff cut at any length (including empty) is refused at submit with InvalidInput."""

    async def body() -> None:
        ctx, gen = new_core("ctx"), new_core("gen")
        _, blob = await context_blob(ctx, request(PROMPT))
        for cut in range(len(blob)):
            _rejected(gen, PROMPT, blob[:cut])
        assert gen.steps == 0

    run(body)


def test_handoff_of_a_different_prompt_is_rejected() -> None:
    """A valid handoff for another prompt is refused: it would continue the wrong sequence."""

    async def body() -> None:
        ctx, gen = new_core("ctx"), new_core("gen")
        _, blob = await context_blob(ctx, request(OTHER_PROMPT))
        error = _rejected(gen, PROMPT, blob)
        assert "different prompt" in str(error)
        _, longer = await context_blob(ctx, request(PROMPT + (TOK.encode("x")[0],)))
        _rejected(gen, PROMPT, longer)
        assert gen.steps == 0

    run(body)


def test_generation_only_without_handoff_is_rejected() -> None:
    """generation_only with no context_phase_params is refused at submit."""

    async def body() -> None:
        _rejected(new_core("gen"), PROMPT, None)

    run(body)


def test_handoff_from_an_engine_with_other_block_size_is_rejected() -> None:
    """Context and generation engines must agree on tokens_per_block; the error names the knob."""

    async def body() -> None:
        ctx, gen = new_core("ctx", tokens_per_block=8), new_core("gen", tokens_per_block=16)
        _, blob = await context_blob(ctx, request(PROMPT))
        error = _rejected(gen, PROMPT, blob)
        assert "tokens_per_block" in str(error)

    run(body)


def _handoff(**changes: object) -> Handoff:
    base = Handoff(
        request_id="r", source_engine="ctx", first_token=7, num_tokens=3, prompt_digest=2**63 + 5, lease_id=99,
        geometry=Geometry(), layout=Layout(2, 1), host="127.0.0.1", port=4242, host_id="h/boot", shm_name="dkv_x",
    )  # fmt: skip
    return replace(base, **changes)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    rid=st.text(max_size=40),
    src=st.text(max_size=40),
    first=st.integers(-(2**31), 2**31 - 1),
    num=st.integers(0, 2**32 - 1),
    digest=st.integers(0, 2**64 - 1),
    lease=st.integers(0, 2**64 - 1),
    tp=st.sampled_from([1, 2, 4]),
    pp=st.sampled_from([1, 2, 4]),
    port=st.integers(0, 65535),
    host=st.text(max_size=60),
)
def test_handoff_round_trip(
    rid: str, src: str, first: int, num: int, digest: int, lease: int, tp: int, pp: int, port: int, host: str
) -> None:
    """decode(encode(h)) == h for any ids, names, numbers, layouts and addresses."""
    h = _handoff(
        request_id=rid, source_engine=src, first_token=first, num_tokens=num, prompt_digest=digest, lease_id=lease,
        layout=Layout(tp, pp), port=port, host=host,
    )  # fmt: skip
    assert replace(Handoff.decode(h.encode(TEST_KEYS), TEST_KEYS), mac=b"") == h


def _sealed(body: bytes) -> bytes:
    """A body with a valid signature appended, so only the structural checks can fail."""
    return body + TEST_KEYS.sign(b"handoff", body)


_GOOD = _handoff().encode(TEST_KEYS)
_FIXED_END = len(MAGIC) + struct.calcsize("<iIQQQHHHIHHH")
_BLOCK_SIZE_AT = len(MAGIC) + struct.calcsize("<iIQQQHHH")


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", "bad magic"),
        (b"DKV", "bad magic"),
        (b"DKV2" + _GOOD[4:], "bad magic"),  # the previous version's magic
        (MAGIC + b"\0" * 31, "bad magic"),  # shorter than magic + MAC
        (_flip(_GOOD, 9), "not signed"),
        (_GOOD[:-1], "not signed"),
        (_handoff().encode(KeyRing.parse("another-deployment-secret", "t")), "not signed"),
        (_sealed(MAGIC), "malformed"),
        (_sealed(_GOOD[:_FIXED_END] + struct.pack("<H", 50) + b"r"), "malformed"),
        (_sealed(_GOOD[:_FIXED_END] + struct.pack("<H", 2) + b"\xff\xfe" + b"\0" * 8), "malformed"),
        (_sealed(_GOOD[:-32] + b"x"), "malformed"),
        (_sealed(_GOOD[:_BLOCK_SIZE_AT] + struct.pack("<I", 0) + _GOOD[_BLOCK_SIZE_AT + 4 : -32]), "malformed"),
    ],
    ids=["empty", "short", "old-magic", "no-room-for-mac", "flipped", "truncated", "other-secret", "no-header",
         "id-overruns", "bad-utf8", "trailing-bytes", "zero-block-size"],
)  # fmt: skip
def test_handoff_decode_failures_say_which_check_failed(blob: bytes, message: str) -> None:
    """Each decode failure is a ValueError naming context_phase_params and the failed check."""
    with pytest.raises(ValueError) as info:
        Handoff.decode(blob, TEST_KEYS)
    assert "context_phase_params" in str(info.value)
    assert message in str(info.value)


# -- in-flight batching -----------------------------------------------------------------


def _steps(sink: RecordingSink) -> list[int]:
    return [c.step for c in sink.calls]


def test_batch_limit_makes_the_third_request_wait() -> None:
    """max_batch_size=2: the third request starts only in the step after a running one finished."""

    async def body() -> None:
        core = new_core(max_batch_size=2)
        log: list[Call] = []
        a = await submit(core, request(PROMPT, rid="a", max_tokens=3, streaming=True), log)
        b = await submit(core, request(OTHER_PROMPT, rid="b", max_tokens=12, streaming=True), log)
        c = await submit(core, request(PROMPT, rid="c", max_tokens=3, streaming=True), log)
        for s in (a, b, c):
            await s.done.wait()
            s.assert_well_formed()
        assert _steps(a)[0] == _steps(b)[0] == 1
        assert _steps(c)[0] == _steps(a)[-1] + 1, "c takes a's slot in the step after a finished"
        assert _steps(c)[0] <= _steps(b)[-1], "c runs alongside b, which is still decoding"
        for step in range(1, core.steps + 1):
            busy = {s.request_id for s in (a, b, c) if _steps(s)[0] <= step <= _steps(s)[-1]}
            assert len(busy) <= 2, f"step {step} ran {sorted(busy)}"
        assert [x.request_id for x in log if x.final].index("c") < [x.request_id for x in log if x.final].index("b")

    run(body)


def test_request_submitted_while_another_runs_joins_between_steps() -> None:
    """A short request submitted mid-way through a long one finishes first (it joined, not queued behind)."""

    async def body() -> None:
        core = new_core()
        log: list[Call] = []
        long = await submit(core, request(PROMPT, rid="long", max_tokens=40, streaming=True), log)
        await long.first.wait()
        short = await submit(core, request(OTHER_PROMPT, rid="short", max_tokens=2, streaming=True), log)
        await long.done.wait()
        await short.done.wait()
        order = [(c.request_id, c.final) for c in log]
        assert order.index(("short", False)) < order.index(("long", True))
        assert order.index(("short", True)) < order.index(("long", True))
        assert _steps(short)[0] > _steps(long)[0]
        assert core.active == 0

    run(body)


def test_each_step_emits_one_token_per_sequence() -> None:
    """A streaming sequence gets one token per step: N tokens take N steps, one output each."""

    async def body() -> None:
        core = new_core()
        sink = await complete(core, request(PROMPT, max_tokens=5, streaming=True))
        assert [len(o.tokens) for o in sink.outputs] == [1] * 5
        assert _steps(sink) == [1, 2, 3, 4, 5]
        assert core.steps == 5

    run(body)


def test_step_token_budget_counts_running_sequences() -> None:
    """max_num_tokens bounds decode tokens plus admitted prompt tokens in a step (the prompt fits the budget alone)."""

    async def body() -> None:
        core = new_core(max_num_tokens=10)
        a = await submit(core, request((5, 6), rid="a", max_tokens=8, streaming=True))
        b = await submit(core, request(tuple(range(10, 20)), rid="b", max_tokens=3, streaming=True))
        await a.done.wait()
        await b.done.wait()
        sinks = {"a": (a, 2), "b": (b, 10)}
        for step in range(1, core.steps + 1):
            tokens = 0
            for sink, prompt_len in sinks.values():
                first, last = _steps(sink)[0], _steps(sink)[-1]
                if step == first:
                    tokens += prompt_len
                elif first < step <= last:
                    tokens += 1
            assert tokens <= 10, f"step {step} processed {tokens} tokens, max_num_tokens=10"

    run(body)


# -- stopping ---------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_stops_at_max_tokens(streaming: bool) -> None:
    """Exactly max_tokens tokens are produced (no end id, no stop words)."""

    async def body() -> None:
        core = new_core()
        for n in (1, 2, 7, 30):
            sink = await complete(core, request(PROMPT, max_tokens=n, streaming=streaming))
            assert len(sink.tokens) == n

    run(body)


@pytest.mark.parametrize("streaming", [False, True])
def test_end_id_stops_and_is_excluded(streaming: bool) -> None:
    """With end_id set to a token the model generates at index k, the output is the first k tokens."""

    async def body() -> None:
        core = new_core()
        checked = 0
        for ids in _prompts(12):
            free = await generate(core, request(ids, max_tokens=30))
            for k in range(1, len(free)):
                if free[k] in free[:k]:
                    continue
                sink = await complete(core, request(ids, max_tokens=30, end_id=free[k], streaming=streaming))
                assert sink.tokens == free[:k]
                assert free[k] not in sink.tokens
                checked += 1
        assert checked > 20

    run(body)


def test_end_id_as_first_token_ends_context_phase_without_handoff() -> None:
    """A context phase whose first token is end_id returns no tokens and no handoff."""

    async def body() -> None:
        core = new_core()
        first = (await generate(core, request(PROMPT, max_tokens=1)))[0]
        sink = await complete(core, request(PROMPT, request_type=RequestType.CONTEXT_ONLY, end_id=first))
        (out,) = sink.outputs
        assert out.tokens == () and out.context_phase_params is None
        agg = await complete(core, request(PROMPT, end_id=first))
        assert agg.tokens == ()

    run(body)


def _first_stop(tokens: Sequence[int], word: tuple[int, ...]) -> tuple[int, ...]:
    """The shortest prefix of `tokens` that ends with `word`."""
    for end in range(len(word), len(tokens) + 1):
        if tuple(tokens[end - len(word) : end]) == word:
            return tuple(tokens[:end])
    raise AssertionError("word not generated")


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("request_type", [RequestType.AGGREGATE, RequestType.GENERATION_ONLY])
def test_stop_word_ends_output_with_the_word(streaming: bool, request_type: RequestType) -> None:
    """A stop word (1 or 2 tokens) ends the output right after its first occurrence in the generated tokens."""

    async def body() -> None:
        agg, ctx = new_core("agg"), new_core("ctx")
        for ids in _prompts(8):
            free = await generate(agg, request(ids, max_tokens=30))
            for word in {free[3:4], free[5:7], free[0:1], free[10:12]}:
                expected = _first_stop(free, word)
                req = request(
                    ids, max_tokens=30, stop_words=(word, (10**6,)), streaming=streaming, request_type=request_type
                )
                if request_type is RequestType.GENERATION_ONLY:
                    if len(expected) == 1:
                        continue  # the context phase finishes it: there is no handoff
                    _, blob = await context_blob(ctx, req)
                    req = replace(req, context_phase_params=blob)
                sink = await complete(agg, req)
                assert sink.tokens == expected
                assert sink.tokens[-len(word) :] == word

    run(body)


def test_context_phase_finishes_on_one_token_stop_word_and_max_tokens_1() -> None:
    """A context phase whose first token completes the request sends no handoff."""

    async def body() -> None:
        core = new_core()
        first = (await generate(core, request(PROMPT, max_tokens=1)))[0]
        for req in (
            request(PROMPT, request_type=RequestType.CONTEXT_ONLY, max_tokens=1),
            request(PROMPT, request_type=RequestType.CONTEXT_ONLY, stop_words=((first,),)),
        ):
            (out,) = (await complete(core, req)).outputs
            assert out.tokens == (first,) and out.context_phase_params is None

    run(body)


def test_prompt_longer_than_max_input_len_is_rejected() -> None:
    """A prompt above max_input_len raises InvalidInput at submit; at the limit it is served."""

    async def body() -> None:
        core = new_core(max_input_len=8)
        sink = RecordingSink(core)
        with pytest.raises(InvalidInput, match="max_input_len=8"):
            core.submit(request(tuple(range(10, 19))), sink)
        assert core.active == 0 and sink.calls == [] and core.steps == 0
        assert len(await generate(core, request(tuple(range(10, 18)), max_tokens=3))) == 3

    run(body)


# -- determinism ------------------------------------------------------------------------


def test_same_prompt_and_sampling_give_same_tokens() -> None:
    """Generation is a function of prompt and sampling settings, on any engine instance."""

    async def body() -> None:
        one, two = new_core("one"), new_core("two")
        for ids in _prompts(10):
            for sampling in SAMPLING_SETS:
                a = await generate(one, request(ids, max_tokens=20, sampling=sampling))
                b = await generate(two, request(ids, max_tokens=20, sampling=sampling))
                c = await generate(one, request(ids, max_tokens=20, sampling=sampling))
                assert a == b == c

    run(body)


def test_different_seeds_can_give_different_tokens() -> None:
    """With temperature > 0 and top_k > 1, varying the seed changes the output for some seeds."""

    async def body() -> None:
        core = new_core()
        for ids in (PROMPT, OTHER_PROMPT):
            outputs = {
                await generate(
                    core, request(ids, max_tokens=30, sampling=SamplingParams(temperature=0.9, top_k=20, seed=seed))
                )
                for seed in range(8)
            }
            assert len(outputs) >= 2
            greedy = {
                await generate(core, request(ids, max_tokens=30, sampling=SamplingParams(top_k=1, seed=seed)))
                for seed in range(8)
            }
            assert len(greedy) == 1, "top_k=1 is greedy whatever the seed"

    run(body)
