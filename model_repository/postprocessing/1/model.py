"""Postprocessing: detok windows -> text deltas (logic: orchestrator/text/postprocess.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root holds `orchestrator`

import triton_python_backend_utils as pb_utils

from orchestrator.runtime import triton_io as io
from orchestrator.text.postprocess import postprocess
from orchestrator.text.tokenizer import load_tokenizer
from orchestrator.wire.errors import as_request_error


class TritonPythonModel:
    def initialize(self, args):
        self.tokenizer = load_tokenizer(io.model_parameters(args).get("tokenizer_dir"))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(
                    io.response(
                        pb_utils,
                        postprocess(self.tokenizer, io.request_tensors(request)),
                        io.requested_outputs(request),
                    )
                )
            except Exception as exc:
                responses.append(io.error_response(pb_utils, as_request_error(exc)))
        return responses
