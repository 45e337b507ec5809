"""Who may hand KV over and pull it: the deployment secret, what it signs, whom engines reach.

Why. Engine models answer any client of Triton's ports (Triton has no per-model access
control), so a generation_only request's `context_phase_params` may come from anyone. A
handoff names where to connect and which lease (and, on one host, which shared-memory
segment) to copy KV from: unauthenticated, it lets a client make an engine connect
anywhere, or compute its request on another tenant's cached prompt. So:

- every handoff carries an HMAC-SHA256 by a key of the deployment secret and an expiry;
  a generation engine checks both, and that the blob was not pulled here before, before
  it opens any connection (`check_handoff`);
- a KV pull is a challenge-response: the puller proves it holds the secret with a MAC
  over the server's nonce, its own nonce and the request; the transfer server proves it
  back (`transfer.py`);
- a generation engine connects only to hosts of its `kv_peer_hosts` and maps only
  segments named by a signed handoff that look like an engine's KV store.

The secret (`KeyRing.load`): engine parameter `kv_secret_file` (a file), else the
environment variable that `kv_secret_env` names (`DISAGG_KV_SECRET`), else a key made for
this tritonserver alone (a 0600 file in /dev/shm named after the server's pid), which is
enough when every engine runs in one server. The value holds one or more keys separated
by commas or whitespace: the first signs, all are accepted, so a key is rotated in three
steps (`old,new` everywhere, then `new,old`, then `new`).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

MAC_LEN = 32
NONCE_LEN = 16
MIN_KEY_CHARS = 16
CLOCK_SKEW_S = 5.0  # hosts' clocks may differ this much when a handoff's expiry is checked
SHM_DIR = Path("/dev/shm")
_EPHEMERAL = re.compile(r"^disagg_kvkey_(\d+)$")


class SecretError(ValueError):
    """The deployment secret is missing or unusable; the message says where it was read."""


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The deployment secret's keys: `keys[0]` signs, every key verifies."""

    keys: tuple[bytes, ...]
    source: str  # where the keys came from, for messages (never the keys themselves)

    @classmethod
    def parse(cls, text: str, source: str) -> "KeyRing":
        keys = tuple(k for k in re.split(r"[\s,]+", text.strip()) if k)
        if not keys:
            raise SecretError(f"{source} holds no key")
        short = [len(k) for k in keys if len(k) < MIN_KEY_CHARS]
        if short:
            raise SecretError(
                f"{source} holds a key of {short[0]} characters; use at least {MIN_KEY_CHARS} "
                "(python -c 'import secrets; print(secrets.token_hex(32))')"
            )
        return cls(tuple(k.encode() for k in keys), source)

    @classmethod
    def load(
        cls, secret_file: str = "", secret_env: str = "DISAGG_KV_SECRET", server_pid: int | None = None
    ) -> "KeyRing":
        """The keys from `secret_file`, else from `$secret_env`, else this server's own key."""
        if secret_file:
            try:
                text = Path(secret_file).read_text()
            except OSError as exc:
                raise SecretError(
                    f"engine parameter 'kv_secret_file' = {secret_file!r} cannot be read: {exc}"
                ) from None
            return cls.parse(text, f"kv_secret_file {secret_file!r}")
        value = os.environ.get(secret_env, "") if secret_env else ""
        if value:
            return cls.parse(value, f"environment variable {secret_env}")
        return cls.for_server(os.getppid() if server_pid is None else server_pid)

    @classmethod
    def for_server(cls, server_pid: int, shm_dir: Path = SHM_DIR) -> "KeyRing":
        """A key shared by the engines of one server process only (their parent's pid names it).

        The first engine to start creates it (mode 0600, written whole before it appears under
        its name); the others read it. Keys of servers that are gone are removed."""
        remove_stale_keys(shm_dir)
        path = shm_dir / f"disagg_kvkey_{server_pid}"
        if not path.exists():
            tmp = shm_dir / f".disagg_kvkey_{server_pid}_{os.getpid()}_{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            try:
                os.link(tmp, path)  # atomic: exactly one engine's key wins
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return cls.parse(path.read_text(), f"the key of tritonserver pid {server_pid} (no deployment secret set)")

    def sign(self, label: bytes, *parts: bytes) -> bytes:
        return hmac.new(self.keys[0], _message(label, parts), hashlib.sha256).digest()

    def verify(self, mac: bytes, label: bytes, *parts: bytes) -> bool:
        message = _message(label, parts)
        ok = False
        for key in self.keys:  # every key is tried: the time taken does not tell which matched
            ok |= hmac.compare_digest(hmac.new(key, message, hashlib.sha256).digest(), mac)
        return ok


def _message(label: bytes, parts: tuple[bytes, ...]) -> bytes:
    """Label and parts, each length-prefixed: no two different part lists give one message."""
    return b"".join(len(p).to_bytes(4, "little") + p for p in (label, *parts))


def remove_stale_keys(shm_dir: Path = SHM_DIR) -> list[str]:
    """Remove per-server keys whose server process is gone; returns their names."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in shm_dir.iterdir():
            match = _EPHEMERAL.match(entry.name)
            if match and not _alive(int(match.group(1))):
                with contextlib.suppress(OSError):
                    entry.unlink()
                    removed.append(entry.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PeerHosts:
    """The transfer servers' hosts a generation engine may connect to (`kv_peer_hosts`):
    IP addresses, networks in CIDR form, host names, or `*` for any."""

    def __init__(self, spec: str, own_host: str = "") -> None:
        self.spec = spec
        self.any = False
        self.names: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for item in [s for s in re.split(r"[\s,]+", spec.strip()) if s] + ([own_host] if own_host else []):
            if item == "*":
                self.any = True
                continue
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.names.add(item.lower())

    def allows(self, host: str) -> bool:
        if self.any or host.lower() in self.names:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.networks)


class PulledHandoffs:
    """Handoffs whose KV this engine pulled already, until they expire: the same blob again
    is a replay. Bounded by the pulls of one lease timeout."""

    def __init__(self) -> None:
        self._expiry: OrderedDict[bytes, int] = OrderedDict()

    def __contains__(self, mac: bytes) -> bool:
        return mac in self._expiry

    def __len__(self) -> int:
        return len(self._expiry)

    def add(self, mac: bytes, expires_ns: int, now_ns: int) -> None:
        self._expiry[mac] = expires_ns
        self._expiry.move_to_end(mac)
        limit = now_ns - int(CLOCK_SKEW_S * 1e9)
        while self._expiry:  # mostly in expiry order: the oldest go first
            oldest, expiry = next(iter(self._expiry.items()))
            if expiry >= limit:
                break
            del self._expiry[oldest]
