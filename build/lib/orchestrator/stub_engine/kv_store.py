"""The engine's KV memory: one float32 array of blocks in the engine's layout.

With `shared=True` the array lives in a POSIX shared-memory segment (the stand-in for
GPU memory exported over CUDA IPC / NVLink), so a generation engine on the same host can
copy a context engine's blocks without a socket carrying the bytes. The creator unlinks
the segment on `close()`; readers attach by name (`attach`). A process that dies without
closing (a killed stub or server) leaves its segment behind: segment names carry the
creator's pid, and each new store first removes the segments of creators that are gone.
"""

from __future__ import annotations

import os
import re
import secrets
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import numpy as np

from orchestrator.stub_engine.kv_layout import DTYPE, Geometry, Layout

SHM_DIR = Path("/dev/shm")
_NAME = re.compile(r"^dkv_.*_(\d+)_[0-9a-f]{8}$")
_STRICT_NAME = re.compile(r"^dkv_[A-Za-z0-9_.-]{0,200}_[0-9]+_[0-9a-f]{8}\Z")


def is_store_name(name: str) -> bool:
    """Whether `name` is a segment name a KV store of ours would have (and nothing else:
    no path separators), so a peer cannot point an engine at another shared segment."""
    return _STRICT_NAME.match(name) is not None


def remove_orphans(shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink the KV segments whose creating process no longer exists; returns their names."""
    removed: list[str] = []
    try:
        names = [p.name for p in shm_dir.iterdir()]
    except OSError:
        return removed
    for name in names:
        match = _NAME.match(name)
        if match is None or Path(f"/proc/{match.group(1)}").exists():
            continue
        try:
            (shm_dir / name).unlink()
            removed.append(name)
        except OSError:
            pass  # another engine removed it first, or not ours to remove
    return removed


class KVStore:
    """Joins the model (which reads and writes token slots) to the bytes a transfer moves."""

    def __init__(
        self, geometry: Geometry, layout: Layout, num_blocks: int, shared: bool = False, label: str = "kv"
    ) -> None:
        layout.validate(geometry)
        self.geometry, self.layout, self.num_blocks = geometry, layout, num_blocks
        shape = layout.shape(geometry, num_blocks)
        self._shm: shared_memory.SharedMemory | None = None
        if shared:
            remove_orphans()
            nbytes = int(np.prod(shape)) * np.dtype(DTYPE).itemsize
            safe = "".join(c if c.isascii() and c.isalnum() else "_" for c in label)[:40]
            self._shm = shared_memory.SharedMemory(
                create=True, size=nbytes, name=f"dkv_{safe}_{os.getpid()}_{secrets.token_hex(4)}"
            )
            _CREATED.add(self._shm.name)
            self.array: np.ndarray = np.ndarray(shape, dtype=DTYPE, buffer=self._shm.buf)
            self.array.fill(0)
        else:
            self.array = np.zeros(shape, dtype=DTYPE)

    @property
    def shm_name(self) -> str:
        return self._shm.name if self._shm is not None else ""

    # -- token slots (the model's view, canonical [n, L, 2, H, D]) ---------------------------
    def write_slots(self, table: list[int], start: int, values: np.ndarray) -> None:
        """Write canonical per-token values for positions start.. through the block table."""
        g, t = self.geometry, self.geometry.tokens_per_block
        pos, i, n = start, 0, len(values)
        while i < n:
            block, off = table[pos // t], pos % t
            k = min(t - off, n - i)
            chunk = values[i : i + k]  # [k, L, 2, H, D]
            as_block = chunk.transpose(1, 2, 3, 0, 4)[None]  # [1, L, 2, H, k, D]
            self.array[:, block, :, :, :, off : off + k, :] = self.layout.scatter(g, as_block)[:, 0]
            pos, i = pos + k, i + k

    def read_slots(self, table: list[int], start: int, count: int) -> np.ndarray:
        """Canonical values [count, L, 2, H, D] of positions start..start+count."""
        g, t = self.geometry, self.geometry.tokens_per_block
        parts = []
        pos, end = start, start + count
        while pos < end:
            block, off = table[pos // t], pos % t
            k = min(t - off, end - pos)
            shards = self.array[:, block : block + 1, :, :, :, off : off + k, :]
            parts.append(self.layout.gather(g, shards)[0].transpose(3, 0, 1, 2, 4))  # [k, L, 2, H, D]
            pos += k
        if not parts:
            return np.zeros((0, g.layers, 2, g.heads, g.head_dim), dtype=DTYPE)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    # -- scattered slots (one per sequence: a decode step's batched view) ----------------------
    def write_at(self, blocks: np.ndarray, offsets: np.ndarray, values: np.ndarray) -> None:
        """Write canonical values [n, L, 2, H, D] to slot offsets[i] of block blocks[i]."""
        shards = self.layout.scatter(self.geometry, values[:, :, :, :, None, :])[:, :, :, :, :, 0, :]
        self.array[:, blocks, :, :, :, offsets, :] = shards.swapaxes(0, 1)  # advanced axes lead: [n, R, ...]

    def read_at(self, blocks: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Canonical values [n, L, 2, H, D] of slot offsets[i] of block blocks[i]."""
        shards = self.array[:, blocks, :, :, :, offsets, :].swapaxes(0, 1)[:, :, :, :, :, None, :]
        return self.layout.gather(self.geometry, shards)[:, :, :, :, 0, :]

    # -- whole blocks (a transfer's view, in this store's layout) ----------------------------
    def read_blocks(self, blocks: list[int]) -> np.ndarray:
        return self.array[:, blocks]

    def write_blocks(self, blocks: list[int], shards: np.ndarray) -> None:
        self.array[:, blocks] = shards

    def unlink(self) -> None:
        """Remove the segment's name (new attachers fail); the memory lives until unmapped."""
        if self._shm is not None:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass

    def close(self) -> None:
        if self._shm is not None:
            self.unlink()
            self.array = np.zeros((0,), dtype=DTYPE)
            try:
                self._shm.close()
            except BufferError:  # a view is still alive somewhere; the mapping goes with the process
                pass
            self._shm = None


_CREATED: set[str] = set()  # segments this process created (tests run several engines in one process)


def attach(name: str) -> shared_memory.SharedMemory:
    """Map another engine's store without adopting it: only its creator unlinks it."""
    shm = shared_memory.SharedMemory(name=name, create=False)
    if name in _CREATED:
        return shm
    try:  # Python < 3.13 registers attached segments too and would unlink them at exit
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    except Exception:
        pass
    return shm
