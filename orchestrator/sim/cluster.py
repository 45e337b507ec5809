"""A deployment file built in one process: symbolic engines, orchestrators, in-process KV pulls.

`build` reads the same `Deployment` that `disagg deploy build` turns into model
repositories: every stub pool becomes that many `EngineCore`s with the pool's engine
parameters (cost model, batch and token limits, KV pool, tensor parallelism), every
orchestrator instance an `Orchestrator` with the deployment's routing and settings,
reaching the engines by the names the deployment gives them. Only three things differ
from a served deployment, each because it is I/O, not behaviour:

- engines are symbolic (no K/V bytes: `orchestrator.stub_engine.backing`);
- a generation engine pulls a lease straight from the context engine object
  (`LocalTransport`) and then waits out the modelled transfer time, as it does after a
  real pull; handoffs are still signed and checked, with a fixed simulator secret;
- readiness probes are off (no engine fails in a simulation).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from orchestrator.clients.engine_client import InProcessEngineClient
from orchestrator.ops.deployment import Deployment
from orchestrator.serving.config import OrchestratorConfig
from orchestrator.serving.pipeline import Orchestrator
from orchestrator.serving.router import Router
from orchestrator.sim.timing import TimingClient
from orchestrator.stub_engine.clock import EngineClock
from orchestrator.stub_engine.config import EngineConfig
from orchestrator.stub_engine.core import EngineCore
from orchestrator.stub_engine.handoff import Handoff
from orchestrator.stub_engine.kv_auth import KeyRing
from orchestrator.wire.errors import KVCacheGone

SIM_SECRET = KeyRing((b"the-simulator-signs-with-this-key-only",), "the simulator's fixed key")


class LocalTransport:
    """Pulls a lease's blocks from the engine object that holds it (engines of one process)."""

    name = "local"

    def __init__(self, engines: Mapping[str, EngineCore]) -> None:
        self.engines = engines

    async def pull(self, handoff: Handoff, first: int, count: int) -> np.ndarray:
        source = self.engines.get(handoff.source_engine)
        if source is None:
            raise KVCacheGone(f"no engine '{handoff.source_engine}' in this simulation")
        lease = source.leases.pin(handoff.lease_id)
        if lease is None:
            raise KVCacheGone(f"no such lease on '{handoff.source_engine}': it expired or was pulled")
        try:
            shards = source.store.read_blocks(lease.alloc.blocks[first : first + count])
        except BaseException:
            source.leases.unpin(lease, done=False)
            raise
        source.leases.unpin(lease, done=True)
        return shards


@dataclass
class SimCluster:
    """One deployment's engines and orchestrator instances, on the running (virtual-time) loop."""

    deployment: Deployment
    engines: dict[str, EngineCore]
    orchestrators: list[Orchestrator]
    timing: TimingClient

    @property
    def gpus(self) -> int:
        """GPUs the deployment occupies: every engine's tensor x pipeline parallel size."""
        return sum(pool.engines * pool.world_size for pool in self.deployment.pools)

    async def close(self) -> None:
        for orch in self.orchestrators:
            await orch.close()
        for engine in self.engines.values():
            await engine.close()

    def check_idle(self) -> None:
        """Nothing held anywhere: no request, lease or block (the no-leak check)."""
        for orch in self.orchestrators:
            assert not orch.in_flight, f"{len(orch.in_flight)} requests still in flight"
        for engine in self.engines.values():
            engine.check_idle()


def build(deployment: Deployment) -> SimCluster:
    """The deployment's engines and orchestrators on the running loop (stub pools only)."""
    real = [p.role for p in deployment.pools if p.kind != "stub"]
    if real:
        raise ValueError(
            f"pools.{real[0]}: the simulator runs stub engines only (kind: stub); a real engine's timing is "
            "its own: describe it with a stub pool whose cost model matches it"
        )
    loop = asyncio.get_running_loop()
    clock = EngineClock.of_loop(loop)
    engines: dict[str, EngineCore] = {}
    transport = LocalTransport(engines)
    endpoints: dict[str, EngineCore] = {}
    for pool in deployment.pools:
        engine_config = EngineConfig.from_parameters(pool.stub)
        for name in pool.names:
            engine = EngineCore(name, engine_config, transport=transport, clock=clock, keys=SIM_SECRET, symbolic=True)
            engines[name] = endpoints[deployment.endpoint(pool, name)] = engine
    params = {**deployment.orchestrator_parameters(), "health_check_s": "0"}
    config = OrchestratorConfig.from_parameters(params)
    timing = TimingClient(InProcessEngineClient(endpoints))
    orchestrators = [
        Orchestrator(config, timing, Router(config, clock=loop.time)) for _ in range(deployment.orchestrator_instances)
    ]
    return SimCluster(deployment, engines, orchestrators, timing)
