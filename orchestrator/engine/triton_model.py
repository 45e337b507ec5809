"""The stub engine as a Triton python-backend model (decoupled, async).

Every `context_N` / `generation_N` / `aggregated_N` model.py re-exports this class: one
engine model is one `EngineCore`, like one TensorRT-LLM executor. Only used inside the
python backend stub (it imports `triton_python_backend_utils` at initialize).
"""

from __future__ import annotations

from typing import Any

from orchestrator import triton_io as io
from orchestrator.contract import EngineOutput, EngineRequest, is_stop_request, parse_request
from orchestrator.engine.config import EngineConfig
from orchestrator.engine.core import EngineCore
from orchestrator.errors import RequestError, as_request_error
from orchestrator.gauges import StateGauges
from orchestrator.loop_thread import LoopThread
from orchestrator.metric_registry import TritonRegistry
from orchestrator.telemetry import ENGINE_SPECS, Telemetry


class _EngineSink:
    __slots__ = ("pb", "sender", "request", "triton_request", "requested")

    def __init__(self, pb_utils: Any, sender: Any, request: EngineRequest, triton_request: Any) -> None:
        self.pb, self.sender, self.request, self.triton_request = pb_utils, sender, request, triton_request
        self.requested = io.requested_outputs(triton_request)  # only these go out (triton_io says why)

    def send(self, output: EngineOutput, final: bool) -> None:
        flags = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        io.respond(self.pb, self.sender, output.tensors(self.request), self.requested, flags)

    def fail(self, error: RequestError) -> None:
        self.sender.send(io.error_response(self.pb, error), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def cancelled(self) -> bool:
        return bool(self.triton_request.is_cancelled())


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils  # noqa: PLC0415 - exists only in the stub

        self.pb = pb_utils
        self.config = EngineConfig.from_parameters(io.model_parameters(args))
        self.telemetry = Telemetry(TritonRegistry(pb_utils, ENGINE_SPECS))
        self.core = EngineCore(args["model_name"], self.config, telemetry=self.telemetry)
        self.gauges = StateGauges(
            pb_utils, "disagg_engine", args["model_name"], lambda: {**self.core.state(), **self.core.capacity()},
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
                self.core.submit(parsed, _EngineSink(self.pb, sender, parsed, request), parameters.get("fault"))
            except Exception as exc:  # noqa: BLE001 - one typed error response per bad request
                sender.send(io.error_response(self.pb, as_request_error(exc)), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self) -> None:
        try:  # in-flight requests end UNAVAILABLE, blocks and leases are freed, the store unlinked
            self.loop.run(self._close(), timeout_s=10)
        finally:
            self.loop.stop()

    async def _close(self) -> None:
        self.gauges.stop()
        await self.core.close()
