"""Routing policies: which engine of a pool serves one phase of a request.

A policy sees a snapshot of the eligible engines (`Candidate`: load and predicted cache
hits, taken by `orchestrator.serving.router`) and returns one of them. It keeps only its own
cursor or random generator; pool membership, load and health stay with the router.
Policies are built by name through `POLICIES`, so the config can say
`context_policy: kv_aware` and an unknown name fails at model load listing the choices.

- `round_robin`: each candidate in turn.
- `least_loaded`: fewest in-flight requests (or tokens, `load_metric=tokens`); ties in turn.
- `kv_aware`: lowest `kv_weight x prompt blocks not cached there + in-flight blocks there`
  (the load in the same unit, KV blocks); ties in turn.
- `power_of_two`: two distinct candidates drawn at random, the less loaded wins.
- `random`: one candidate drawn at random.

Random draws come from a `random.Random(seed)` per policy, so a seeded test asserts exact picks.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

LOAD_METRICS = ("requests", "tokens")


@dataclass(frozen=True, slots=True)
class Candidate:
    """What a policy knows of one eligible engine at decision time."""

    engine: str
    in_flight: int = 0  # requests of this phase running there (routed by us)
    in_flight_tokens: int = 0  # their prompt + max_tokens
    cached_blocks: int = 0  # leading prompt blocks predicted to be cached there


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What a policy knows of the request."""

    request_id: str
    prompt_tokens: int
    prompt_blocks: int  # full blocks of the prompt (the cacheable part)
    tokens_per_block: int = 32
    max_tokens: int = 0
    hashes: tuple[int, ...] = ()  # the prompt's block hashes (orchestrator.wire.block_hash)


@dataclass(frozen=True, slots=True)
class PolicyOptions:
    """Knobs shared by the policies; each uses the ones it needs."""

    seed: int = 0
    kv_weight: float = 1.0
    load_metric: str = "requests"

    def __post_init__(self) -> None:
        if self.load_metric not in LOAD_METRICS:
            raise ValueError(f"load_metric must be one of {list(LOAD_METRICS)}, got {self.load_metric!r}")
        if not self.kv_weight >= 0:
            raise ValueError(f"kv_weight must be >= 0, got {self.kv_weight}")


class RoutingPolicy(Protocol):
    name: str
    reads_cache: bool  # whether `select` looks at Candidate.cached_blocks (the router's prefix prediction)

    def select(self, candidates: Sequence[Candidate], request: RouteRequest) -> Candidate:
        """Pick one of a non-empty candidate list."""
        ...

    def cost(self, candidate: Candidate, request: RouteRequest) -> float | None:
        """The score it minimised for this candidate (None: the policy has no score)."""
        ...


def _load(candidate: Candidate, metric: str) -> int:
    return candidate.in_flight_tokens if metric == "tokens" else candidate.in_flight


class _Rotating:
    """Ties go to candidates in turn: equal engines share work instead of the first taking all."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def _lowest(self, candidates: Sequence[Candidate], key: Callable[[Candidate], float]) -> Candidate:
        if not candidates:
            raise ValueError("cannot route: no candidate engine")
        start = next(self._counter) % len(candidates)
        order = [candidates[(start + i) % len(candidates)] for i in range(len(candidates))]
        return min(order, key=key)  # min keeps the first of equals, i.e. the rotation's choice


class RoundRobin(_Rotating):
    name = "round_robin"
    reads_cache = False
    knobs: tuple[str, ...] = ()  # the PolicyOptions fields it reads

    def __init__(self, options: PolicyOptions = PolicyOptions()) -> None:
        super().__init__()

    def select(self, candidates: Sequence[Candidate], request: RouteRequest) -> Candidate:
        return self._lowest(candidates, key=lambda c: 0)

    def cost(self, candidate: Candidate, request: RouteRequest) -> float | None:
        return None


class LeastLoaded(_Rotating):
    name = "least_loaded"
    reads_cache = False
    knobs: tuple[str, ...] = ("load_metric",)  # the PolicyOptions fields it reads

    def __init__(self, options: PolicyOptions = PolicyOptions()) -> None:
        super().__init__()
        self.metric = options.load_metric

    def select(self, candidates: Sequence[Candidate], request: RouteRequest) -> Candidate:
        return self._lowest(candidates, key=lambda c: _load(c, self.metric))

    def cost(self, candidate: Candidate, request: RouteRequest) -> float | None:
        return float(_load(candidate, self.metric))


class KvAware(_Rotating):
    name = "kv_aware"
    reads_cache = True
    knobs: tuple[str, ...] = ("kv_weight",)  # the PolicyOptions fields it reads

    def __init__(self, options: PolicyOptions = PolicyOptions()) -> None:
        super().__init__()
        self.weight = options.kv_weight

    def cost(self, candidate: Candidate, request: RouteRequest) -> float:
        uncached = request.prompt_blocks - candidate.cached_blocks
        load_blocks = candidate.in_flight_tokens / request.tokens_per_block
        return self.weight * uncached + load_blocks

    def select(self, candidates: Sequence[Candidate], request: RouteRequest) -> Candidate:
        return self._lowest(candidates, key=lambda c: self.cost(c, request))


class PowerOfTwo:
    name = "power_of_two"
    reads_cache = False
    knobs: tuple[str, ...] = ("seed", "load_metric")  # the PolicyOptions fields it reads

    def __init__(self, options: PolicyOptions = PolicyOptions()) -> None:
        self.rng = random.Random(options.seed)
        self.metric = options.load_metric

    def select(self, candidates: Sequence[Candidate], request: RouteRequest) -> Candidate:
        if not candidates:
            raise ValueError("cannot route: no candidate engine")
        if len(candidates) == 1:
            return candidates[0]
        a, b = self.rng.sample(list(candidates), 2)
        return b if _load(b, self.metric) < _load(a, self.metric) else a

    def cost(self, candidate: Candidate, request: RouteRequest) -> float | None:
        return float(_load(candidate, self.metric))


class RandomPick:
    name = "random"
    reads_cache = False
    knobs: tuple[str, ...] = ("seed",)  # the PolicyOptions fields it reads

    def __init__(self, options: PolicyOptions = PolicyOptions()) -> None:
        self.rng = random.Random(options.seed)

    def select(self, candidates: Sequence[Candidate], request: RouteRequest) -> Candidate:
        if not candidates:
            raise ValueError("cannot route: no candidate engine")
        return candidates[self.rng.randrange(len(candidates))]

    def cost(self, candidate: Candidate, request: RouteRequest) -> float | None:
        return None


_CLASSES = (RoundRobin, LeastLoaded, KvAware, PowerOfTwo, RandomPick)
POLICIES: dict[str, Callable[[PolicyOptions], RoutingPolicy]] = {cls.name: cls for cls in _CLASSES}
# Which PolicyOptions knobs each policy reads: a deployment file may set only those.
POLICY_KNOBS: dict[str, tuple[str, ...]] = {cls.name: cls.knobs for cls in _CLASSES}


def make_policy(name: str, options: PolicyOptions = PolicyOptions(), key: str = "policy") -> RoutingPolicy:
    """Build a policy by name; the error names the config key and the valid choices."""
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"{key}: unknown routing policy {name!r}; choose one of {sorted(POLICIES)}")
    return factory(options)
