"""Postprocessing: one orchestrator response -> its `text_output`, keeping no state.

The orchestrator's `detok_window` carries the context this needs (see
`orchestrator.text.detokenize`): streaming responses become exact text deltas; the
non-streaming response is prompt + completion (the prompt ids decoded, as TensorRT-LLM's
postprocessing does: Triton will not let a step mix the client's `text_input` with a
decoupled model's outputs), or the completion alone with `exclude_input_in_output`.
"""

from __future__ import annotations

import numpy as np

from orchestrator.text.detokenize import render
from orchestrator.text.tokenizer import Tokenizer
from orchestrator.wire.contract import Tensors
from orchestrator.wire.errors import InvalidInput


def postprocess(tokenizer: Tokenizer, tensors: Tensors) -> dict[str, np.ndarray]:
    window = tensors.get("detok_window")
    if window is None:
        raise InvalidInput("postprocessing needs the orchestrator's 'detok_window' output")
    try:
        rendered = render(tokenizer, window.reshape(-1))
    except ValueError as exc:
        raise InvalidInput(f"detok_window: {exc}") from None
    text = rendered.text
    return {"text_output": np.array([[text.encode("utf-8")]], dtype=object)}
