"""The stub engine as a Triton python-backend model (decoupled, async).

Every `context_N` / `generation_N` / `aggregated_N` model.py re-exports this class: one
engine model is one `EngineCore`, like one TensorRT-LLM executor. Only used inside the
python backend stub (it imports `triton_python_backend_utils` at initialize).
"""

from __future__ import annotations

from typing import Any

from orchestrator.runtime import triton_io as io
from orchestrator.runtime.loop_thread import LoopThread
from orchestrator.runtime.outbox import Channel, Outbox
from orchestrator.stub_engine.config import EngineConfig
from orchestrator.stub_engine.core import EngineCore
from orchestrator.stub_engine.sequence import join_outputs
from orchestrator.telemetry.gauges import StateGauges
from orchestrator.telemetry.recorder import ENGINE_SPECS, Telemetry
from orchestrator.telemetry.registry import TritonRegistry
from orchestrator.wire.contract import EngineOutput, EngineRequest, is_stop_request, parse_request
from orchestrator.wire.errors import RequestError, as_request_error


class _EngineSink:
    """A request's response sender behind the engine's outbox: the step loop only queues, the
    sender thread sends, and outputs that queued meanwhile go out as one (orchestrator/runtime/outbox.py)."""

    __slots__ = ("pb", "sender", "request", "triton_request", "requested", "channel", "broken")

    def __init__(self, pb_utils: Any, sender: Any, request: EngineRequest, triton_request: Any, outbox: Outbox) -> None:
        self.pb, self.sender, self.request, self.triton_request = pb_utils, sender, request, triton_request
        self.requested = io.requested_outputs(triton_request)  # only these go out (triton_io says why)
        self.channel: Channel[tuple[EngineOutput, bool] | RequestError] = outbox.channel(self._flush)
        self.broken = False

    def send(self, output: EngineOutput, final: bool) -> None:
        self.channel.put((output, final), last=final)

    def fail(self, error: RequestError) -> None:
        self.channel.put(error, last=True)

    def cancelled(self) -> bool:
        return bool(self.triton_request.is_cancelled())

    def _flush(self, items: list[tuple[EngineOutput, bool] | RequestError]) -> None:
        """On the sender thread: consecutive outputs as one response, then an error if one came."""
        if self.broken:
            return
        outputs = [item for item in items if not isinstance(item, RequestError)]
        errors = [item for item in items if isinstance(item, RequestError)]
        try:
            if outputs:
                final = outputs[-1][1]
                joined = join_outputs([output for output, _ in outputs])
                flags = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
                io.respond(self.pb, self.sender, joined.tensors(self.request), self.requested, flags)
            if errors:
                self.sender.send(
                    io.error_response(self.pb, errors[0]), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
                )
        except Exception:
            self.broken = True  # Triton refused a response (the request is gone): send nothing more
            raise


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        self.config = EngineConfig.from_parameters(io.model_parameters(args))
        self.telemetry = Telemetry(TritonRegistry(pb_utils, ENGINE_SPECS))
        self.core = EngineCore(args["model_name"], self.config, telemetry=self.telemetry)
        self.outbox = Outbox(f"engine-{args['model_name']}-send", log=pb_utils.Logger.log_warn)
        self.gauges = StateGauges(
            pb_utils, "disagg_engine", args["model_name"],
            lambda: {**self.core.state(), **self.core.capacity(), "queued_responses": self.outbox.queued},
            also=self.telemetry.flush,
        )  # fmt: skip
        self.loop = LoopThread(f"engine-{args['model_name']}")  # why not async execute: loop_thread.py
        self.loop.run(self.core.start(), timeout_s=30)
        self.loop.call(self.gauges.ensure_started)

    def execute(self, requests: list[Any]) -> None:
        self.loop.call(self._intake, requests)
        return None

    def _intake(self, requests: list[Any]) -> None:
        """On the engine's loop thread: queue each request (or stop the one it names)."""
        for request in requests:
            sender = request.get_response_sender()
            try:
                tensors, parameters = io.request_tensors(request), io.request_parameters(request)
                if is_stop_request(tensors):  # TensorRT-LLM's contract: an empty final response
                    self.core.stop(request.request_id())
                    sender.send(flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    continue
                parsed = parse_request(tensors, parameters, request.request_id(), self.config.max_input_len)
                self.core.submit(
                    parsed, _EngineSink(self.pb, sender, parsed, request, self.outbox), parameters.get("fault")
                )
            except Exception as exc:
                sender.send(
                    io.error_response(self.pb, as_request_error(exc)),
                    flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )

    def finalize(self) -> None:
        try:  # in-flight requests end UNAVAILABLE, blocks and leases are freed, the store unlinked
            self.loop.run(self._close(), timeout_s=10)
        finally:
            self.loop.stop()
            self.outbox.close(timeout_s=5)  # the answers _close queued go out first

    async def _close(self) -> None:
        self.gauges.stop()
        await self.core.close()
