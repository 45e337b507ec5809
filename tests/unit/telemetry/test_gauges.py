"""StateGauges: each tick flushes the telemetry before it publishes the gauges, so a scrape
that shows work released also shows what was counted for it (the e2e tests diff on that).
pb_utils is stood in for by a recorder (it exists only inside the python backend stub)."""

from __future__ import annotations

from typing import Any

from orchestrator.telemetry.gauges import StateGauges


class _Pb:
    def __init__(self, events: list[str]) -> None:
        self.events = events
        pb = self

        class MetricFamily:
            GAUGE = "gauge"

            def __init__(self, name: str, description: str, kind: str) -> None:
                self.name = name

            def Metric(self, labels: dict[str, str]) -> Any:
                family = self

                class _Metric:
                    def set(self, value: float) -> None:
                        pb.events.append(f"set {family.name}={value:g}")

                return _Metric()

        self.MetricFamily = MetricFamily


def test_a_tick_flushes_before_it_publishes() -> None:
    events: list[str] = []
    state = {"active_requests": 1}
    gauges = StateGauges(
        _Pb(events), "disagg_engine", "context_0", lambda: dict(state), also=lambda: events.append("flush")
    )
    events.clear()
    state["active_requests"] = 0
    gauges.tick()
    assert events == ["flush", "set disagg_engine_active_requests=0"]
    gauges.stop()
    assert events[-1] == "flush"  # nothing changed: only the flush
