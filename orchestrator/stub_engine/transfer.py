"""Moving KV blocks between engine processes: a pull protocol and pluggable transports.

The context engine runs a `TransferServer` (asyncio TCP, on its engine loop) that serves
its leases. A generation engine pulls with a `KVTransport`, chosen by its
`kv_transport` parameter, like TensorRT-LLM's pluggable UCX/NIXL/MPI backends:

- `tcp`: the blocks' bytes travel over the socket (works between hosts);
- `shm`: the socket only carries control messages; the bytes are copied straight out of
  the context engine's shared-memory KV store (one host, the stand-in for CUDA IPC);
- `auto` (default): `shm` when the handoff comes from this host, else `tcp`.

Protocol (little-endian), one pull per connection, authenticated both ways with the
deployment secret (`kv_auth.py`; M(label, ...) is an HMAC-SHA256 by one of its keys):

    server -> puller  b"KVC2" | 16-byte server nonce
    puller -> server  b"KVP2" | u64 lease id | u32 first block | u32 block count | u8 mode (0 tcp, 1 shm)
                      | 16-byte puller nonce | M("pull", server nonce, puller nonce, the request)
    server -> puller  u8 status (0 ok) | on error: u16 length + utf-8 message
                      ok: M("serve", puller nonce, server nonce, the request), then
                      tcp: u64 byte count + the blocks in the server's layout
                      shm: u16 length + segment name | u32 store blocks | u32 ids x count
    puller -> server  b"DONE" once the blocks are copied: the server releases the lease

A pull without a valid MAC is refused before any lease is looked at; a server that cannot
prove the secret gets nothing read or mapped. A shared-memory answer must name the very
segment the signed handoff names (and look like an engine's KV store), and its block ids
must lie inside that store, so no peer can make an engine map or read anything else.
A pull that breaks before DONE leaves the lease in place (a retry may succeed) until it
expires. Blocks arrive in the source's layout; the caller converts them (`kv_layout`).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from typing import Callable, Protocol

import numpy as np

from orchestrator.stub_engine.backing import BlockStore
from orchestrator.stub_engine.handoff import Handoff
from orchestrator.stub_engine.kv_auth import MAC_LEN, NONCE_LEN, KeyRing
from orchestrator.stub_engine.kv_layout import DTYPE
from orchestrator.stub_engine.kv_store import attach, is_store_name
from orchestrator.stub_engine.leases import LeaseTable
from orchestrator.wire.errors import KVCacheGone

_CHALLENGE = b"KVC2"
_REQUEST = struct.Struct("<4sQIIB")
_PULL_FRAME = _REQUEST.size + NONCE_LEN + MAC_LEN
_MAGIC = b"KVP2"
_DONE = b"DONE"
MAX_PULL_BLOCKS = 1 << 20  # no store is larger: a count beyond it is refused before any work
MODE_TCP, MODE_SHM = 0, 1
IO_TIMEOUT_S = 30.0  # one stalled peer must not hold a lease or a pull forever


def host_id() -> str:
    """Identifies this host (and boot), so `auto` uses shared memory only where it exists."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class TransferServer:
    """Serves one context engine's leases to pullers (see the module docstring)."""

    def __init__(self, store: BlockStore, leases: LeaseTable, keys: KeyRing, host: str = "127.0.0.1") -> None:
        self.store, self.leases, self.keys, self.host = store, leases, keys, host
        self.port = 0
        self.refused = 0  # pulls refused for a missing or wrong MAC (tests and logs read it)
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._handlers):
            task.cancel()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        lease = None
        done = False
        try:
            server_nonce = os.urandom(NONCE_LEN)
            writer.write(_CHALLENGE + server_nonce)
            await writer.drain()
            frame = await asyncio.wait_for(reader.readexactly(_PULL_FRAME), IO_TIMEOUT_S)
            fields, puller_nonce, mac = frame[: _REQUEST.size], frame[_REQUEST.size : -MAC_LEN], frame[-MAC_LEN:]
            if not self.keys.verify(mac, b"pull", server_nonce, puller_nonce, fields):
                self.refused += 1
                await _reply_error(
                    writer, "unauthenticated KV pull: the MAC does not verify with this deployment's secret"
                )
                return
            magic, lease_id, first, count, mode = _REQUEST.unpack(fields)
            if magic != _MAGIC or mode not in (MODE_TCP, MODE_SHM):
                await _reply_error(writer, "not a KV pull request of this version")
                return
            lease = self.leases.pin(lease_id)
            if lease is None:
                await _reply_error(writer, "no such lease: it expired, was already pulled, or is being pulled")
                return
            blocks = lease.alloc.blocks[first : first + count]
            if len(blocks) != count or count == 0:
                await _reply_error(
                    writer, f"blocks {first}..{first + count} are outside the lease's {len(lease.alloc.blocks)}"
                )
                return
            proof = self.keys.sign(b"serve", puller_nonce, server_nonce, fields)
            if mode == MODE_TCP:
                data = self.store.read_blocks(blocks).tobytes()
                writer.write(struct.pack("<B", 0) + proof + struct.pack("<Q", len(data)))
                writer.write(data)
            else:
                name = self.store.shm_name.encode()
                if not name:
                    await _reply_error(writer, "this engine's KV store is not in shared memory; use kv_transport tcp")
                    return
                writer.write(struct.pack("<B", 0) + proof + struct.pack("<H", len(name)) + name)
                writer.write(struct.pack(f"<II{count}I", self.store.num_blocks, count, *blocks))
            await writer.drain()
            done = await asyncio.wait_for(reader.readexactly(len(_DONE)), IO_TIMEOUT_S) == _DONE
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError, struct.error):
            pass  # the puller went away: the lease stays until a retry or its expiry
        finally:
            if lease is not None:
                self.leases.unpin(lease, done)
            writer.close()
            self._handlers.discard(task)


