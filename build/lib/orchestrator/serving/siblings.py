"""Stop requests between the instances of one orchestrator model.

Why. Each instance of a python model is a process of its own, and Triton hands a request
to whichever instance is free: TensorRT-LLM's `stop=true` request for id X can land on an
instance that does not hold X. The instance that gets it ends X if it holds X, and
otherwise forwards "stop X" to its siblings, one of which holds it.

How. Every instance binds a Unix datagram socket in Linux's abstract namespace (no file
to clean up when a process dies), named after the tritonserver process, the model and
the instance: `disagg-<server pid>-<model>-<instance>`. A forward is one datagram to each
sibling's name; a sibling that is not there (restarting, or count 1) is skipped. The
receiving instance reads datagrams on its event loop (`add_reader`), no thread of its
own. Datagrams on loopback are reliable and never reordered; a stop that finds nothing
(the request just finished) is not an error, as for a local stop.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Mapping

_MAX_DATAGRAM = 4096  # a request id is far shorter; longer ids are not forwarded (see `forward`)


@dataclass(frozen=True)
class Instances:
    """Where this instance and its siblings listen (abstract socket names)."""

    own: str
    siblings: tuple[str, ...]

    @classmethod
    def of(cls, args: Mapping[str, Any], server_pid: int | None = None) -> "Instances":
        """From the python backend's `initialize` args: the model config's instance groups name
        every instance `<model>_<group>_<index>` (how Triton names them)."""
        model = args["model_name"]
        own = args["model_instance_name"]
        config = json.loads(args["model_config"])
        names = [
            f"{model}_{g}_{i}"
            for g, group in enumerate(config.get("instance_group", [{}]))
            for i in range(int(group.get("count", 1)))
        ]
        pid = os.getppid() if server_pid is None else server_pid

        def address(name: str) -> str:
            return f"disagg-{pid}-{model}-{name}"

        return cls(address(own), tuple(address(n) for n in names if n != own))


class SiblingStops:
    """Sends and receives "stop this request id" between the instances of one model."""

    def __init__(self, instances: Instances, on_stop: Callable[[str], object]) -> None:
        self.instances = instances
        self.on_stop = on_stop
        self.forwarded = 0  # stop requests sent on to the siblings
        self.received = 0  # stop requests that arrived from a sibling
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + instances.own)
        self._sock.setblocking(False)
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def for_model(
        cls, args: Mapping[str, Any], on_stop: Callable[[str], object], warn: Callable[[str], None]
    ) -> "SiblingStops | None":
        """For a model instance (python backend `initialize` args): None when it has no
        siblings, or when its name cannot be bound (e.g. still held by this instance's dying
        predecessor; then `warn` says that forwarded stops will not arrive here)."""
        instances = Instances.of(args)
        if not instances.siblings:
            return None
        try:
            return cls(instances, on_stop)
        except OSError as exc:
            warn(f"stop=true will not reach sibling instances from here: {exc}")
            return None

    def start(self) -> None:
        """On the instance's event loop: read forwarded stops there."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._read)

    def forward(self, request_id: str) -> int:
        """Ask every sibling to stop `request_id`; returns how many siblings were reached."""
        data = request_id.encode()
        if not self.instances.siblings or len(data) > _MAX_DATAGRAM:
            return 0
        self.forwarded += 1
        reached = 0
        for name in self.instances.siblings:
            try:
                self._sock.sendto(data, "\0" + name)
                reached += 1
            except OSError:  # not bound now (restarting, or not started yet): nothing it could hold
                continue
        return reached

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.received += 1
            self.on_stop(data.decode(errors="replace"))

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.remove_reader(self._sock.fileno())
            except (ValueError, RuntimeError):
                pass
        self._sock.close()
