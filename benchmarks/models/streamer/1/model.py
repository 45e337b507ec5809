"""Benchmark ceiling: one trivial decoupled python model streaming tokens to the client.

It does no work but wait `token_delay_ms` per token (the parameter) and send one response
per token, so its throughput is what Triton plus the python backend can carry on this
machine: no orchestrator can beat it. Only in benchmark repositories.
"""

import asyncio
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.delay_s = float(params.get("token_delay_ms", "0") or 0) / 1e3
        self.tasks = set()

    async def _stream(self, request):
        sender = request.get_response_sender()
        requested = set(request.requested_output_names())  # Triton 2.51 frees the rest off the GIL
        count = int(pb_utils.get_input_tensor_by_name(request, "request_output_len").as_numpy().reshape(-1)[0])
        for i in range(count):
            await asyncio.sleep(self.delay_s)
            ids = np.array([[[i % 500 + 1]]], dtype=np.int32)
            final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if i == count - 1 else 0
            outputs = [
                pb_utils.Tensor("output_ids", ids),
                pb_utils.Tensor("sequence_length", np.array([[1]], dtype=np.int32)),
            ]
            outputs = [t for t in outputs if t.name() in requested]
            sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=final)

    async def execute(self, requests):
        for request in requests:
            task = asyncio.get_running_loop().create_task(self._stream(request))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return None
