"""The deployment secret at work: signed handoffs, authenticated pulls, permitted peers.

A generation engine is reachable by any client, so everything a handoff makes it do
(connect, map shared memory, copy blocks) must need the deployment secret. These tests
forge, alter, replay and expire handoffs, pull without the secret, and play a malicious
transfer server, against real engine cores, sockets and shared memory.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import struct
import time
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.stub_engine.handoff import Handoff
from orchestrator.stub_engine.kv_auth import (
    MAC_LEN,
    NONCE_LEN,
    KeyRing,
    PeerHosts,
    PulledHandoffs,
    SecretError,
    remove_stale_keys,
)
from orchestrator.stub_engine.transfer import ShmTransport, TcpTransport
from orchestrator.wire.contract import RequestType
from orchestrator.wire.errors import EngineUnavailable, ErrorCode, InvalidInput, KVCacheGone
from tests.engine_harness import PROMPT, TEST_KEYS, RecordingSink, complete, context_blob, new_core, request, run

OTHER_KEYS = KeyRing.parse("a-secret-of-another-deployment", "the attacker")


# -- the key ring -------------------------------------------------------------------------


def test_the_first_key_signs_and_every_key_verifies() -> None:
    """Rotation: 'old,new' still signs with old; 'new,old' signs with new and accepts old."""
    old, new = "old-key-0123456789abcdef", "new-key-0123456789abcdef"
    during, after, gone = (
        KeyRing.parse(f"{old},{new}", "t"),
        KeyRing.parse(f"{new} {old}", "t"),
        KeyRing.parse(new, "t"),
    )
    mac = during.sign(b"handoff", b"body")
    assert after.verify(mac, b"handoff", b"body") and not gone.verify(mac, b"handoff", b"body")
    assert during.verify(after.sign(b"handoff", b"body"), b"handoff", b"body")
    assert not during.verify(mac, b"pull", b"body")  # labels separate the uses of one key
    assert not during.verify(during.sign(b"x", b"ab", b"c"), b"x", b"a", b"bc")  # parts cannot be shifted


@pytest.mark.parametrize(
    ("text", "message"), [("", "holds no key"), (" , ", "holds no key"), ("short", "5 characters")]
)
def test_unusable_secrets_are_refused_with_where_they_came_from(text: str, message: str) -> None:
    with pytest.raises(SecretError, match=message) as info:
        KeyRing.parse(text, "environment variable DISAGG_KV_SECRET")
    assert "DISAGG_KV_SECRET" in str(info.value)


def test_keys_come_from_the_file_then_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "kv_secret"
    secret.write_text("from-the-file-0123456789\n")
    monkeypatch.setenv("MY_KV_SECRET", "from-the-environment-0123")
    assert KeyRing.load(str(secret), "MY_KV_SECRET").keys == (b"from-the-file-0123456789",)
    assert KeyRing.load("", "MY_KV_SECRET").keys == (b"from-the-environment-0123",)
    with pytest.raises(SecretError, match="kv_secret_file"):
        KeyRing.load(str(tmp_path / "missing"), "MY_KV_SECRET")


def test_without_a_secret_the_engines_of_one_server_share_a_key_of_their_own(tmp_path: Path) -> None:
    """Two engines of server A read one key; server B's engines get another; a dead server's key goes."""
    a1, a2 = KeyRing.for_server(os.getpid(), tmp_path), KeyRing.for_server(os.getpid(), tmp_path)
    assert a1.keys == a2.keys
    assert (tmp_path / f"disagg_kvkey_{os.getpid()}").stat().st_mode & 0o777 == 0o600
    dead = _dead_pid()
    assert KeyRing.for_server(dead, tmp_path).keys != a1.keys
    assert remove_stale_keys(tmp_path) == [f"disagg_kvkey_{dead}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"disagg_kvkey_{os.getpid()}"]


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_peer_hosts_match_addresses_networks_and_names() -> None:
    peers = PeerHosts("10.0.0.0/8, ::1,ctx-server", own_host="192.0.2.5")
    assert [peers.allows(h) for h in ("10.3.4.5", "::1", "CTX-server", "192.0.2.5")] == [True] * 4
    assert [peers.allows(h) for h in ("11.0.0.1", "169.254.169.254", "evil.example", "")] == [False] * 4
    assert PeerHosts("*").allows("anything")


def test_pulled_handoffs_are_forgotten_once_expired() -> None:
    pulled, now = PulledHandoffs(), 10**18
    pulled.add(b"a", expires_ns=now, now_ns=now)
    pulled.add(b"b", expires_ns=now + 60 * 10**9, now_ns=now)
    assert b"a" in pulled and len(pulled) == 2
    pulled.add(b"c", expires_ns=now + 90 * 10**9, now_ns=now + 30 * 10**9)  # a expired 30 s ago
    assert b"a" not in pulled and b"b" in pulled and len(pulled) == 2


# -- handoffs at the generation engine ------------------------------------------------------


def _generation(blob: bytes):  # type: ignore[no-untyped-def]
    return request(PROMPT, request_type=RequestType.GENERATION_ONLY, blob=blob)


def test_a_forged_handoff_is_refused_and_its_listener_sees_no_connection() -> None:
    """Signed with another secret, a handoff naming a listening socket is refused at submit and
    nothing connects; the same handoff signed with the deployment's secret does connect (so
    the listener would have seen a connection)."""

    async def body() -> None:
        ctx, gen = new_core("ctx"), new_core("gen", kv_transport="tcp")
        _, blob = await context_blob(ctx, request(PROMPT))
        genuine = Handoff.decode(blob, TEST_KEYS)
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            listener.setblocking(False)
            aimed = replace(genuine, port=listener.getsockname()[1], mac=b"")
            for forged in (aimed.encode(OTHER_KEYS), aimed.encode(TEST_KEYS)[:-1] + b"\0", _retarget(blob, aimed.port)):
                with pytest.raises(InvalidInput, match="not signed by this deployment"):
                    gen.submit(_generation(forged), RecordingSink(gen, "forged"))
            assert select.select([listener], [], [], 0)[0] == []
            assert gen.active == 0 and gen.steps == 0
            sink = RecordingSink(gen, "control")
            gen.submit(_generation(aimed.encode(TEST_KEYS)), sink)
            conn, _ = await asyncio.wait_for(asyncio.get_running_loop().sock_accept(listener), 10)
            conn.close()  # not a transfer server: the pull fails, the request ends
            await sink.done.wait()
            assert sink.assert_failed().code is ErrorCode.NOT_FOUND

    run(body)


def _retarget(blob: bytes, port: int) -> bytes:
    """The genuine blob with its port field rewritten in place (the signature left as it was)."""
    at = 4 + struct.calcsize("<iIQQQHHHIHH")
    return blob[:at] + struct.pack("<H", port) + blob[at + 2 :]


def test_an_expired_handoff_is_refused_before_any_connection() -> None:
    async def body() -> None:
        ctx, gen = new_core("ctx"), new_core("gen")
        _, blob = await context_blob(ctx, request(PROMPT))
        stale = replace(Handoff.decode(blob, TEST_KEYS), expires_ns=time.time_ns() - 60 * 10**9, mac=b"")
        with pytest.raises(KVCacheGone, match="expired"):
            gen.submit(_generation(stale.encode(TEST_KEYS)), RecordingSink(gen, "stale"))
        assert gen.active == 0

    run(body)


def test_a_signed_handoff_naming_a_host_outside_kv_peer_hosts_is_a_server_fault() -> None:
    """Only the deployment can sign such a blob: its configuration is at fault, not the client."""

    async def body() -> None:
        ctx, gen = new_core("ctx"), new_core("gen", kv_peer_hosts="10.0.0.0/8")
        _, blob = await context_blob(ctx, request(PROMPT))
        elsewhere = replace(Handoff.decode(blob, TEST_KEYS), host="169.254.169.254", mac=b"")
        with pytest.raises(EngineUnavailable, match="kv_peer_hosts"):
            gen.submit(_generation(elsewhere.encode(TEST_KEYS)), RecordingSink(gen, "far"))
        sink = await complete(gen, _generation(blob))  # its own kv_transfer_host (loopback) is allowed
        assert sink.tokens

    run(body)


# -- pulls ---------------------------------------------------------------------------------


def test_a_pull_without_the_secret_is_refused_and_the_lease_stays() -> None:
    async def body() -> None:
        ctx = new_core("ctx")
        _, blob = await context_blob(ctx, request(PROMPT))
        handoff = Handoff.decode(blob, TEST_KEYS)
        with pytest.raises(KVCacheGone, match="unauthenticated KV pull"):
            await TcpTransport(OTHER_KEYS).pull(handoff, 0, 1)
        assert ctx.exchange.server.refused == 1
        assert (await TcpTransport(TEST_KEYS).pull(handoff, 0, 1)).shape[1] == 1  # the lease was kept for a real pull

    run(body)


def test_a_pull_of_the_previous_protocol_is_refused() -> None:
    """A KVP1 frame (no challenge answered, no MAC) gets an error and the connection ends."""

    async def body() -> None:
        ctx = new_core("ctx")
        _, blob = await context_blob(ctx, request(PROMPT))
        reader, writer = await asyncio.open_connection("127.0.0.1", ctx.exchange.server.port)
        await reader.readexactly(4 + NONCE_LEN)
        writer.write(
            struct.pack("<4sQIIB", b"KVP1", Handoff.decode(blob, TEST_KEYS).lease_id, 0, 1, 0).ljust(
                21 + NONCE_LEN + MAC_LEN, b"\0"
            )
        )
        status = await reader.readexactly(1)
        (n,) = struct.unpack("<H", await reader.readexactly(2))
        assert status == b"\1" and b"unauthenticated" in await reader.readexactly(n)
        assert await reader.read() == b""
        writer.close()

    run(body)


async def _malicious_server(keys: KeyRing, segment: str, total: int) -> asyncio.base_events.Server:
    """A transfer server that answers every shm pull with `segment` (proving `keys`)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_nonce = os.urandom(NONCE_LEN)
        writer.write(b"KVC2" + server_nonce)
        frame = await reader.readexactly(21 + NONCE_LEN + MAC_LEN)
        fields, puller_nonce = frame[:21], frame[21 : 21 + NONCE_LEN]
        count = struct.unpack("<4sQIIB", fields)[3]
        name = segment.encode()
        writer.write(
            b"\0" + keys.sign(b"serve", puller_nonce, server_nonce, fields) + struct.pack("<H", len(name)) + name
        )
        writer.write(struct.pack(f"<II{count}I", total, count, *range(count)))
        await writer.drain()
        await reader.read()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize("server_keys", ["without the secret", "with the secret"])
def test_a_malicious_transfer_server_cannot_make_an_engine_map_a_foreign_segment(server_keys: str) -> None:
    """The handoff is genuine, the server answering its pull is not: without the secret it cannot
    prove itself; with it (a compromised peer) it still cannot name another segment than the
    one the signed handoff names. Either way nothing is mapped."""

    async def body() -> None:
        ctx, victim = new_core("ctx"), new_core("victim")  # victim's store: the foreign segment
        _, blob = await context_blob(ctx, request(PROMPT))
        keys = OTHER_KEYS if server_keys == "without the secret" else TEST_KEYS
        server = await _malicious_server(keys, victim.store.shm_name, victim.store.num_blocks)
        try:
            handoff = replace(Handoff.decode(blob, TEST_KEYS), port=server.sockets[0].getsockname()[1])
            transport = ShmTransport(TEST_KEYS)
            with pytest.raises(KVCacheGone, match="could not prove" if keys is OTHER_KEYS else "named segment"):
                await transport.pull(handoff, 0, 1)
            assert transport._attached == {}
        finally:
            server.close()
            await server.wait_closed()

    run(body)
