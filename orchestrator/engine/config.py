"""Stub engine configuration, parsed once from the engine model's config.pbtxt parameters.

Knobs (all optional; `parameters { key: "..." value: { string_value: "..." } }`):

- `max_batch_size` (64): sequences in one step, decode and prefill together.
- `max_num_tokens` (8192): tokens processed in one step (one per decoding sequence plus
  each admitted prompt); a prompt longer than this runs alone in its step.
- `max_input_len` (4096): longest accepted prompt, in tokens.
- Cost model, the stand-in for GPU time (a step sleeps for its cost):
  `step_overhead_ms` (0.0) per step, `prefill_us_per_token` (0.0) per prompt token,
  `decode_ms_per_step` (0.0) once per step that decodes, `decode_us_per_seq` (0.0) per
  decoding sequence. The committed repository sets small values so streams are visible.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_batch_size: int = 64
    max_num_tokens: int = 8192
    max_input_len: int = 4096
    step_overhead_ms: float = 0.0
    prefill_us_per_token: float = 0.0
    decode_ms_per_step: float = 0.0
    decode_us_per_seq: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_num_tokens", "max_input_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine parameter '{name}' must be >= 1, got {getattr(self, name)}")
        for name in ("step_overhead_ms", "prefill_us_per_token", "decode_ms_per_step", "decode_us_per_seq"):
            if getattr(self, name) < 0:
                raise ValueError(f"engine parameter '{name}' must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> "EngineConfig":
        """Build from string parameters; unknown stub keys are errors that name the key."""
        known = {f.name: f.type for f in fields(cls)}
        values: dict[str, int | float] = {}
        for key, raw in params.items():
            if key not in known:
                continue  # other backends' keys (e.g. tensorrtllm's) may share the block
            try:
                values[key] = int(raw) if known[key] == "int" else float(raw)
            except ValueError:
                raise ValueError(f"engine parameter '{key}' must be a {known[key]}, got {raw!r}") from None
        return cls(**values)  # type: ignore[arg-type]

    def step_seconds(self, prefill_tokens: int, decoding: int) -> float:
        """Modelled GPU time of one step with these contents."""
        ms = self.step_overhead_ms + self.prefill_us_per_token * prefill_tokens / 1000.0
        if decoding:
            ms += self.decode_ms_per_step + self.decode_us_per_seq * decoding / 1000.0
        return ms / 1000.0
