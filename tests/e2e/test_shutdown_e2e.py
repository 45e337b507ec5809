"""A clean shutdown of a real tritonserver while the orchestrator probes engine readiness.

Found by stopping `./scripts/serve` with Ctrl-C: when a readiness probe over BLS
(`pb_utils.is_model_ready`) was in flight as the server shut down, Triton 2.51 aborted
(`boost::interprocess::lock_exception` while finalizing the orchestrator's stub; 7 of 7
stops). Probes of local engines now go over loopback gRPC. Here the orchestrator probes
every 10 ms, so a probe is in flight at almost any moment of the shutdown.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.tools.client import generate
from orchestrator.tools.launch import TritonServer
from orchestrator.tools.repository import FRONTEND_MODELS, ModelSpec, derive

ENGINES = ("context_0", "context_1", "generation_0", "generation_1")


def test_the_server_stops_cleanly_while_engines_are_being_probed(tmp_path: Path) -> None:
    models = {m: ModelSpec(m) for m in (*FRONTEND_MODELS, *ENGINES)}
    models["orchestrator"] = ModelSpec("orchestrator", {"health_check_s": "0.01"})
    server = TritonServer(model_repository=derive(tmp_path / "repository", models))
    with server:
        (only,) = generate(server.grpc_url, "the cat sat", 4, stream=False)
        assert only.final
        code = server.stop()
    log = server.log_text()
    assert "lock_exception" not in log and "Signal (6)" not in log, log[-3000:]
    assert code == 0
