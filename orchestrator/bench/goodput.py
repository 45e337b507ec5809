"""SLA goodput: how many requests per second meet every service-level objective.

Throughput counts every finished request, however slow; a deployment can raise it by
queueing harder while each user waits longer. Goodput counts only the requests a user
would accept, so it is the figure to compare deployments by under latency targets (as in
DistServe and vLLM's `--goodput`).

Definitions (bounds in milliseconds, timings from `RequestResult`, in seconds):

- TTFT: send -> first token (`ttft_s`). A request that got no token fails a TTFT bound.
- TPOT (time per output token): the decode time per token after the first,
  (e2e - ttft) / (output_tokens - 1). Undefined for fewer than two tokens, so such a
  request meets a TPOT bound vacuously.
- ITL: every inter-token gap of the request must be within the bound (its max gap; TPOT
  is their mean). Vacuous for fewer than two tokens, as TPOT.
- E2E: send -> final response (`e2e_s`).
- A request meets an `Slo` when it ended without error and is within every bound given
  (equal to a bound is within it). Goodput = requests meeting it / the level's duration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

from orchestrator.bench.stats import RequestResult

_FORMAT = "KEY:VALUE, VALUE a bound in milliseconds > 0, e.g. ttft_ms:2000"


@dataclass(frozen=True, slots=True)
class Slo:
    """Service-level objectives a request must meet to count toward goodput (None: no bound)."""

    ttft_ms: float | None = None  # time to first token
    tpot_ms: float | None = None  # time per output token after the first: (e2e - ttft) / (output_tokens - 1)
    itl_ms: float | None = None  # every inter-token gap of the request (its max) within this
    e2e_ms: float | None = None  # whole request

    def __post_init__(self) -> None:
        for key, value in self._bounds():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"SLO {key} must be a finite number of milliseconds > 0, got {value!r}")

    @classmethod
    def parse(cls, items: Sequence[str]) -> Slo:
        """["ttft_ms:2000", "tpot_ms:25"] -> Slo(ttft_ms=2000, tpot_ms=25); each bound at most once."""
        valid = f"(valid keys: {', '.join(_keys())}; each item {_FORMAT})"
        if not items:
            raise ValueError(f"no SLO given: name at least one bound {valid}")
        bounds: dict[str, float] = {}
        for item in items:
            key, colon, text = item.partition(":")
            key = key.strip()
            if not colon:
                raise ValueError(f"SLO item {item!r} is not KEY:VALUE {valid}")
            if key not in _keys():
                raise ValueError(f"SLO item {item!r}: unknown key {key!r} {valid}")
            if key in bounds:
                raise ValueError(f"SLO item {item!r}: {key} is given twice; keep one {valid}")
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"SLO item {item!r}: {text!r} is not a number {valid}") from None
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"SLO item {item!r}: the bound must be > 0 milliseconds {valid}")
            bounds[key] = value
        return cls(**bounds)

    def _bounds(self) -> list[tuple[str, float]]:
        """(key, bound in ms) of every bound given, in field order."""
        named = ((key, getattr(self, key)) for key in _keys())
        return [(key, value) for key, value in named if value is not None]

    def meets(self, result: RequestResult) -> bool:
        """Whether `result` ended ok and is within every bound (a bound itself is within)."""
        if not result.ok:
            return False
        if self.ttft_ms is not None and (result.ttft_s is None or result.ttft_s > self.ttft_ms / 1000):
            return False
        if self.e2e_ms is not None and result.e2e_s > self.e2e_ms / 1000:
            return False
        if result.output_tokens < 2:
            return True  # no TPOT and no gap: those bounds hold vacuously
        if self.tpot_ms is not None:
            tpot = tpot_s(result)
            if tpot is None or tpot > self.tpot_ms / 1000:
                return False
        return self.itl_ms is None or max(result.itl_s, default=0.0) <= self.itl_ms / 1000

    def describe(self) -> str:
        """The bounds as `parse` reads them, space-separated: "ttft_ms:2000 tpot_ms:25"."""
        return " ".join(f"{key}:{_number(value)}" for key, value in self._bounds())

    @property
    def empty(self) -> bool:
        return not self._bounds()


def _keys() -> tuple[str, ...]:
    return tuple(f.name for f in fields(Slo))


def _number(value: float) -> str:
    """2000.0 -> "2000", 12.5 -> "12.5"; exact, so `describe` round-trips through `parse`."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def tpot_s(result: RequestResult) -> float | None:
    """(e2e - ttft) / (output_tokens - 1) in seconds; None with no first token or fewer than two tokens."""
    if result.ttft_s is None or result.output_tokens < 2:
        return None
    return (result.e2e_s - result.ttft_s) / (result.output_tokens - 1)


def goodput(results: Sequence[RequestResult], duration_s: float, slo: Slo) -> float:
    """Requests/s meeting every bound of `slo`, over `duration_s` of wall time."""
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    return sum(1 for r in results if slo.meets(r)) / duration_s
