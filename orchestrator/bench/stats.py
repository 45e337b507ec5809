"""Benchmark statistics: per-request timings in, one summary per load level out.

The load generator (`orchestrator/tools/loadgen.py`) records each request as a `RequestResult`;
`summarize` turns one load level's results into a `Summary`; `write_json` / `write_csv`
store a sweep. Pure logic (no Triton), so every number here is tested on fixed inputs.

Definitions (all times in seconds, from the client's monotonic clock):

- TTFT: send -> the first response that carries at least one output token.
- ITL: the gap between consecutive token-carrying responses. A response carrying k > 1
  tokens contributes k equal gaps of gap / k, so a server that batches its stream output
  is not credited with k - 1 zero gaps. The first response's extra tokens contribute none:
  they have no previous response to measure from (TTFT covers them).
- E2E: send -> the final response.
- tokens/s/user: mean over ok requests of (output_tokens - 1) / (e2e - ttft), i.e.
  1 / TPOT as a streaming user feels it; requests with fewer than two tokens (or no time
  after the first) have no TPOT and are left out.
- per engine ("per GPU"): output tokens/s divided by every engine of the deployment,
  context and generation alike, so disaggregated and aggregated setups compare fairly.
- goodput: requests/s that met every bound of an SLO (`orchestrator/bench/goodput.py`);
  only when `summarize` is given one.

Percentiles use linear interpolation between closest ranks (numpy's default). Latency
percentiles and token means cover ok requests only; failed ones are counted in `errors`.
"""

from __future__ import annotations

import csv
import json
import math
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

if TYPE_CHECKING:  # goodput.py imports this module: a top-level import would be a cycle
    from orchestrator.bench.goodput import Slo


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (q in [0, 100]), interpolating linearly between closest ranks."""
    if not 0.0 <= q <= 100.0 or math.isnan(q):
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    if len(values) == 0:
        raise ValueError("percentile of no values: there is nothing to summarize")
    ordered = sorted(float(v) for v in values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    frac = pos - low
    return ordered[low] + (ordered[high] - ordered[low]) * frac


@dataclass(frozen=True, slots=True)
class RequestResult:
    """One request as the load generator saw it; joins the generator and `summarize`."""

    request_id: str
    start_s: float  # monotonic send time
    ttft_s: float | None  # None: no token arrived
    itl_s: tuple[float, ...]
    e2e_s: float
    input_tokens: int
    output_tokens: int
    error: str = ""  # "" when ok

    @property
    def ok(self) -> bool:
        return not self.error

    @classmethod
    def from_responses(
        cls,
        request_id: str,
        start_s: float,
        responses: Iterable[tuple[float, int]],
        end_s: float,
        input_tokens: int,
        error: str = "",
    ) -> "RequestResult":
        """Build the timings from (arrival time, tokens carried) per response, in order."""
        ttft: float | None = None
        last: float | None = None
        gaps: list[float] = []
        total = 0
        for arrived_s, tokens in responses:
            if tokens < 0:
                raise ValueError(f"a response cannot carry {tokens} tokens")
            if tokens == 0:
                continue  # an empty final response or a text-only delta: no token arrived
            if last is None:
                ttft = arrived_s - start_s
            else:
                gaps.extend([(arrived_s - last) / tokens] * tokens)
            last = arrived_s
            total += tokens
        return cls(request_id, start_s, ttft, tuple(gaps), end_s - start_s, input_tokens, total, error)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["itl_s"] = list(self.itl_s)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RequestResult":
        values = {f.name: data[f.name] for f in fields(cls)}
        values["itl_s"] = tuple(float(x) for x in values["itl_s"])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Summary:
    """One load level of a sweep; joins `summarize` and the reports (table, JSON, CSV)."""

    mode: str  # "concurrency" or "rate"
    load: float  # the concurrency or the request rate (requests/s)
    count: int
    ok: int
    errors: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    tokens_per_s_per_user: float | None
    engines: int
    output_tokens_per_s_per_engine: float
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    ttft_p99_s: float | None
    itl_p50_s: float | None
    itl_p90_s: float | None
    itl_p99_s: float | None
    e2e_p50_s: float | None
    e2e_p90_s: float | None
    e2e_p99_s: float | None
    mean_input_tokens: float | None
    mean_output_tokens: float | None
    # Added later, with defaults, so files written before them still read (missing -> default).
    goodput_requests_per_s: float | None = None  # None: no SLO was given
    slo: str = ""  # the SLO as `Slo.describe()` writes it; "" when none

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Summary":
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data or not _has_default(f.name)})


def _has_default(name: str) -> bool:
    """Whether a `Summary` field may be missing from a stored summary (it was added later)."""
    return Summary.__dataclass_fields__[name].default is not MISSING


MODES = ("concurrency", "rate")


def _pcts(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    if not values:
        return None, None, None
    return percentile(values, 50), percentile(values, 90), percentile(values, 99)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(
    results: Sequence[RequestResult], duration_s: float, engines: int, mode: str, load: float, slo: Slo | None = None
) -> Summary:
    """One load level's results -> its summary; rates are over `duration_s` of wall time.
    With an `slo` that has a bound, the goodput too (None or an empty one: no goodput)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is unknown: use one of {list(MODES)}")
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    if engines < 1:
        raise ValueError(f"engines must be >= 1 (every engine of the deployment), got {engines}")
    good = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in good)
    per_user = [
        (r.output_tokens - 1) / (r.e2e_s - r.ttft_s)
        for r in good
        if r.ttft_s is not None and r.output_tokens >= 2 and r.e2e_s > r.ttft_s
    ]
    ttft = _pcts([r.ttft_s for r in good if r.ttft_s is not None])
    itl = _pcts([gap for r in good for gap in r.itl_s])
    e2e = _pcts([r.e2e_s for r in good])
    tokens_per_s = out_tokens / duration_s
    return Summary(
        mode=mode,
        load=load,
        count=len(results),
        ok=len(good),
        errors=len(results) - len(good),
        duration_s=duration_s,
        requests_per_s=len(good) / duration_s,
        output_tokens_per_s=tokens_per_s,
        tokens_per_s_per_user=_mean(per_user),
        engines=engines,
        output_tokens_per_s_per_engine=tokens_per_s / engines,
        ttft_p50_s=ttft[0],
        ttft_p90_s=ttft[1],
        ttft_p99_s=ttft[2],
        itl_p50_s=itl[0],
        itl_p90_s=itl[1],
        itl_p99_s=itl[2],
        e2e_p50_s=e2e[0],
        e2e_p90_s=e2e[1],
        e2e_p99_s=e2e[2],
        mean_input_tokens=_mean([r.input_tokens for r in good]),
        mean_output_tokens=_mean([r.output_tokens for r in good]),
        goodput_requests_per_s=None if slo is None or slo.empty else _goodput(results, duration_s, slo),
        slo="" if slo is None else slo.describe(),
    )


