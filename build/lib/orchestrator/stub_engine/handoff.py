"""`context_phase_params`: what a context engine hands a generation engine.

The orchestrator forwards this blob unchanged and never parses it (TensorRT-LLM's blob is
likewise opaque and version-tied). It does not carry the KV cache: it says where to pull
it from (the context engine's transfer server and the lease holding the blocks) and what
the blocks look like (model geometry, parallel layout). Layout, little-endian:

    magic b"DKV3"
    i32 first token | u32 prompt tokens | u64 prompt digest | u64 lease id | u64 expiry (unix ns)
    u16 layers | u16 heads | u16 head_dim | u32 tokens_per_block | u16 tp | u16 pp | u16 port
    5 x (u16 length + utf-8): request id, source engine, host, host id, shm name
    32 bytes HMAC-SHA256 of everything before, by the deployment secret (`kv_auth.py`)

A blob not signed by this deployment's engines (forged, altered, truncated, another
deployment's) fails `decode` before any field is read; `check_handoff` also refuses an
expired blob, one this engine pulled already (a replay), one naming a host outside
`kv_peer_hosts`, and one for another prompt or KV geometry: all before any connection.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from orchestrator.stub_engine.kv_auth import CLOCK_SKEW_S, MAC_LEN, KeyRing, PeerHosts, PulledHandoffs
from orchestrator.stub_engine.kv_layout import Geometry, Layout
from orchestrator.wire.block_hash import prompt_digest
from orchestrator.wire.contract import EngineRequest
from orchestrator.wire.errors import EngineUnavailable, InvalidInput, KVCacheGone

MAGIC = b"DKV3"
_LABEL = b"handoff"
_FIXED = struct.Struct("<iIQQQHHHIHHH")
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
    expires_ns: int = 0
    mac: bytes = b""  # set by decode: the blob's signature, which identifies it

    def encode(self, keys: KeyRing) -> bytes:
        g = self.geometry
        parts = [
            MAGIC,
            _FIXED.pack(
                self.first_token, self.num_tokens, self.prompt_digest, self.lease_id, self.expires_ns,
                g.layers, g.heads, g.head_dim, g.tokens_per_block, self.layout.tp, self.layout.pp, self.port,
            ),
        ]  # fmt: skip
        for name in _STRINGS:
            raw = getattr(self, name).encode()
            parts += [struct.pack("<H", len(raw)), raw]
        body = b"".join(parts)
        return body + keys.sign(_LABEL, body)

    @classmethod
    def decode(cls, blob: bytes, keys: KeyRing) -> "Handoff":
        """The handoff in `blob` once its signature verifies; ValueError says what failed."""
        if len(blob) < len(MAGIC) + MAC_LEN or blob[: len(MAGIC)] != MAGIC:
            raise ValueError("context_phase_params is not a handoff of this engine version (bad magic or too short)")
        body, mac = blob[:-MAC_LEN], blob[-MAC_LEN:]
        if not keys.verify(mac, _LABEL, body):
            raise ValueError(
                "context_phase_params is not signed by this deployment's engines (forged, altered, or signed "
                f"with another secret: engines of one deployment need the same DISAGG_KV_SECRET; this one uses {keys.source})"
            )
        try:
            pos = len(MAGIC)
            first, ntok, digest, lease, expires, layers, heads, dim, tpb, tp, pp, port = _FIXED.unpack_from(body, pos)
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
            layout=Layout(tp, pp), port=port, expires_ns=expires, mac=mac, **strings,
        )  # fmt: skip


def check_handoff(
    request: EngineRequest, geometry: Geometry, keys: KeyRing, peers: PeerHosts, pulled: PulledHandoffs, now_ns: int
) -> Handoff:
    """The request's context_phase_params, verified (signature, expiry, not pulled here
    before, a permitted host) and checked against its prompt and this engine's KV geometry.
    Nothing here opens a connection; each refusal is a typed error that says why."""
    if request.context_phase_params is None:
        raise InvalidInput("a generation_only request needs the context_phase_params of its context phase")
    try:
        handoff = Handoff.decode(request.context_phase_params, keys)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    if handoff.mac in pulled:
        raise InvalidInput("context_phase_params were used already: this engine pulled that KV cache before (a replay)")
    if now_ns > handoff.expires_ns + CLOCK_SKEW_S * 1e9:
        late_s = (now_ns - handoff.expires_ns) / 1e9
        raise KVCacheGone(
            f"context_phase_params expired {late_s:.1f}s ago: engine '{handoff.source_engine}' has let its KV lease go"
        )
    if not peers.allows(handoff.host):
        raise EngineUnavailable(
            f"context engine '{handoff.source_engine}' serves KV on {handoff.host}, which this engine's kv_peer_hosts "
            f"({peers.spec!r}) does not list: add that host or network to the generation engines' kv_peer_hosts"
        )
    if handoff.num_tokens != len(request.input_ids) or handoff.prompt_digest != prompt_digest(request.input_ids):
        raise InvalidInput("context_phase_params belong to a different prompt than this request's input_ids")
    if handoff.geometry != geometry:
        raise InvalidInput(
            f"context_phase_params come from engine '{handoff.source_engine}' with KV geometry {handoff.geometry}, "
            f"this engine has {geometry}: configure the same tokens_per_block on both"
        )
    return handoff
