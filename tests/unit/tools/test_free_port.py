"""Ports for test and benchmark servers come from outside the OS's ephemeral range, where
nothing else is handed them between our choice and the server's bind (the CI failure:
"Socket '127.0.0.1:34317' already in use" after the server's own engines took ephemeral ports)."""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path

import pytest

from orchestrator.tools import ports
from orchestrator.tools.ports import ephemeral_range, free_port


def test_ports_are_outside_the_ephemeral_range_bindable_and_never_handed_out_twice() -> None:
    low, high = ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(not low <= p <= high for p in ports)
    for port in ports[:5]:
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            sock.bind(("127.0.0.1", port))  # free: nothing took it


def test_a_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "_handed_out", set())
    first = random.Random(7).randint(10000, ephemeral_range()[0] - 1)  # what a Random(7) tries first
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as busy:
        with contextlib.suppress(OSError):  # already taken by something else: in use all the same
            busy.bind(("127.0.0.1", first))
            busy.listen()
        assert free_port(random.Random(7)) != first


def test_the_range_file_is_read_and_a_missing_one_means_linux_defaults(tmp_path: Path) -> None:
    path = tmp_path / "range"
    path.write_text("20000\t30000\n")
    assert ephemeral_range(path) == (20000, 30000)
    assert ephemeral_range(tmp_path / "absent") == (32768, 60999)
