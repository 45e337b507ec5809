"""`disagg fidelity` end to end, tiny: a deployment file served on stub engines and simulated
side by side, slowed down, with goodput; both sides answer every request and the report
holds together. (The figures themselves are BENCHMARKS.md's: no timing is asserted here.)"""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.tools.fidelity import main

C1G1 = """
name: c1g1
pools:
  context: {engines: 1, tensor_parallel: 2}
  generation: {engines: 1}
"""


def test_fidelity_serves_and_simulates_the_same_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "c1g1.yaml").write_text(C1G1)
    out = tmp_path / "out"
    rc = main([str(tmp_path / "c1g1.yaml"), "--isl", "256", "--osl", "8", "--concurrency", "1,2", "--count", "6",
               "--slow-down", "2", "--goodput", "ttft_ms:60000", "tpot_ms:60000", "--out", str(out)])  # fmt: skip
    assert rc == 0
    doc = json.loads((out / "fidelity.json").read_text())
    rows = doc["rows"]
    assert doc["slow_down"] == 2.0 and [r["concurrency"] for r in rows] == [1, 2]
    for row in rows:
        assert row["errors_served"] == 0 and row["errors_simulated"] == 0
        for key in ("ttft_p50_served_s", "ttft_p50_simulated_s", "tpot_p50_served_s", "tpot_p50_simulated_s"):
            assert row[key] > 0, key
        assert row["goodput_served"] > 0 and row["goodput_simulated"] > 0  # generous SLOs: every request meets them
    assert "| c1g1 | 2 |" in capsys.readouterr().out
