"""Read the `disagg_*` state gauges from a tritonserver's Prometheus endpoint.

Engines and the orchestrator publish what they hold (requests, leases, KV blocks, child
requests; see orchestrator/telemetry/gauges.py) every 100 ms. `held()` lists the non-zero ones;
`wait_released()` waits, bounded, until none is left: the no-leak check of the tests and
the soak. Usage: `disagg metrics [--url 127.0.0.1:8002]` prints what is held.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import Callable, Sequence

import requests

from orchestrator.telemetry.gauges import HOLDING

_ANY = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(url: str, prefix: str = "disagg_") -> list[tuple[str, dict[str, str], float]]:
    """Every sample whose name starts with `prefix`: (name, labels, value)."""
    text = requests.get(f"http://{url}/metrics", timeout=10).text
    out = []
    for name, labels, value in _ANY.findall(text):
        if name.startswith(prefix):
            out.append((name, dict(_LABEL.findall(labels)), float(value)))
    return out


def total(scraped: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum of `name` over the samples whose labels include `labels` (a counter's or a
    histogram's `_count` across engines, say)."""
    want = set(labels.items())
    return sum(value for n, got, value in scraped if n == name and want <= set(got.items()))


def samples_until(
    url: str, ready: Callable[[list[tuple[str, dict[str, str], float]]], bool], timeout_s: float = 10.0
) -> list[tuple[str, dict[str, str], float]]:
    """Scrape until `ready(scrape)` (a model flushes its counters every 100 ms), bounded:
    returns the last scrape either way, for the caller's assertion to judge."""
    deadline = time.monotonic() + timeout_s
    while True:
        scraped = samples(url)
        if ready(scraped) or time.monotonic() > deadline:
            return scraped
        time.sleep(0.1)


def gauges(url: str, timeout_s: float = 10.0) -> dict[str, float]:
    """Every disagg gauge as `name{model}` -> value (url: HOST:PORT of the metrics endpoint);
    a model with several instances publishes one gauge per instance: they are summed."""
    text = requests.get(f"http://{url}/metrics", timeout=timeout_s).text
    out: dict[str, float] = {}
    for name, labels, value in _ANY.findall(text):
        got = dict(_LABEL.findall(labels))
        if not name.startswith("disagg_") or "model" not in got or set(got) - {"model", "instance"}:
            continue  # counters and histograms carry other labels
        key = f"{name}{{{got['model']}}}"
        out[key] = out.get(key, 0.0) + float(value)
    return out


def held(url: str) -> dict[str, float]:
    """The holding gauges that are not zero: something is in flight, or leaked."""
    return {key: value for key, value in gauges(url).items() if value and key.split("{")[0] in HOLDING}


def wait_released(url: str, timeout_s: float = 30.0, poll_s: float = 0.1) -> dict[str, float]:
    """Poll until nothing is held; returns what is still held when `timeout_s` runs out ({} = released)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = held(url)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(poll_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8002", help="HOST:PORT of tritonserver's metrics endpoint")
    args = parser.parse_args(argv)
    values = gauges(args.url)
    if not values:
        print("no disagg gauges found: is this our model repository?", file=sys.stderr)
        return 1
    for key, value in sorted(values.items()):
        print(f"{key} {value:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
