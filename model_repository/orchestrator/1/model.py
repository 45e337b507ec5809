"""The disaggregated orchestrator model (logic: orchestrator/serving/pipeline.py).

Decoupled: execute() hands each batch to the orchestrator's own event loop thread
(orchestrator/runtime/loop_thread.py says why not `async def execute`) and returns, so one
instance serves many requests at once; every request ends with exactly one final
response or typed error, sent by the pipeline. A `stop=true` request ends the in-flight
request with its id. What is in flight is published as `disagg_orchestrator_*` gauges.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root holds `orchestrator`

import triton_python_backend_utils as pb_utils

from orchestrator.clients.bls import BlsEngineClient
from orchestrator.clients.dispatch import EndpointClient, grpc_client
from orchestrator.ops.supervisor import sibling_stub_deaths
from orchestrator.runtime import triton_io as io
from orchestrator.runtime.loop_thread import LoopThread
from orchestrator.runtime.outbox import Outbox
from orchestrator.runtime.self_endpoint import loopback_address
from orchestrator.runtime.stub_fence import StubFence
from orchestrator.runtime.watchdog import StuckExit
from orchestrator.serving.config import OrchestratorConfig
from orchestrator.serving.pipeline import Orchestrator
from orchestrator.serving.siblings import SiblingStops
from orchestrator.telemetry.gauges import StateGauges
from orchestrator.telemetry.recorder import SPECS, RateLimitedLog, Telemetry
from orchestrator.telemetry.registry import TritonRegistry
from orchestrator.wire.contract import is_stop_request, parse_request
from orchestrator.wire.errors import as_request_error
from orchestrator.wire.tensors import ENGINE_OUTPUTS  # what engines are asked for (the tensor table)

FENCE_BACKLOG = 64  # finished BLS iterators held before a new request's arrival releases them


class TritonPythonModel:
    def initialize(self, args):
        model_dir = Path(args["model_repository"])  # this model's folder: a relative pool_file lives here
        config = OrchestratorConfig.from_parameters(io.model_parameters(args), model_dir)
        log = pb_utils.Logger.log_info
        self.fence = StubFence()  # finished BLS iterators wait here for the stub (stub_fence.py)
        self.client = EndpointClient(
            BlsEngineClient(pb_utils, ENGINE_OUTPUTS, self.fence),
            remote_factory=lambda: grpc_client(ENGINE_OUTPUTS),
            loopback=loopback_address(config.streams_over, config.self_grpc_address),
        )
        request_log = RateLimitedLog(log, config.log_requests_per_s) if config.log_requests else None
        self.telemetry = Telemetry(TritonRegistry(pb_utils, SPECS), request_log)
        self.outbox = Outbox("orchestrator-send", log=log)  # responses leave from its thread (outbox.py)
        self.orchestrator = Orchestrator(
            config,
            self.client,
            log=log,
            telemetry=self.telemetry,
            stub_deaths=sibling_stub_deaths(),
            outbox=self.outbox,
        )  # engines whose stub died fail over at once
        if config.log_routing:
            self.orchestrator.router.listeners.append(lambda decision: log(decision.describe()))
        self.gauges = StateGauges(
            pb_utils,
            "disagg_orchestrator",
            args["model_name"],
            self.orchestrator.state,
            also=self.telemetry.flush,
            instance=args["model_instance_name"],
        )
        self.loop = LoopThread("orchestrator-loop")
        self.loop.call(self.gauges.ensure_started)
        # With several instances, a stop=true for a request another instance holds goes there.
        self.siblings = SiblingStops.for_model(args, self.orchestrator.end_for_sibling, pb_utils.Logger.log_warn)
        if self.siblings is not None:
            self.orchestrator.forward_stop = self.siblings.forward
            self.loop.call(self.siblings.start)
        self.watchdog = StuckExit(config.stuck_exit_s) if config.stuck_exit_s > 0 else None
        if self.watchdog is not None:
            self.loop.call(self.watchdog.start)

    def execute(self, requests):
        self.loop.call(self._serve, requests)
        return None

    def _serve(self, requests):
        """On the loop thread: parse each request and start its task (or stop the one it names)."""
        if self.fence.backlog >= FENCE_BACKLOG:  # cancellation polls cross it too; this bounds it
            self.fence.cross(requests[0].is_cancelled)
        for request in requests:
            sink = io.SenderSink(pb_utils, request, self.fence)
            try:
                tensors = io.request_tensors(request)
                parsed = parse_request(tensors, io.request_parameters(request), request.request_id())
                if is_stop_request(tensors):
                    self.orchestrator.stop(parsed, sink)
                else:
                    self.orchestrator.start(parsed, tensors, sink)
            except Exception as exc:
                sink.fail(as_request_error(exc))

    def finalize(self):
        try:  # in-flight requests end CANCELLED, children are stopped, connections close
            self.loop.run(self._close(), timeout_s=10)
        finally:
            self.loop.stop()
            self.outbox.close(timeout_s=5)  # the CANCELLED answers queued by _close go out first

    async def _close(self):
        if self.watchdog is not None:
            self.watchdog.stop()
        self.gauges.stop()
        if self.siblings is not None:
            self.siblings.close()
        await self.orchestrator.close()
