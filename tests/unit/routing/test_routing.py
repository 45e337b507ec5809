"""Routing without engines: policies (exact picks), circuit breaker, prefix index, router, config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.clients.endpoints import parse_endpoint
from orchestrator.routing.health import BreakerSettings, BreakerState, CircuitBreaker
from orchestrator.routing.policies import POLICIES, Candidate, PolicyOptions, RouteRequest, make_policy
from orchestrator.routing.prefix_index import PrefixIndex
from orchestrator.serving.config import OrchestratorConfig, Pools
from orchestrator.serving.router import Phase, Router
from orchestrator.wire.block_hash import block_hashes
from orchestrator.wire.errors import EngineUnavailable

REQ = RouteRequest("r", prompt_tokens=320, prompt_blocks=10, tokens_per_block=32)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def picks(policy_name: str, candidates: list[Candidate], n: int, **options: object) -> list[str]:
    policy = make_policy(policy_name, PolicyOptions(**options))  # type: ignore[arg-type]
    return [policy.select(candidates, REQ).engine for _ in range(n)]


# -- policies -------------------------------------------------------------------------------


def test_round_robin_cycles_in_order() -> None:
    assert picks("round_robin", [Candidate("a"), Candidate("b"), Candidate("c")], 7) == list("abcabca")


def test_least_loaded_picks_fewest_requests_and_rotates_ties() -> None:
    cands = [Candidate("a", in_flight=3), Candidate("b", in_flight=1), Candidate("c", in_flight=1)]
    assert picks("least_loaded", cands, 4) == ["b", "b", "c", "b"]  # rotation starts at a, b, c, a


def test_least_loaded_by_tokens() -> None:
    cands = [Candidate("a", in_flight=1, in_flight_tokens=5000), Candidate("b", in_flight=4, in_flight_tokens=400)]
    assert picks("least_loaded", cands, 1, load_metric="tokens") == ["b"]
    assert picks("least_loaded", cands, 1, load_metric="requests") == ["a"]


def test_kv_aware_prefers_cached_prefix_until_load_outweighs_it() -> None:
    # a holds 8 of the 10 prompt blocks: cost 2 + load; b holds none: cost 10 + load
    cached = [Candidate("a", cached_blocks=8, in_flight_tokens=32 * 5), Candidate("b")]
    assert picks("kv_aware", cached, 3) == ["a", "a", "a"]  # 2 + 5 = 7 < 10
    busy = [Candidate("a", cached_blocks=8, in_flight_tokens=32 * 9), Candidate("b")]
    assert picks("kv_aware", busy, 1) == ["b"]  # 2 + 9 = 11 > 10
    assert picks("kv_aware", busy, 1, kv_weight=2.0) == ["a"]  # 4 + 9 = 13 < 20
    policy = make_policy("kv_aware")
    assert policy.cost(busy[0], REQ) == 11.0


def test_power_of_two_is_exact_under_a_seed() -> None:
    cands = [
        Candidate("a", in_flight=5),
        Candidate("b", in_flight=0),
        Candidate("c", in_flight=2),
        Candidate("d", in_flight=9),
    ]
    first = picks("power_of_two", cands, 20, seed=7)
    assert first == picks("power_of_two", cands, 20, seed=7)
    assert "d" not in first  # d loses every pair it is drawn into
    assert picks("power_of_two", cands[:1], 3, seed=7) == ["a", "a", "a"]
    assert first != picks("power_of_two", cands, 20, seed=8)


def test_random_is_exact_under_a_seed() -> None:
    cands = [Candidate(n) for n in "abcd"]
    assert picks("random", cands, 12, seed=3) == picks("random", cands, 12, seed=3)
    assert set(picks("random", cands, 200, seed=3)) == set("abcd")


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_refuses_an_empty_pool(name: str) -> None:
    with pytest.raises(ValueError, match="no candidate"):
        make_policy(name).select([], REQ)


def test_unknown_policy_names_the_key_and_choices() -> None:
    with pytest.raises(ValueError, match=r"context_policy: unknown routing policy 'fastest'.*kv_aware"):
        make_policy("fastest", key="context_policy")


# -- circuit breaker ------------------------------------------------------------------------


def test_breaker_opens_backs_off_doubling_and_closes_on_success() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=2, backoff_s=1.0, backoff_max_s=3.0), clock)
    assert not breaker.failure() and breaker.available()  # one failure: below the threshold
    assert breaker.failure() and breaker.state is BreakerState.OPEN and not breaker.available()
    clock.now += 0.99
    assert not breaker.available()
    clock.now += 0.02
    assert breaker.state is BreakerState.HALF_OPEN and breaker.available()
    assert breaker.failure()  # the trial failed: open again for 2 s
    clock.now += 1.5
    assert not breaker.available()
    clock.now += 0.6
    assert breaker.failure()  # half-open trial failed again: 4 s capped at 3 s
    clock.now += 2.9
    assert not breaker.available()
    clock.now += 0.2
    breaker.success()
    assert breaker.state is BreakerState.CLOSED and breaker.consecutive_failures == 0 and breaker.trips == 3
    assert breaker.failure() is False  # threshold counts again from zero


# -- prefix index -----------------------------------------------------------------------------


def test_prefix_index_matches_leading_blocks_and_evicts_lru() -> None:
    a = block_hashes(list(range(128)), 32)  # 4 blocks
    b = block_hashes(list(range(64)) + [999] * 64, 32)  # shares the first 2 blocks with a
    index = PrefixIndex(capacity_blocks=6)
    assert index.match(a) == 0
    index.insert(a)
    assert index.match(a) == 4 and index.match(b) == 2
    index.insert(b)  # 2 new blocks: 6 in all
    assert len(index) == 6 and index.match(a) == 4
    index.insert(block_hashes([7] * 64, 32))  # 2 more: the 2 least recent go, a's tail
    assert index.match(a) == 2 and index.match(b) == 4  # the shared head was refreshed by b
    index.clear()
    assert index.match(a) == 0


def test_router_hashes_agree_with_the_engines() -> None:
    router = Router(OrchestratorConfig(("c0",), ("g0",), tokens_per_block=16, context_policy="kv_aware"))
    ids = list(range(100))
    route = router.request("r", ids, 8)
    assert route.hashes == tuple(block_hashes(ids, 16)) and route.prompt_blocks == 6


# -- router -------------------------------------------------------------------------------------


def make_router(clock: Clock | None = None, **overrides: object) -> Router:
    config = OrchestratorConfig(("c0", "c1"), ("g0", "g1"), **overrides)  # type: ignore[arg-type]
    return Router(config, clock or Clock())


def test_kv_aware_router_sends_a_shared_prefix_to_the_engine_that_holds_it() -> None:
    router = make_router(context_policy="kv_aware")
    prefix = list(range(1000, 1256))  # 8 blocks
    first = router.pick(Phase.CONTEXT, router.request("a", prefix + [1, 2, 3], 4))
    assert first.matched_blocks == 0
    for i in range(4):
        d = router.pick(Phase.CONTEXT, router.request(f"b{i}", prefix + [50 + i] * 40, 4))
        assert d.engine == first.engine and d.matched_blocks == 8 and d.prompt_blocks == 9
    other = router.pick(Phase.CONTEXT, router.request("c", list(range(5000, 5300)), 4))
    assert other.engine != first.engine  # a fresh prompt ties on cache: rotation spreads it
    assert router.log[-1] == other and "policy=kv_aware" in other.describe()


def test_failed_engine_is_skipped_until_its_backoff_ends() -> None:
    clock = Clock()
    router = make_router(clock, breaker_backoff_s=5.0)
    route = router.request("r", [1] * 40, 4)
    d = router.pick(Phase.CONTEXT, route)
    assert d.engine == "c0"
    router.failure(d)
    assert [router.pick(Phase.CONTEXT, route).engine for _ in range(4)] == ["c1"] * 4
    clock.now += 5.0
    assert {router.pick(Phase.CONTEXT, route).engine for _ in range(4)} == {"c0", "c1"}


def test_pick_excludes_tried_engines_and_falls_back_when_all_are_unhealthy() -> None:
    router = make_router()
    route = router.request("r", [1] * 40, 4)
    assert router.pick(Phase.GENERATION, route, exclude=["g0"], attempt=1).engine == "g1"
    assert router.retries["generation"] == 1
    with pytest.raises(EngineUnavailable, match=r"no generation engine is available \(tried: g0, g1\)"):
        router.pick(Phase.GENERATION, route, exclude=["g0", "g1"])
    for engine in ("g0", "g1"):
        router.failure(router.pick(Phase.GENERATION, route, exclude=[e for e in ("g0", "g1") if e != engine]))
    assert router.pick(Phase.GENERATION, route).engine in ("g0", "g1")  # all open: still try one


def test_track_counts_load_and_releases_it_on_error() -> None:
    router = make_router(generation_policy="least_loaded")
    route = router.request("r", [1] * 40, 4)
    d = router.pick(Phase.GENERATION, route)
    state = router.pools[Phase.GENERATION].get(d.engine)
    assert state is not None
    with pytest.raises(RuntimeError):
        with router.track(d, 44):
            assert (state.in_flight, state.in_flight_tokens) == (1, 44)
            assert router.pick(Phase.GENERATION, route).engine != d.engine  # least loaded avoids it
            raise RuntimeError("boom")
    assert (state.in_flight, state.in_flight_tokens) == (0, 0)


def test_conditional_disaggregation_reasons() -> None:
    router = make_router(local_prefill_max_tokens=64, context_queue_threshold=1)
    short = router.request("s", list(range(50)), 4)
    assert router.local_reason(router.pick(Phase.GENERATION, short), short) == "short_prompt"
    long = router.request("l", list(range(200)), 4)
    g = router.pick(Phase.GENERATION, long)
    assert router.local_reason(g, long) is None
    again = router.request("l2", list(range(200)) + [7] * 10, 4)  # 6 blocks cached on g -> 18 uncached
    g2 = router.pick(Phase.GENERATION, again, exclude=[e for e in ("g0", "g1") if e != g.engine])
    assert g2.matched_blocks == 6 and router.local_reason(g2, again) == "short_prompt"
    with router.track(router.pick(Phase.CONTEXT, long), 200), router.track(router.pick(Phase.CONTEXT, long), 200):
        assert router.local_reason(g, long) == "context_saturated"
    assert router.local_reason(g, long) is None


def test_membership_update_keeps_state_and_draining_engines_release_load() -> None:
    router = make_router()
    route = router.request("r", [1] * 40, 4)
    d = router.pick(Phase.CONTEXT, route)
    old = router.pools[Phase.CONTEXT].get(d.engine)
    assert old is not None
    with router.track(d, 40):
        changes = router.update_pools(Pools(("c1", "c2") if d.engine == "c0" else ("c0", "c2"), ("g0", "g1")))
        assert changes["context"][1] == [d.engine] and changes["context"][0] == ["c2"]
        assert not old.member and old.in_flight == 1
        assert d.engine not in {router.pick(Phase.CONTEXT, route).engine for _ in range(6)}
        router.failure(d)  # a failure on a removed engine touches nothing
    assert old.in_flight == 0


# -- config ---------------------------------------------------------------------------------------


def test_endpoints_parse_local_and_remote() -> None:
    assert parse_endpoint("context_0").url is None
    remote = parse_endpoint("grpc://10.0.0.7:8001/context_0")
    assert (remote.url, remote.model, remote.remote) == ("10.0.0.7:8001", "context_0", True)
    for bad in ("grpc://host/context_0", "grpc://h:99999/m", "http://h:1/m", "a b"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"context_engines": "c", "generation_engines": ""}, "generation_engines"),
        ({"generation_engines": "g"}, "'context_engines' is missing"),
        ({"context_engines": "c,c", "generation_engines": "g"}, "lists an engine twice"),
        ({"context_engines": "c", "generation_engines": "grpc://x/g"}, "generation_engines.*grpc://HOST:PORT/MODEL"),
        ({"context_engines": "c", "generation_engines": "g", "context_policy": "best"}, "context_policy"),
        ({"context_engines": "c", "generation_engines": "g", "kv_weight": "heavy"}, "'kv_weight' must be a float"),
        ({"context_engines": "c", "generation_engines": "g", "max_retries": "-1"}, "'max_retries' must be >= 0"),
        (
            {"context_engines": "c", "generation_engines": "g", "max_migrations": "-1"},
            "'max_migrations' must be >= 0, got -1",
        ),
        (
            {"context_engines": "c", "generation_engines": "g", "max_migrations": "once"},
            "'max_migrations' must be a int, got 'once'",
        ),
        ({"context_engines": "c", "generation_engines": "g", "load_metric": "gpu"}, "load_metric"),
        ({"context_engines": "c", "generation_engines": "g", "engine_timeout_s": "0"}, "engine_timeout_s"),
        (
            {"context_engines": "c", "generation_engines": "g", "next_reply_timeout_s": "-1"},
            "'next_reply_timeout_s' must be >= 0",
        ),
        ({"context_engines": "c", "generation_engines": "g", "tokens_per_block": "0"}, "tokens_per_block"),
        ({"context_engines": "c", "generation_engines": "g", "log_routing": "maybe"}, "log_routing"),
        ({"pool_file": "missing.json"}, "pool_file .*missing.json: cannot read"),
    ],
)
def test_config_errors_name_the_key(params: dict[str, str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        OrchestratorConfig.from_parameters(params, tmp_path)


def test_max_migrations_defaults_to_one_and_zero_turns_migration_off() -> None:
    assert OrchestratorConfig.from_parameters({"context_engines": "c", "generation_engines": "g"}).max_migrations == 1
    config = OrchestratorConfig.from_parameters(
        {"context_engines": "c", "generation_engines": "g", "max_migrations": "0"}
    )
    assert config.max_migrations == 0


def test_the_wait_for_a_next_reply_is_the_shorter_bound_and_zero_means_engine_timeout() -> None:
    base = {"context_engines": "c", "generation_engines": "g"}
    assert OrchestratorConfig.from_parameters(base).next_reply_s == 10
    assert OrchestratorConfig.from_parameters({**base, "engine_timeout_s": "4"}).next_reply_s == 4
    assert OrchestratorConfig.from_parameters({**base, "next_reply_timeout_s": "0"}).next_reply_s == 60


def test_config_reads_pools_from_a_pool_file(tmp_path: Path) -> None:
    (tmp_path / "pools.json").write_text(
        json.dumps({"context_engines": ["c0", "grpc://h:1/c1"], "generation_engines": ["g0"]})
    )
    config = OrchestratorConfig.from_parameters({"pool_file": "pools.json", "context_policy": "kv_aware"}, tmp_path)
    assert config.context_engines == ("c0", "grpc://h:1/c1") and config.generation_engines == ("g0",)
    assert config.pool_file == str(tmp_path / "pools.json") and config.context_policy == "kv_aware"
    (tmp_path / "bad.json").write_text('{"context_engines": ["c0"]}')
    with pytest.raises(ValueError, match="pool_file .*bad.json: 'generation_engines' must list"):
        OrchestratorConfig.from_parameters({"pool_file": "bad.json"}, tmp_path)


@pytest.mark.parametrize(
    ("settings", "predicts"),
    [
        ({"context_policy": "least_loaded", "generation_policy": "round_robin"}, False),
        ({"context_policy": "kv_aware", "generation_policy": "least_loaded"}, True),
        ({"context_policy": "least_loaded", "generation_policy": "least_loaded", "local_prefill_max_tokens": 64}, True),
    ],
)
def test_prompt_hashes_are_computed_only_when_something_reads_the_prefix_prediction(
    settings: dict[str, object], predicts: bool
) -> None:
    router = Router(OrchestratorConfig(("c0",), ("g0",), tokens_per_block=16, **settings))  # type: ignore[arg-type]
    route = router.request("r", list(range(100)), 8)
    assert router.predicts_cache is predicts
    assert route.hashes == (tuple(block_hashes(list(range(100)), 16)) if predicts else ())
    router.pick(Phase.GENERATION, route)
    assert len(router.pools[Phase.GENERATION].get("g0").index) == (6 if predicts else 0)  # type: ignore[union-attr]
