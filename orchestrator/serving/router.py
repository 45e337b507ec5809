"""The router: pools + policies + health, and the record of every decision.

The pipeline asks it three things per request: which generation engine (`pick`), whether
to skip the context hop (`local_reason`, conditional disaggregation) and, if not, which
context engine. It reports back what happened (`track` while a phase runs, then
`success` / `failure`), which feeds the load counters the policies read and the circuit
breakers that keep failing engines out. Decisions are counted and kept in a short log;
`listeners` get each one (the Triton model logs them when `log_routing` is on).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Iterator, Sequence

from orchestrator.routing.policies import Candidate, RouteRequest, RoutingPolicy, make_policy
from orchestrator.routing.pool import EnginePool, EngineState
from orchestrator.serving.config import OrchestratorConfig, Pools
from orchestrator.wire.block_hash import block_hashes
from orchestrator.wire.errors import EngineUnavailable


class Phase(str, Enum):
    CONTEXT = "context"
    GENERATION = "generation"


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """One routing decision, as logged and counted."""

    request_id: str
    phase: Phase
    engine: str
    policy: str
    matched_blocks: int  # leading prompt blocks predicted cached on the engine
    prompt_blocks: int
    cost: float | None
    attempt: int  # 0 first try, then retries

    def describe(self) -> str:
        cost = "" if self.cost is None else f" cost={self.cost:g}"
        return (
            f"route request={self.request_id} phase={self.phase.value} engine={self.engine} policy={self.policy} "
            f"matched_blocks={self.matched_blocks}/{self.prompt_blocks}{cost} attempt={self.attempt}"
        )


class Router:
    def __init__(self, config: OrchestratorConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.tokens_per_block = config.tokens_per_block
        self.pools = {
            phase: EnginePool.of(phase.value, names, config.breaker, config.prefix_index_blocks, clock)
            for phase, names in ((Phase.CONTEXT, config.context_engines), (Phase.GENERATION, config.generation_engines))
        }
        options = config.policy_options
        self.policies: dict[Phase, RoutingPolicy] = {
            Phase.CONTEXT: make_policy(config.context_policy, options, "context_policy"),
            Phase.GENERATION: make_policy(config.generation_policy, options, "generation_policy"),
        }
        # Prompt block hashes feed the prefix prediction, which only kv_aware routing and the
        # short-prompt rule read; without them a long prompt's hashes are not worth computing.
        self.predicts_cache = config.local_prefill_max_tokens > 0 or any(p.reads_cache for p in self.policies.values())
        self.decisions: Counter[tuple[str, str]] = Counter()  # (phase, engine) -> decisions
        self.retries: Counter[str] = Counter()  # phase -> retried attempts
        self.local: Counter[str] = Counter()  # reason -> requests served without the context hop
        self.disaggregated = 0
        self.log: deque[RouteDecision] = deque(maxlen=1024)
        self.listeners: list[Callable[[RouteDecision], None]] = []

    # -- requests ----------------------------------------------------------------------
    def request(self, request_id: str, input_ids: Sequence[int], max_tokens: int) -> RouteRequest:
        """What routing needs of a request, block hashes included (computed once, and only when
        something reads the prefix prediction: `predicts_cache`)."""
        tpb = self.tokens_per_block
        return RouteRequest(
            request_id=request_id,
            prompt_tokens=len(input_ids),
            prompt_blocks=len(input_ids) // tpb,
            tokens_per_block=tpb,
            max_tokens=max_tokens,
            hashes=tuple(block_hashes(input_ids, tpb)) if self.predicts_cache else (),
        )

    def pick(self, phase: Phase, request: RouteRequest, exclude: Sequence[str] = (), attempt: int = 0) -> RouteDecision:
        """Choose an engine of `phase`'s pool, skipping `exclude` (engines that already failed it)."""
        pool = self.pools[phase]
        states = pool.eligible(exclude)
        if not states:
            tried = f" (tried: {', '.join(exclude)})" if exclude else ""
            raise EngineUnavailable(f"no {phase.value} engine is available{tried}; pool: {list(pool.names) or 'empty'}")
        candidates = [Candidate(s.name, s.in_flight, s.in_flight_tokens, s.index.match(request.hashes)) for s in states]
        policy = self.policies[phase]
        chosen = policy.select(candidates, request)
        state = pool.get(chosen.engine)
        assert state is not None
        state.routed += 1
        state.index.insert(request.hashes)  # it will hold this prompt's blocks (predicted)
        decision = RouteDecision(
            request_id=request.request_id, phase=phase, engine=chosen.engine, policy=policy.name,
            matched_blocks=chosen.cached_blocks, prompt_blocks=request.prompt_blocks,
            cost=policy.cost(chosen, request), attempt=attempt,
        )  # fmt: skip
        self.decisions[(phase.value, chosen.engine)] += 1
        if attempt:
            self.retries[phase.value] += 1
        self.log.append(decision)
        for listener in self.listeners:
            listener(decision)
        return decision

    def local_reason(self, generation: RouteDecision, request: RouteRequest) -> str | None:
        """Why this request should run both phases on its generation engine, or None to disaggregate."""
        cfg = self.config
        if not self.pools[Phase.CONTEXT].names:
            return "aggregated"  # no context pool: aggregated serving
        if cfg.local_prefill_max_tokens:
            uncached = request.prompt_tokens - generation.matched_blocks * self.tokens_per_block
            if uncached <= cfg.local_prefill_max_tokens:
                return "short_prompt"
        if cfg.context_queue_threshold:
            context = self.pools[Phase.CONTEXT].eligible()
            if context and all(s.in_flight >= cfg.context_queue_threshold for s in context):
                return "context_saturated"
        return None

    def count_path(self, local_reason: str | None) -> None:
        if local_reason is None:
            self.disaggregated += 1
        else:
            self.local[local_reason] += 1

    # -- outcomes ----------------------------------------------------------------------
    def _state(self, decision: RouteDecision) -> EngineState | None:
        return self.pools[decision.phase].get(decision.engine)

    @contextmanager
    def track(self, decision: RouteDecision, tokens: int) -> Iterator[None]:
        """Count a phase as in flight on its engine while the block runs (any exit releases it)."""
        state = self._state(decision)
        if state is None:  # removed between pick and start: nothing to count against
            yield
            return
        state.in_flight += 1
        state.in_flight_tokens += tokens
        try:
            yield
        finally:
            state.in_flight -= 1
            state.in_flight_tokens -= tokens

    def success(self, decision: RouteDecision) -> None:
        state = self._state(decision)
        if state is not None:
            state.breaker.success()

    def failure(self, decision: RouteDecision) -> None:
        """The engine failed a phase (its fault, not the client's): maybe mark it unhealthy."""
        state = self._state(decision)
        if state is None:
            return
        state.failures += 1
        if state.breaker.failure():
            state.index.clear()  # it may come back restarted, with an empty cache

    # -- membership and readiness ----------------------------------------------------------
    def update_pools(self, pools: Pools) -> dict[str, tuple[list[str], list[str]]]:
        """Apply a new membership; returns per phase the engines (added, removed)."""
        return {
            Phase.CONTEXT.value: self.pools[Phase.CONTEXT].update(pools.context_engines),
            Phase.GENERATION.value: self.pools[Phase.GENERATION].update(pools.generation_engines),
        }

    def pools_names(self, phase: str) -> tuple[str, ...]:
        return self.pools[Phase(phase)].names

    def engines(self) -> list[EngineState]:
        """Every member of every pool (an engine in both pools appears once)."""
        seen: dict[str, EngineState] = {}
        for pool in self.pools.values():
            for state in pool.members:
                seen.setdefault(state.name, state)
        return list(seen.values())

    def set_ready(self, name: str, ready: bool) -> None:
        """A readiness probe's answer; a not-ready engine is skipped like an unhealthy one."""
        for pool in self.pools.values():
            state = pool.get(name)
            if state is not None:
                if state.ready and not ready:
                    state.index.clear()
                elif ready and not state.ready:
                    state.breaker.success()  # back (reloaded): re-admitted without a backoff
                state.ready = ready
