"""Moving KV blocks between engine processes: a pull protocol and pluggable transports.

The context engine runs a `TransferServer` (asyncio TCP, on its engine loop) that serves
its leases. A generation engine pulls with a `KVTransport`, chosen by its
`kv_transport` parameter, like TensorRT-LLM's pluggable UCX/NIXL/MPI backends:

- `tcp`: the blocks' bytes travel over the socket (works between hosts);
- `shm`: the socket only carries control messages; the bytes are copied straight out of
  the context engine's shared-memory KV store (one host, the stand-in for CUDA IPC);
- `auto` (default): `shm` when the handoff comes from this host, else `tcp`.

Protocol (little-endian), one pull per connection:

    puller -> server  b"KVP1" | u64 lease id | u32 first block | u32 block count | u8 mode (0 tcp, 1 shm)
    server -> puller  u8 status (0 ok) | on error: u16 length + utf-8 message
                      ok, tcp: u64 byte count + the blocks in the server's layout
                      ok, shm: u16 length + segment name | u32 store blocks | u32 ids x count
    puller -> server  b"DONE" once the blocks are copied: the server releases the lease

A pull that breaks before DONE leaves the lease in place (a retry may succeed) until it
expires. Blocks arrive in the source's layout; the caller converts them (`kv_layout`).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Callable, Protocol

import numpy as np

from orchestrator.engine.handoff import Handoff
from orchestrator.engine.kv_layout import DTYPE
from orchestrator.engine.kv_store import KVStore, attach
from orchestrator.engine.leases import LeaseTable
from orchestrator.errors import KVCacheGone

_REQUEST = struct.Struct("<4sQIIB")
_MAGIC = b"KVP1"
_DONE = b"DONE"
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

    def __init__(self, store: KVStore, leases: LeaseTable, host: str = "127.0.0.1") -> None:
        self.store, self.leases, self.host = store, leases, host
        self.port = 0
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
            magic, lease_id, first, count, mode = _REQUEST.unpack(await asyncio.wait_for(reader.readexactly(_REQUEST.size), IO_TIMEOUT_S))
            if magic != _MAGIC or mode not in (MODE_TCP, MODE_SHM):
                await _reply_error(writer, "not a KV pull request of this version")
                return
            lease = self.leases.pin(lease_id)
            if lease is None:
                await _reply_error(writer, "no such lease: it expired, was already pulled, or is being pulled")
                return
            blocks = lease.alloc.blocks[first : first + count]
            if len(blocks) != count or count == 0:
                await _reply_error(writer, f"blocks {first}..{first + count} are outside the lease's {len(lease.alloc.blocks)}")
                return
            if mode == MODE_TCP:
                data = self.store.read_blocks(blocks).tobytes()
                writer.write(struct.pack("<BQ", 0, len(data)))
                writer.write(data)
            else:
                name = self.store.shm_name.encode()
                if not name:
                    await _reply_error(writer, "this engine's KV store is not in shared memory; use kv_transport tcp")
                    return
                writer.write(struct.pack("<BH", 0, len(name)) + name)
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

    async def pull(self, handoff: Handoff, first: int, count: int) -> np.ndarray:
        where = f"{handoff.host}:{handoff.port}"
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(handoff.host, handoff.port), IO_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError) as exc:
            raise KVCacheGone(f"cannot reach the KV transfer server of '{handoff.source_engine}' at {where}: {exc}") from None
        try:
            writer.write(_REQUEST.pack(_MAGIC, handoff.lease_id, first, count, self.mode))
            await writer.drain()
            status = (await asyncio.wait_for(reader.readexactly(1), IO_TIMEOUT_S))[0]
            if status != 0:
                (n,) = struct.unpack("<H", await reader.readexactly(2))
                message = (await reader.readexactly(n)).decode(errors="replace")
                raise KVCacheGone(f"context engine '{handoff.source_engine}' refused the KV pull: {message}")
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

    def __init__(self) -> None:
        self._attached: dict[str, object] = {}

    async def _receive(self, handoff: Handoff, reader: asyncio.StreamReader, count: int) -> np.ndarray:
        (n,) = struct.unpack("<H", await reader.readexactly(2))
        name = (await reader.readexactly(n)).decode()
        total, got = struct.unpack("<II", await reader.readexactly(8))
        ids = list(struct.unpack(f"<{got}I", await reader.readexactly(4 * got)))
        shm = self._attached.get(name)
        if shm is None:
            try:
                shm = attach(name)
            except (FileNotFoundError, OSError) as exc:
                raise KVCacheGone(f"cannot map the KV store '{name}' of '{handoff.source_engine}': {exc}") from None
            self._attached[name] = shm
        view = np.ndarray(handoff.layout.shape(handoff.geometry, total), dtype=DTYPE, buffer=shm.buf)  # type: ignore[attr-defined]
        return view[:, ids].copy()

    def close(self) -> None:
        for shm in self._attached.values():
            shm.close()  # type: ignore[attr-defined]
        self._attached.clear()


class AutoTransport:
    """`shm` for handoffs from this host, `tcp` otherwise."""

    name = "auto"

    def __init__(self) -> None:
        self.local = host_id()
        self.tcp, self.shm = TcpTransport(), ShmTransport()

    async def pull(self, handoff: Handoff, first: int, count: int) -> np.ndarray:
        same_host = handoff.host_id == self.local and handoff.shm_name
        return await (self.shm if same_host else self.tcp).pull(handoff, first, count)

    def close(self) -> None:
        self.shm.close()


TRANSPORTS: dict[str, Callable[[], KVTransport]] = {"auto": AutoTransport, "tcp": TcpTransport, "shm": ShmTransport}


def make_transport(name: str) -> KVTransport:
    try:
        return TRANSPORTS[name]()
    except KeyError:
        raise ValueError(f"engine parameter 'kv_transport' must be one of {sorted(TRANSPORTS)}, got {name!r}") from None


def close_transport(transport: KVTransport) -> None:
    close = getattr(transport, "close", None)
    if close is not None:
        close()


__all__ = ["AutoTransport", "KVTransport", "ShmTransport", "TcpTransport", "TransferServer", "host_id", "make_transport"]
