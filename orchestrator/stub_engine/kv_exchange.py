"""One engine's side of KV handoffs: the handoffs it issues and checks, the pulls it makes,
the transfer server that serves its own leases.

Why apart from the scheduler (`core.py`): this is everything that reaches other engines
(the deployment secret, permitted peers, sockets, shared memory). The engine asks it for
three things only: a checked handoff at intake (`intake.py`), a signed blob when a prefill
ends (`model_work.py`), and a lease's blocks when a pull is due (`pulls.py`).
"""

from __future__ import annotations

import numpy as np

from orchestrator.stub_engine.backing import BlockStore
from orchestrator.stub_engine.config import EngineConfig
from orchestrator.stub_engine.handoff import Handoff, check_handoff
from orchestrator.stub_engine.kv_auth import KeyRing, PeerHosts, PulledHandoffs
from orchestrator.stub_engine.leases import LeaseTable
from orchestrator.stub_engine.transfer import KVTransport, TransferServer, close_transport, host_id, make_transport
from orchestrator.wire.block_hash import prompt_digest
from orchestrator.wire.contract import EngineRequest


class KvExchange:
    """Issues, checks and pulls handoffs for engine `name`; serves its leases."""

    def __init__(
        self, name: str, config: EngineConfig, store: BlockStore, leases: LeaseTable,
        keys: KeyRing | None = None, transport: KVTransport | None = None, listen: bool = True,
    ) -> None:  # fmt: skip
        """`listen`: serve this engine's leases over the network (off in the simulator, whose
        in-process transport reads them straight from the engine)."""
        self.name, self.config, self.store = name, config, store
        self.listen = listen
        self.keys = keys or KeyRing.load(config.kv_secret_file, config.kv_secret_env)
        self.peers = PeerHosts(config.kv_peer_hosts, config.kv_transfer_host)
        self.pulled = PulledHandoffs()
        self.server = TransferServer(store, leases, self.keys, config.kv_transfer_host)
        self.transport = transport or make_transport(config.kv_transport, self.keys)
        self.host_id = host_id()

    async def start(self) -> None:
        if self.listen:
            await self.server.start()

    async def close(self) -> None:
        await self.server.close()
        close_transport(self.transport)

    def check(self, request: EngineRequest, now_ns: int) -> Handoff:
        """The request's handoff, verified before anything connects (handoff.check_handoff)."""
        return check_handoff(request, self.config.geometry, self.keys, self.peers, self.pulled, now_ns)

    def issue(self, request: EngineRequest, first_token: int, lease: int, now_ns: int) -> bytes:
        """The signed blob naming `lease` (which holds the prompt's blocks), valid as long as it."""
        return Handoff(
            request_id=request.request_id, source_engine=self.name, first_token=first_token,
            num_tokens=len(request.input_ids), prompt_digest=prompt_digest(request.input_ids), lease_id=lease,
            geometry=self.config.geometry, layout=self.config.layout, host=self.config.kv_transfer_host,
            port=self.server.port, host_id=self.host_id, shm_name=self.store.shm_name,
            expires_ns=now_ns + int(self.config.kv_lease_timeout_s * 1e9),
        ).encode(self.keys)  # fmt: skip

    async def pull(self, handoff: Handoff, first: int, count: int) -> np.ndarray:
        """`count` blocks of the handoff's lease from block `first`, in the source's layout."""
        return await self.transport.pull(handoff, first, count)

    def pulled_ok(self, handoff: Handoff, now_ns: int) -> None:
        """The handoff's KV arrived: the same blob again is a replay."""
        self.pulled.add(handoff.mac, handoff.expires_ns, now_ns)
