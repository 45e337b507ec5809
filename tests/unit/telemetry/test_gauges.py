"""StateGauges: each tick flushes the telemetry before it publishes the gauges, so a scrape
that shows work released also shows what was counted for it (the e2e tests diff on that).
pb_utils (which exists only inside the python backend stub) is stood in for by
tests/fake_pb_utils.py, whose `events` records each metric update in order."""

from __future__ import annotations

from orchestrator.telemetry.gauges import StateGauges
from tests.fake_pb_utils import FakePbUtils


def test_a_tick_flushes_before_it_publishes() -> None:
    pb = FakePbUtils()
    events = pb.events
    state = {"active_requests": 1}
    gauges = StateGauges(pb, "disagg_engine", "context_0", lambda: dict(state), also=lambda: events.append("flush"))
    events.clear()
    state["active_requests"] = 0
    gauges.tick()
    assert events == ["flush", "set disagg_engine_active_requests=0"]
    gauges.stop()
    assert events[-1] == "flush"  # nothing changed: only the flush
