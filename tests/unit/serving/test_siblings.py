"""Stop forwarding between orchestrator instances (orchestrator/serving/siblings.py), without Triton:
three instances' sockets in one process, on one event loop."""

from __future__ import annotations

import asyncio
import json
import os

from orchestrator.serving.siblings import Instances, SiblingStops


def args(instance: str, count: int = 3) -> dict[str, str]:
    config = {"instance_group": [{"count": count, "kind": "KIND_CPU"}]}
    return {"model_name": "orchestrator", "model_instance_name": instance, "model_config": json.dumps(config)}


def test_instances_are_named_after_the_server_the_model_and_triton_s_instance_names() -> None:
    found = Instances.of(args("orchestrator_0_1"), server_pid=42)
    assert found.own == "disagg-42-orchestrator-orchestrator_0_1"
    assert found.siblings == ("disagg-42-orchestrator-orchestrator_0_0", "disagg-42-orchestrator-orchestrator_0_2")
    assert Instances.of(args("orchestrator_0_0", count=1), server_pid=42).siblings == ()


def test_a_forwarded_stop_reaches_every_sibling_and_not_the_sender() -> None:
    pid = 10_000_000 + os.getpid()  # not a real server's pid: no clash with a running server's names

    async def main() -> dict[str, list[str]]:
        got: dict[str, list[str]] = {name: [] for name in ("orchestrator_0_0", "orchestrator_0_1", "orchestrator_0_2")}
        arrived = asyncio.Event()

        def receiver(name: str):
            def on_stop(request_id: str) -> None:
                got[name].append(request_id)
                if all(got[n] for n in ("orchestrator_0_1", "orchestrator_0_2")):
                    arrived.set()

            return on_stop

        nodes = [SiblingStops(Instances.of(args(name), server_pid=pid), receiver(name)) for name in got]
        try:
            for node in nodes:
                node.start()
            assert nodes[0].forward("req-7") == 2
            await asyncio.wait_for(arrived.wait(), 5)
        finally:
            for node in nodes:
                node.close()
        assert (nodes[0].forwarded, nodes[1].received, nodes[2].received) == (1, 1, 1)
        return got

    assert asyncio.run(main()) == {"orchestrator_0_0": [], "orchestrator_0_1": ["req-7"], "orchestrator_0_2": ["req-7"]}


def test_a_sibling_that_is_not_there_is_skipped() -> None:
    pid = 20_000_000 + os.getpid()
    node = SiblingStops(Instances.of(args("orchestrator_0_0", count=2), server_pid=pid), lambda rid: None)
    try:
        assert node.forward("req-1") == 0  # orchestrator_0_1 never bound its socket
    finally:
        node.close()


def test_a_single_instance_gets_no_sibling_stops_and_a_taken_name_is_reported() -> None:
    warned: list[str] = []
    assert SiblingStops.for_model(args("orchestrator_0_0", count=1), lambda rid: None, warned.append) is None
    pid_args = args("orchestrator_0_0", count=2)
    first = SiblingStops.for_model(pid_args, lambda rid: None, warned.append)
    try:
        assert first is not None and warned == []
        assert SiblingStops.for_model(pid_args, lambda rid: None, warned.append) is None  # same name, still bound
        assert len(warned) == 1 and "will not reach sibling instances" in warned[0]
    finally:
        assert first is not None
        first.close()
