"""Benchmark baseline: the reference disaggregated BLS orchestrator's design, on purpose.

Like TensorRT-LLM's `disaggregated_serving_bls`: a synchronous execute() that serves its
requests one after another; each goes to one fixed context model (`context_only`), then
its `context_phase_params` go to one fixed generation model (`generation_only`) whose
responses are forwarded as they come; the context phase's first token is not sent early.
It exists only so benchmarks can measure our orchestrator against that design; it is
never part of a served model repository.
"""

import json

import triton_python_backend_utils as pb_utils

FORWARDED = (
    "input_ids", "input_lengths", "request_output_len", "end_id", "pad_id", "streaming",
    "exclude_input_in_output", "runtime_top_k", "runtime_top_p", "temperature", "seed",
)  # fmt: skip


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.context = params.get("baseline_context_engine", "context_0")
        self.generation = params.get("baseline_generation_engine", "generation_0")

    def _child(self, request, model, request_type, extra=()):
        inputs = []
        for name in FORWARDED:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                value = tensor.as_numpy()
                shape = (1, -1) if name == "input_ids" else (1, 1)
                inputs.append(pb_utils.Tensor(name, value.reshape(shape)))
        inputs.extend(extra)
        return pb_utils.InferenceRequest(
            model_name=model,
            inputs=inputs,
            requested_output_names=["output_ids", "sequence_length", "context_phase_params"],
            parameters={"request_type": request_type},
        )

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            requested = set(request.requested_output_names())  # Triton 2.51 frees the rest off the GIL
            streams = []  # BLS iterators, held until the stub let go of them (below)
            try:
                streams.append(self._child(request, self.context, "context_only").exec(decoupled=True))
                ctx = list(streams[-1])
                if ctx[0].has_error():
                    raise pb_utils.TritonModelException(ctx[0].error().message())
                blob = pb_utils.get_output_tensor_by_name(ctx[0], "context_phase_params").as_numpy()
                extra = [pb_utils.Tensor("context_phase_params", blob.reshape(1, -1))]
                streams.append(self._child(request, self.generation, "generation_only", extra).exec(decoupled=True))
                for response in streams[-1]:
                    if response.has_error():
                        raise pb_utils.TritonModelException(response.error().message())
                    outputs = [t for t in response.output_tensors() if t.name() in ("output_ids", "sequence_length")]
                    outputs = [t for t in outputs if t.name() in requested]
                    if outputs:
                        sender.send(pb_utils.InferenceResponse(output_tensors=outputs))
                request.is_cancelled()  # the stub's cleanup fence (below), before the final response
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception as exc:
                request.is_cancelled()
                sender.send(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
            # The stub drops its own reference to a finished BLS iterator later, without the GIL;
            # is_cancelled() waits on the same queue, so after it ours is the last (stub_fence.py).
            del streams
        return None
