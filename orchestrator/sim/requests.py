"""The requests a simulation sends: token ids drawn from a workload or read from a trace.

Why token ids and not text: prompts of thousands of tokens for thousands of requests
would spend the simulation's time in a tokenizer. Ids are drawn with numpy from a seeded
generator, distinct per request (no accidental prefix reuse) except for the workload's
shared prefix, which every prompt starts with (the engines' prefix cache and the
kv_aware router see it as they would in a served deployment).

Traces are JSON lines in the Mooncake trace format: `timestamp` (ms from the start),
`input_length`, `output_length`, and optionally `hash_ids`: one id per block of
`TRACE_BLOCK_TOKENS` prompt tokens; prompts that list the same leading ids share that
prefix (the same ids give the same tokens).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.bench.workload import Workload

VOCAB = (2, 32000)  # ids drawn from [2, 32000): never 0/1 (the symbolic engines' own token)
TRACE_BLOCK_TOKENS = 512  # Mooncake traces: one hash id per 512 prompt tokens


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One request: when it arrives (None: when a closed-loop user sends it), what it asks."""

    input_ids: np.ndarray  # int32 [1, isl]
    max_tokens: int
    arrival_s: float | None = None

    @property
    def input_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def _ids(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(*VOCAB, size=n, dtype=np.int32)


def from_workload(workload: Workload, count: int, salt: str = "") -> list[SimRequest]:
    """`count` requests of `workload` (ISL/OSL distributions, shared prefix, seed)."""
    lengths = random.Random(f"sim:{workload.seed}:{salt}")
    tokens = np.random.default_rng([workload.seed, len(salt), sum(salt.encode())])
    prefix = _ids(np.random.default_rng([workload.seed, 7]), workload.shared_prefix_tokens)
    floor = workload.shared_prefix_tokens + 1
    out = []
    for _ in range(count):
        isl = max(floor, workload.isl.sample(lengths))
        osl = max(1, workload.osl.sample(lengths))
        ids = np.concatenate([prefix, _ids(tokens, isl - len(prefix))])
        out.append(SimRequest(ids.reshape(1, -1), osl))
    return out


def from_trace(path: Path, limit: int | None = None, time_scale: float = 1.0) -> list[SimRequest]:
    """The trace's requests in order, arriving at their timestamps (x `time_scale`)."""
    out: list[SimRequest] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(out) >= limit:
                break
            out.append(_trace_request(line, number, f"{path}:{number}", time_scale))
    if not out:
        raise ValueError(f"{path}: the trace holds no request")
    return out


def _trace_request(line: str, number: int, where: str, time_scale: float) -> SimRequest:
    try:
        row = json.loads(line)
        stamp, isl, osl = float(row["timestamp"]), int(row["input_length"]), int(row["output_length"])
        hashes = [int(h) for h in row.get("hash_ids", [])]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{where}: a trace line needs timestamp (ms), input_length, output_length (and optional hash_ids): {exc!r}"
        ) from None
    if isl < 1 or osl < 1 or stamp < 0:
        raise ValueError(f"{where}: input_length and output_length must be >= 1 and timestamp >= 0")
    blocks = [_ids(np.random.default_rng([h, 11]), TRACE_BLOCK_TOKENS) for h in hashes]
    ids = np.concatenate([*blocks, np.zeros(0, np.int32)])[:isl]
    if len(ids) < isl:  # the part no hash id names is this request's own
        ids = np.concatenate([ids, _ids(np.random.default_rng([number, 13]), isl - len(ids))])
    return SimRequest(ids.reshape(1, -1), osl, arrival_s=stamp / 1e3 * time_scale)


def poisson_arrivals(requests: list[SimRequest], rate: float, seed: int = 0) -> list[SimRequest]:
    """The same requests arriving as a Poisson process of `rate` requests/s."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    rng = random.Random(f"arrivals:{seed}:{rate}")
    t, out = 0.0, []
    for r in requests:
        t += rng.expovariate(rate)
        out.append(SimRequest(r.input_ids, r.max_tokens, arrival_s=t))
    return out