def _goodput(results: Sequence[RequestResult], duration_s: float, slo: Slo) -> float:
    from orchestrator.bench.goodput import goodput  # at call time: goodput.py imports this module

    return goodput(results, duration_s, slo)


def load_key(load: float) -> str:
    """A load level as a JSON object key: 16 -> "16", 2.5 -> "2.5"."""
    return str(int(load)) if float(load).is_integer() else repr(float(load))


def write_json(
    path: str | Path,
    summaries: Sequence[Summary],
    results_by_load: Mapping[float, Sequence[RequestResult]],
    meta: Mapping[str, Any],
) -> None:
    """The whole sweep: `meta` (command, date, machine, commit: the caller gathers them),
    the summaries in order, and every request's timings keyed by `load_key(load)`."""
    doc = {
        "meta": dict(meta),
        "summaries": [s.as_dict() for s in summaries],
        "requests": {load_key(load): [r.as_dict() for r in rs] for load, rs in results_by_load.items()},
    }
    Path(path).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> tuple[list[Summary], dict[str, list[RequestResult]], dict[str, Any]]:
    """What `write_json` stored: (summaries, requests by load key, meta)."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    summaries = [Summary.from_dict(s) for s in doc["summaries"]]
    requests = {k: [RequestResult.from_dict(r) for r in rs] for k, rs in doc["requests"].items()}
    return summaries, requests, doc["meta"]


def write_csv(path: str | Path, summaries: Sequence[Summary]) -> None:
    """One row per summary, the field names as header; None is an empty cell."""
    names = [f.name for f in fields(Summary)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        for s in summaries:
            row = s.as_dict()
            writer.writerow(["" if row[n] is None else row[n] for n in names])


def _parse_cell(text: str, annotation: Any) -> Any:
    if text == "" and type(None) in typing.get_args(annotation):
        return None
    base = [t for t in typing.get_args(annotation) if t is not type(None)] or [annotation]
    kind = base[0]
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    return text


def read_csv(path: str | Path) -> list[Summary]:
    """What `write_csv` stored, with each field's type restored (floats round-trip exactly);
    a column added later and missing from an older file takes its default."""
    hints = typing.get_type_hints(Summary)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [
        Summary(
            **{name: _parse_cell(row[name], hints[name]) for name in hints if name in row or not _has_default(name)}
        )
        for row in rows
    ]
