"""`context_phase_params`: what a context engine hands a generation engine.

The orchestrator forwards this blob unchanged and never parses it (TensorRT-LLM's blob is
likewise opaque and version-tied). It does not carry the KV cache: it says where to pull
it from (the context engine's transfer server and the lease holding the blocks) and what
the blocks look like (model geometry, parallel layout). Layout, little-endian:

    magic b"DKV2"
    i32 first token | u32 prompt tokens | u64 prompt digest | u64 lease id
    u16 layers | u16 heads | u16 head_dim | u32 tokens_per_block | u16 tp | u16 pp | u16 port
    5 x (u16 length + utf-8): request id, source engine, host, host id, shm name
    u32 crc32 of everything before

A forged, truncated or mismatched blob fails `decode` with a ValueError that says which
check failed, so a damaged handoff can never silently produce output.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from orchestrator.contract import EngineRequest
from orchestrator.engine.block_hash import prompt_digest
from orchestrator.engine.kv_layout import Geometry, Layout
from orchestrator.errors import InvalidInput

MAGIC = b"DKV2"
_FIXED = struct.Struct("<iIQQHHHIHHH")
_STRINGS = ("request_id", "source_engine", "host", "host_id", "shm_name")


@dataclass(frozen=True, slots=True)
class Handoff:
    """Joins a context engine's finished prefill (a lease) to the generation engine that pulls it."""

    request_id: str
    source_engine: str
    first_token: int
    num_tokens: int
    prompt_digest: int
    lease_id: int
    geometry: Geometry
    layout: Layout
    host: str
    port: int
    host_id: str
    shm_name: str = ""

    def encode(self) -> bytes:
        g = self.geometry
        parts = [
            MAGIC,
            _FIXED.pack(
                self.first_token, self.num_tokens, self.prompt_digest, self.lease_id,
                g.layers, g.heads, g.head_dim, g.tokens_per_block, self.layout.tp, self.layout.pp, self.port,
            ),
        ]  # fmt: skip
        for name in _STRINGS:
            raw = getattr(self, name).encode()
            parts += [struct.pack("<H", len(raw)), raw]
        body = b"".join(parts)
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
            first, ntok, digest, lease, layers, heads, dim, tpb, tp, pp, port = _FIXED.unpack_from(body, pos)
            pos += _FIXED.size
            strings: dict[str, str] = {}
            for name in _STRINGS:
                (n,) = struct.unpack_from("<H", body, pos)
                raw = body[pos + 2 : pos + 2 + n]
                if len(raw) != n:
                    raise ValueError(f"{name} overruns the blob")
                strings[name] = raw.decode()
                pos += 2 + n
            if pos != len(body):
                raise ValueError("trailing bytes")
            geometry = Geometry(layers, heads, dim, tpb)
        except (struct.error, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"context_phase_params is malformed: {exc}") from None
        return cls(
            first_token=first, num_tokens=ntok, prompt_digest=digest, lease_id=lease, geometry=geometry,
            layout=Layout(tp, pp), port=port, **strings,
        )  # fmt: skip


def check_handoff(request: EngineRequest, geometry: Geometry) -> Handoff:
    """The request's context_phase_params, decoded and checked against its prompt and this
    engine's KV geometry; InvalidInput says what does not match."""
    if request.context_phase_params is None:
        raise InvalidInput("a generation_only request needs the context_phase_params of its context phase")
    try:
        handoff = Handoff.decode(request.context_phase_params)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    if handoff.num_tokens != len(request.input_ids) or handoff.prompt_digest != prompt_digest(request.input_ids):
        raise InvalidInput("context_phase_params belong to a different prompt than this request's input_ids")
    if handoff.geometry != geometry:
        raise InvalidInput(
            f"context_phase_params come from engine '{handoff.source_engine}' with KV geometry {handoff.geometry}, "
            f"this engine has {geometry}: configure the same tokens_per_block on both"
        )
    return handoff
