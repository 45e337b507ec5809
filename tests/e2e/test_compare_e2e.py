"""orchestrator/tools/compare.py end to end, tiny: two deployment files of 2 engines each are built,
served on free ports, swept and torn down; the phase sweeps run; JSON, CSV and a PNG come
out, with numbers that hold together."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import matplotlib.image

from orchestrator.bench.stats import read_csv
from orchestrator.tools.compare import main
from orchestrator.tools.launch import free_port

AGG = """
name: agg2
routing: {generation: {policy: round_robin}}
pools: {generation: {engines: 2}}
"""
DISAGG = """
name: c1g1
pools: {context: {engines: 1}, generation: {engines: 1}}
"""


def test_compare_writes_json_csv_and_png(tmp_path: Path) -> None:
    (tmp_path / "agg2.yaml").write_text(AGG)
    (tmp_path / "c1g1.yaml").write_text(DISAGG)
    out = tmp_path / "out"
    rc = main([str(tmp_path / "agg2.yaml"), str(tmp_path / "c1g1.yaml"), "--isl", "32", "--osl", "6",
               "--concurrency", "1,2", "--context-concurrency", "1,2", "--count", "4", "--out", str(out),
               "--goodput", "ttft_ms:60000", "tpot_ms:1000"])  # fmt: skip
    assert rc == 0
    report = json.loads((out / "compare.json").read_text())
    assert report["meta"]["command"].startswith("orchestrator/tools/compare.py ") and report["meta"]["date"]
    assert report["slo"] == "ttft_ms:60000 tpot_ms:1000"
    for name, shape in (("agg2", "agg2"), ("c1g1", "c1g1")):
        run = report["deployments"][name]
        assert run["shape"] == shape and run["engines"] == 2
        assert [(s["load"], s["ok"], s["errors"]) for s in run["summaries"]] == [(1, 4, 0), (2, 4, 0)]
        for s in run["summaries"]:
            assert s["mean_output_tokens"] == 6
            assert abs(s["output_tokens_per_s_per_engine"] * 2 - s["output_tokens_per_s"]) < 1e-6
            assert s["goodput_requests_per_s"] == s["requests_per_s"]  # generous bounds: every request meets
        assert run["goodput"]["slo"] == report["slo"]
        for level, s in zip(run["goodput"]["levels"], run["summaries"]):
            assert level["load"] == s["load"] and level["goodput_requests_per_s"] == s["goodput_requests_per_s"]
            assert level["goodput_requests_per_s_per_engine"] == s["goodput_requests_per_s"] / 2
        assert [s.load for s in read_csv(out / f"{name}.csv")] == [1, 2]
    matched = report["rate_matching"]
    assert [p["concurrency"] for p in matched["generation_points"]] == [1, 2]
    assert matched["context_requests_per_s"] > 0 and matched["osl"] == 6
    for p in matched["points"]:
        assert (
            p["context_engines"] + p["generation_engines"] <= 2
            and p["label"] == f"c{p['context_engines']}g{p['generation_engines']}"
        )
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (990, 660)
    assert matplotlib.image.imread(out / "compare.png").shape[:2] == (660, 990)


def test_unequal_engine_counts_are_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "agg2.yaml").write_text(AGG)
    (tmp_path / "big.yaml").write_text(DISAGG.replace("engines: 1}}", "engines: 2}}"))
    assert main([str(tmp_path / "agg2.yaml"), str(tmp_path / "big.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "engine counts differ" in capsys.readouterr().err
    assert free_port()  # nothing was started