async def _reply_error(writer: asyncio.StreamWriter, message: str) -> None:
    raw = message.encode()
    writer.write(struct.pack("<BH", 1, len(raw)) + raw)
    await writer.drain()


class KVTransport(Protocol):
    """Pulls `count` blocks of a lease, starting at `first`, in the source's layout."""

    name: str

    async def pull(self, handoff: Handoff, first: int, count: int) -> np.ndarray: ...


class _PullBase:
    mode = MODE_TCP
    name = "base"

    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys

    async def pull(self, handoff: Handoff, first: int, count: int) -> np.ndarray:
        where = f"{handoff.host}:{handoff.port}"
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(handoff.host, handoff.port), IO_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError) as exc:
            raise KVCacheGone(
                f"cannot reach the KV transfer server of '{handoff.source_engine}' at {where}: {exc}"
            ) from None
        try:
            challenge = await asyncio.wait_for(reader.readexactly(len(_CHALLENGE) + NONCE_LEN), IO_TIMEOUT_S)
            if challenge[: len(_CHALLENGE)] != _CHALLENGE:
                raise KVCacheGone(f"{where} is not a KV transfer server of this version (bad challenge)")
            server_nonce, puller_nonce = challenge[len(_CHALLENGE) :], os.urandom(NONCE_LEN)
            fields = _REQUEST.pack(_MAGIC, handoff.lease_id, first, count, self.mode)
            writer.write(fields + puller_nonce + self.keys.sign(b"pull", server_nonce, puller_nonce, fields))
            await writer.drain()
            status = (await asyncio.wait_for(reader.readexactly(1), IO_TIMEOUT_S))[0]
            if status != 0:
                (n,) = struct.unpack("<H", await reader.readexactly(2))
                message = (await reader.readexactly(n)).decode(errors="replace")
                raise KVCacheGone(f"context engine '{handoff.source_engine}' refused the KV pull: {message}")
            proof = await asyncio.wait_for(reader.readexactly(MAC_LEN), IO_TIMEOUT_S)
            if not self.keys.verify(proof, b"serve", puller_nonce, server_nonce, fields):
                raise KVCacheGone(
                    f"the KV transfer server at {where} could not prove it holds this deployment's secret"
                )
            shards = await asyncio.wait_for(self._receive(handoff, reader, count), IO_TIMEOUT_S)
            writer.write(_DONE)
            await writer.drain()
            return shards
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError) as exc:
            raise KVCacheGone(f"KV pull from '{handoff.source_engine}' at {where} broke off: {exc!r}") from None
        finally:
            writer.close()

    async def _receive(self, handoff: Handoff, reader: asyncio.StreamReader, count: int) -> np.ndarray:
        raise NotImplementedError


