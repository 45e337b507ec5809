"""`context_phase_params`: what a context engine hands a generation engine.

The orchestrator forwards this blob unchanged and never parses it (TensorRT-LLM's blob is
likewise opaque and version-tied). Layout, little-endian:

    magic b"DKV1" | u16 len + request id (utf-8) | u16 len + source engine name |
    i32 first token | u32 len + model state | u32 crc32 of everything before

A forged, truncated or mismatched blob fails `decode` with a ValueError that says which
check failed, so a dropped or damaged handoff can never silently produce output.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

MAGIC = b"DKV1"


@dataclass(frozen=True, slots=True)
class Handoff:
    """Joins a context engine's finished prefill to the generation engine that continues it."""

    request_id: str
    source_engine: str
    first_token: int
    state: bytes

    def encode(self) -> bytes:
        rid = self.request_id.encode()
        src = self.source_engine.encode()
        body = b"".join((
            MAGIC,
            struct.pack("<H", len(rid)), rid,
            struct.pack("<H", len(src)), src,
            struct.pack("<iI", self.first_token, len(self.state)), self.state,
        ))  # fmt: skip
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def decode(cls, blob: bytes) -> "Handoff":
        if len(blob) < len(MAGIC) + 4 or blob[: len(MAGIC)] != MAGIC:
            raise ValueError("context_phase_params is not a handoff of this engine version (bad magic)")
        body, (crc,) = blob[:-4], struct.unpack("<I", blob[-4:])
        if zlib.crc32(body) != crc:
            raise ValueError("context_phase_params failed its checksum (truncated or altered)")
        try:
            pos = len(MAGIC)
            (n,) = struct.unpack_from("<H", body, pos)
            rid = body[pos + 2 : pos + 2 + n].decode()
            pos += 2 + n
            (n,) = struct.unpack_from("<H", body, pos)
            src = body[pos + 2 : pos + 2 + n].decode()
            pos += 2 + n
            first, n = struct.unpack_from("<iI", body, pos)
            pos += 8
            state = body[pos : pos + n]
            if len(state) != n or pos + n != len(body):
                raise ValueError("lengths do not add up")
        except (struct.error, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"context_phase_params is malformed: {exc}") from None
        return cls(request_id=rid, source_engine=src, first_token=first, state=state)
