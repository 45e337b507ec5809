"""Benchmark workloads: prompt and output lengths, shared prefixes, exact token counts.

Pure logic (no Triton): the load generator (orchestrator/tools/loadgen.py) draws its requests from a
`Workload`; the same seed always gives the same prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterator

from orchestrator.text.tokenizer import WORDS

LENGTH_KINDS = ("fixed", "uniform", "normal")
_SPACED_WORDS = tuple(" " + w for w in WORDS)  # one token each (see orchestrator/text/tokenizer.py)


@dataclass(frozen=True, slots=True)
class LengthDist:
    """A token-count distribution: fixed `value`, uniform [low, high], or normal(mean, std)."""

    kind: str
    value: int = 0
    low: int = 0
    high: int = 0
    mean: float = 0.0
    std: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in LENGTH_KINDS:
            raise ValueError(f"length kind {self.kind!r} is unknown: use one of {list(LENGTH_KINDS)}")
        if self.kind == "fixed" and self.value < 1:
            raise ValueError(f"fixed length must be >= 1, got {self.value}")
        if self.kind == "uniform" and not 1 <= self.low <= self.high:
            raise ValueError(f"uniform lengths need 1 <= low <= high, got {self.low}:{self.high}")
        if self.kind == "normal" and (self.mean < 1 or self.std < 0):
            raise ValueError(f"normal lengths need mean >= 1 and std >= 0, got {self.mean}:{self.std}")

    @classmethod
    def parse(cls, text: str) -> "LengthDist":
        """`fixed:128` (or just `128`), `uniform:64:256`, `normal:512:64`."""
        parts = text.strip().split(":")
        try:
            if len(parts) == 1:
                return cls("fixed", value=int(parts[0]))
            if parts[0] == "fixed" and len(parts) == 2:
                return cls("fixed", value=int(parts[1]))
            if parts[0] == "uniform" and len(parts) == 3:
                return cls("uniform", low=int(parts[1]), high=int(parts[2]))
            if parts[0] == "normal" and len(parts) == 3:
                return cls("normal", mean=float(parts[1]), std=float(parts[2]))
        except ValueError as exc:
            raise ValueError(f"length {text!r}: {exc}") from None
        raise ValueError(f"length {text!r} is not one of fixed:N, uniform:LOW:HIGH, normal:MEAN:STD")

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return self.value
        if self.kind == "uniform":
            return rng.randint(self.low, self.high)
        return max(1, round(rng.gauss(self.mean, self.std)))

    @property
    def expected(self) -> float:
        """The mean length this distribution draws (rate matching uses the mean OSL)."""
        return {"fixed": float(self.value), "uniform": (self.low + self.high) / 2}.get(self.kind, self.mean)

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.value}"
        if self.kind == "uniform":
            return f"uniform:{self.low}:{self.high}"
        return f"normal:{self.mean:g}:{self.std:g}"


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request of a workload: what the generator sends."""

    prompt: str
    input_tokens: int
    max_tokens: int


def words_prompt(rng: random.Random, tokens: int) -> str:
    """`tokens` random leading-space words: exactly `tokens` built-in tokenizer tokens."""
    return "".join(rng.choice(_SPACED_WORDS) for _ in range(tokens))


@dataclass(frozen=True, slots=True)
class Workload:
    """Prompt and output lengths plus an optional prefix every prompt shares.

    A prompt is never shorter than the shared prefix plus one token of its own (the sampled
    length is raised to that), so every prompt has the prefix and prompts stay distinct.
    """

    isl: LengthDist
    osl: LengthDist
    shared_prefix_tokens: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shared_prefix_tokens < 0:
            raise ValueError(f"shared_prefix_tokens must be >= 0, got {self.shared_prefix_tokens}")

    def shared_prefix(self) -> str:
        return words_prompt(random.Random(f"prefix:{self.seed}"), self.shared_prefix_tokens)

    def requests(self, salt: str = "") -> Iterator[RequestSpec]:
        """The endless, deterministic sequence of requests for this seed and `salt`.

        Load levels use different salts: a prompt sent again would hit the engines' prefix
        cache and flatter TTFT. The shared prefix depends on the seed only.
        """
        rng = random.Random(f"requests:{self.seed}:{salt}")
        prefix = self.shared_prefix()
        floor = self.shared_prefix_tokens + 1 if self.shared_prefix_tokens else 1
        while True:
            isl = max(floor, self.isl.sample(rng))
            osl = self.osl.sample(rng)
            yield RequestSpec(prefix + words_prompt(rng, isl - self.shared_prefix_tokens), isl, osl)

    def describe(self) -> dict[str, Any]:
        return {
            "isl": self.isl.describe(),
            "osl": self.osl.describe(),
            "shared_prefix_tokens": self.shared_prefix_tokens,
            "seed": self.seed,
        }
