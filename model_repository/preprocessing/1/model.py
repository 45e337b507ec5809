"""Preprocessing: ensemble text inputs -> token ids (logic: orchestrator/text/preprocess.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root holds `orchestrator`

import triton_python_backend_utils as pb_utils

from orchestrator.runtime import triton_io as io
from orchestrator.text.preprocess import TextLimits, preprocess
from orchestrator.text.tokenizer import load_tokenizer
from orchestrator.wire.errors import as_request_error


class TritonPythonModel:
    def initialize(self, args):
        params = io.model_parameters(args)
        self.tokenizer = load_tokenizer(params.get("tokenizer_dir"))
        self.limits = TextLimits.from_parameters(params)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                tensors = preprocess(self.tokenizer, io.request_tensors(request), self.limits)
                responses.append(io.response(pb_utils, tensors, io.requested_outputs(request)))
            except Exception as exc:
                responses.append(io.error_response(pb_utils, as_request_error(exc)))
        return responses