class TcpTransport(_PullBase):
    """The blocks' bytes over the socket."""

    name = "tcp"
    mode = MODE_TCP

    async def _receive(self, handoff: Handoff, reader: asyncio.StreamReader, count: int) -> np.ndarray:
        (nbytes,) = struct.unpack("<Q", await reader.readexactly(8))
        shape = handoff.layout.shape(handoff.geometry, count)
        expected = int(np.prod(shape)) * np.dtype(DTYPE).itemsize
        if nbytes != expected:
            raise KVCacheGone(f"KV pull from '{handoff.source_engine}' announced {nbytes} bytes, expected {expected}")
        data = await reader.readexactly(nbytes)
        return np.frombuffer(data, dtype=DTYPE).reshape(shape)


class ShmTransport(_PullBase):
    """Control over the socket, bytes copied out of the source's shared-memory store."""

    name = "shm"
    mode = MODE_SHM

    def __init__(self, keys: KeyRing) -> None:
        super().__init__(keys)
        self._attached: dict[str, object] = {}

    async def _receive(self, handoff: Handoff, reader: asyncio.StreamReader, count: int) -> np.ndarray:
        (n,) = struct.unpack("<H", await reader.readexactly(2))
        name = (await reader.readexactly(n)).decode(errors="replace")
        total, got = struct.unpack("<II", await reader.readexactly(8))
        source = handoff.source_engine
        if name != handoff.shm_name or not is_store_name(name):
            raise KVCacheGone(
                f"the KV transfer server of '{source}' named segment {name!r}, not its own {handoff.shm_name!r}"
            )
        if got != count or not 0 < total <= MAX_PULL_BLOCKS:
            raise KVCacheGone(
                f"the KV transfer server of '{source}' answered {got} of {total} blocks for {count} asked"
            )
        ids = list(struct.unpack(f"<{got}I", await reader.readexactly(4 * got)))
        if max(ids) >= total:
            raise KVCacheGone(f"the KV transfer server of '{source}' named block {max(ids)} of a store of {total}")
        shm = self._attached.get(name)
        if shm is None:
            try:
                shm = attach(name)
            except (FileNotFoundError, OSError, ValueError) as exc:
                raise KVCacheGone(f"cannot map the KV store '{name}' of '{source}': {exc}") from None
            self._attached[name] = shm
        try:
            view: np.ndarray = np.ndarray(handoff.layout.shape(handoff.geometry, total), dtype=DTYPE, buffer=shm.buf)  # type: ignore[attr-defined]
        except TypeError as exc:  # the segment is smaller than the store it claims to be
            raise KVCacheGone(f"the KV store '{name}' of '{source}' does not hold {total} blocks: {exc}") from None
        return view[:, ids].copy()

    def close(self) -> None:
        for shm in self._attached.values():
            shm.close()  # type: ignore[attr-defined]
        self._attached.clear()


class AutoTransport:
    """`shm` for handoffs from this host, `tcp` otherwise."""

    name = "auto"

    def __init__(self, keys: KeyRing) -> None:
        self.local = host_id()
        self.tcp, self.shm = TcpTransport(keys), ShmTransport(keys)

    async def pull(self, handoff: Handoff, first: int, count: int) -> np.ndarray:
        same_host = handoff.host_id == self.local and handoff.shm_name
        return await (self.shm if same_host else self.tcp).pull(handoff, first, count)

    def close(self) -> None:
        self.shm.close()


TRANSPORTS: dict[str, Callable[[KeyRing], KVTransport]] = {
    "auto": AutoTransport,
    "tcp": TcpTransport,
    "shm": ShmTransport,
}


def make_transport(name: str, keys: KeyRing) -> KVTransport:
    try:
        return TRANSPORTS[name](keys)
    except KeyError:
        raise ValueError(f"engine parameter 'kv_transport' must be one of {sorted(TRANSPORTS)}, got {name!r}") from None


def close_transport(transport: KVTransport) -> None:
    close = getattr(transport, "close", None)
    if close is not None:
        close()


__all__ = [
    "AutoTransport",
    "KVTransport",
    "ShmTransport",
    "TcpTransport",
    "TransferServer",
    "host_id",
    "make_transport",
]
