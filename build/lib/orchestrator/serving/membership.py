"""Live membership: keeps the router's pools in step with the pool file and engine readiness.

One background task per orchestrator, started with its first request (the python
backend's event loop exists from then on):

- every `pool_poll_s`, if `pool_file` is set and its mtime or size changed, re-read it and
  apply it (`Router.update_pools`); a broken file is logged and ignored, so a half-written
  edit never empties a pool;
- every `health_check_s`, ask each engine whether it is ready (gRPC `ModelReady`; local
  engines over loopback, or BLS `pb_utils.is_model_ready` without one: orchestrator/clients/dispatch.py); a not-ready engine (unloaded, still loading, server down) is
  skipped until it answers ready again; one that comes back ready is re-admitted at once
  (its circuit breaker closes: a reloaded engine is a new engine);
- with the same period, if `stub_deaths` is given (local engines: `orchestrator.ops.supervisor`
  watching this server's python stubs), an engine whose stub process died has lost every
  request it held: `on_lost` fails the attempts waiting on it at once, rather than after
  `engine_timeout_s` (Triton 2.51 never ends a dead stub's requests).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Callable, Iterable

from orchestrator.clients.engine_client import EngineClient
from orchestrator.serving.config import OrchestratorConfig, Pools
from orchestrator.serving.router import Router

PROBE_TIMEOUT_S = 2.0


class Membership:
    def __init__(
        self,
        router: Router,
        client: EngineClient,
        config: OrchestratorConfig,
        log: Callable[[str], None] = lambda message: None,
        stub_deaths: Callable[[], Iterable[str]] | None = None,
        on_lost: Callable[[str, str], object] = lambda engine, why: None,
    ) -> None:
        self.router, self.client, self.config, self.log = router, client, config, log
        self.stub_deaths, self.on_lost = stub_deaths, on_lost
        self.pool_file = Path(config.pool_file) if config.pool_file else None
        self._stamp = self._file_stamp()
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0  # pool file versions applied
        self.rejected = 0  # pool file versions ignored as invalid
        self.probes = 0

    @property
    def needed(self) -> bool:
        return self.pool_file is not None or self.config.health_check_s > 0

    def ensure_started(self) -> None:
        if self.needed and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run(), name="orchestrator-membership")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        cfg = self.config
        next_file = next_probe = time.monotonic()
        while True:
            now = time.monotonic()
            if self.pool_file is not None and now >= next_file:
                self.reload()
                next_file = now + cfg.pool_poll_s
            if cfg.health_check_s > 0 and now >= next_probe:
                await self.probe()
                next_probe = time.monotonic() + cfg.health_check_s
            wake = min(next_file if self.pool_file is not None else float("inf"),
                       next_probe if cfg.health_check_s > 0 else float("inf"))  # fmt: skip
            await asyncio.sleep(max(0.0, wake - time.monotonic()))

    def _file_stamp(self) -> tuple[int, int] | None:
        if self.pool_file is None:
            return None
        try:
            st = os.stat(self.pool_file)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def reload(self, force: bool = False) -> bool:
        """Apply the pool file if it changed; True when the membership was replaced."""
        if self.pool_file is None:
            return False
        stamp = self._file_stamp()
        if stamp == self._stamp and not force:
            return False
        self._stamp = stamp
        try:
            pools = Pools.from_file(self.pool_file)
        except ValueError as exc:
            self.rejected += 1
            self.log(f"pool file ignored, membership unchanged: {exc}")
            return False
        changes = self.router.update_pools(pools)
        self.reloads += 1
        for phase, (added, removed) in changes.items():
            if added or removed:
                self.log(f"{phase} pool now {list(self.router.pools_names(phase))}: added {added}, removed {removed}")
        return True

    async def probe(self) -> None:
        """Ask every member whether it is ready, concurrently, each bounded by PROBE_TIMEOUT_S."""
        states = self.router.engines()
        if self.stub_deaths is not None:
            try:  # reads /proc: off the loop, which serves every request
                dead = set(await asyncio.to_thread(lambda: list(self.stub_deaths())))  # type: ignore[misc]
            except Exception as exc:
                self.log(f"stub watch failed: {exc}")
                dead = set()
            for state in states:
                if state.name in dead:
                    self.on_lost(state.name, "its python stub process died")

        async def ask(name: str) -> bool:
            try:
                return bool(await asyncio.wait_for(self.client.is_ready(name), PROBE_TIMEOUT_S))
            except Exception:
                return False

        answers = await asyncio.gather(*(ask(s.name) for s in states))
        self.probes += 1
        for state, ready in zip(states, answers):
            if state.ready != ready:
                self.log(f"engine {state.name} is {'ready again' if ready else 'not ready: skipped'}")
            self.router.set_ready(state.name, ready)
