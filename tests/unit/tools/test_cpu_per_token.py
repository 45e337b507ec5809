"""orchestrator/tools/cpu_per_token.py: CPU time read from /proc for real processes, and one small
measurement against a real tritonserver (every process of the token path is named)."""

from __future__ import annotations

import os
import time

from orchestrator.tools.cpu_per_token import cpu_seconds, format_table, measure
from orchestrator.tools.launch import DEFAULT_REPOSITORY


def test_cpu_seconds_of_a_process_grow_while_it_works() -> None:
    before = cpu_seconds(os.getpid())
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    assert cpu_seconds(os.getpid()) > before


def test_a_small_measurement_names_every_process_and_counts_generated_tokens() -> None:
    m = measure(DEFAULT_REPOSITORY, concurrency=4, isl=16, osl=8, count=12, warmup=4, time_limit_s=60, seed=3)
    assert m.requests_ok == 12 and m.errors == 0
    assert m.tokens == 12 * 8  # num_output_tokens, not responses (end_id=-1: exactly osl each)
    for name in ("tritonserver", "orchestrator", "postprocessing", "client (load generator)"):
        assert name in m.us_per_token, m.us_per_token
    assert m.server_us_per_token > 0 and m.tokens_per_s > 0
    assert "server total" in format_table([m])
