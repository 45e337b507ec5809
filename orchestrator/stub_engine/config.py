"""Stub engine configuration, parsed once from the engine model's config.pbtxt parameters.

Every knob is optional (`parameters { key: "..." value: { string_value: "..." } }`); keys
this stub does not know are ignored, so a real TensorRT-LLM config's keys may share the
block. Names shared with the `tensorrt_llm` backend mean the same thing there.

Scheduling:
- `max_batch_size` (64): sequences in one step, decode and prefill together.
- `max_num_tokens` (8192): tokens processed in one step (one per decoding sequence plus
  the prefill tokens computed); without chunked context a longer prompt runs as its step's
  only prefill.
- `enable_chunked_context` (false, as in TensorRT-LLM): split a prompt's uncached prefill
  over steps (`chunking.py`), so running sequences keep decoding beside each chunk instead
  of all waiting for one long prefill step. Each step's chunks share what `max_num_tokens`
  leaves after one token per decoding sequence, in whole blocks of `tokens_per_block` but
  for a prompt's last chunk, so `max_num_tokens` must then be a multiple of
  `tokens_per_block` (TensorRT-LLM asks the same). Off by default because TensorRT-LLM's
  backend defaults it off, and the stub's knobs mean what the backend's do; the
  aggregated deployments turn it on.
- `max_input_len` (4096): longest accepted prompt, in tokens (chunking or not).
- `max_queued_requests` (512; 0: unlimited): requests waiting for admission (not yet
  running, pulling or holding KV blocks). One more is refused at once with
  `UNAVAILABLE: overloaded: ...` (counted in `disagg_engine_rejected_total`) rather than
  queued; the orchestrator then tries another engine and leaves this one's health alone.
  512 = 8 x max_batch_size: the committed pools of 2 queue 1024 besides the 128 they run, so
  one orchestrator instance (max_in_flight 1024) is refused there before engines refuse.

KV cache (`kv_cache.py`, `block_pool.py`):
- `tokens_per_block` (32), `max_tokens_in_paged_kv_cache` (65536): the pool has
  ceil(max_tokens / tokens_per_block) blocks of `tokens_per_block` token slots.
- `enable_kv_cache_reuse` (true): prefix caching by chained block hashes.
- `kv_lease_timeout_s` (30): how long a context engine keeps an unpulled prefill.
- `kv_transport` (auto | tcp | shm) and `kv_transfer_host` (127.0.0.1): how this engine
  pulls KV, and the address its own transfer server listens on and advertises.
- `kv_secret_file` (""), `kv_secret_env` (DISAGG_KV_SECRET): where the deployment secret
  that signs handoffs and authenticates KV pulls is read (`kv_auth.py`): the file, else
  that environment variable, else a key of this tritonserver's engines alone.
- `kv_peer_hosts` (127.0.0.0/8,::1,localhost): the hosts (addresses, CIDR networks, names,
  `*` for any) whose transfer servers this engine pulls KV from; its own
  `kv_transfer_host` is always allowed.
- `tensor_parallel_size`, `pipeline_parallel_size` (1, 1): the simulated layout of the
  KV blocks (must divide the model's 8 KV heads / 4 layers); tensor parallelism also
  scales the cost model (below).
- `cancel_check_ms` (50): how often the loop asks whether clients cancelled; each check is
  an IPC round trip per request in the python backend, so not every step.

Fault injection (for failover tests, drills and the soak; a real engine has no such keys):
- `fault`: none, or what happens to an affected request:
  `fail`       an UNAVAILABLE error at once;
  `hang`       accepted, never answered until cancelled, stopped or shut down (`stall`: same);
  `slow`       every step it is in lasts `fault_delay_ms` (200) longer: the whole batch waits;
  `crash`      UNAVAILABLE after `fault_after_tokens` (2) generated tokens were sent, its
               blocks freed (a context_only request crashes before its response);
  `drop_lease` a context_only request answers normally but its KV lease is dropped at
               once, so the generation engine's pull finds nothing (NOT_FOUND).
- `fault_phase` (any | context | generation): which requests are affected
  (context_only, generation_only, or every request including aggregate ones).
- `fault_rate` (1.0): the share of those requests affected, chosen by a hash of the
  request id (the same id always gets the same outcome; a retry has a new id).
A request parameter `fault` (same names) injects one into that request alone, whatever
the config says.

Cost model: a step lasts

    step_overhead_ms + prefill_us_per_token * prefill tokens
    + (if any sequence decodes) decode_ms_per_step + decode_us_per_seq * decoding sequences
      + decode_ns_per_kv_token * KV tokens those sequences attend to

and a KV pull lasts at least `transfer_us_per_token` per pulled token. Real CPU time
counts toward these durations (the engine sleeps only for the rest). The defaults model
Llama-3.1-8B in BF16 on one H100 SXM (989 dense BF16 TFLOP/s, 3.35 TB/s HBM3), from
arithmetic on those public figures rather than from a benchmark:

- prefill: 2 FLOP x 8.0e9 parameters = 16 GFLOP per token, at 50% of peak -> 32 us/token;
- decode: reading 16 GB of weights once per step at 80% of HBM bandwidth -> 6 ms/step;
  each decoding sequence adds one token of compute -> 32 us; each cached token it attends
  to is 128 KiB of K/V (32 layers x 8 KV heads x 128 dims x 2 x 2 bytes) read at the same
  bandwidth -> 49 ns;
- overhead: 0.5 ms per step for scheduling and kernel launches (an assumption);
- transfer: 128 KiB per token over one 200 Gb/s (25 GB/s) RDMA NIC -> 5.2 us/token.

Tensor parallelism (`tensor_parallel_size` = tp GPUs per engine): each GPU holds 1/tp of
the weights and of every token's K/V, so prefill compute, the decode step's weight read,
the per-sequence compute, the attended KV and the KV transfer (each GPU's shard over its
own NIC) all divide by tp. What tp adds is its all-reduces (two per layer):
- `tp_comm_us_per_token` (1.2) x 2(tp-1)/tp per prefilled token: a ring all-reduce of
  64 x 8 KiB of activations per token (32 layers x 2 x 4096 x 2 bytes) at 450 GB/s NVLink;
- `tp_comm_ms_per_step` (0.5) per step when tp > 1: 64 small all-reduces at ~8 us latency.
`pipeline_parallel_size` only lays out the blocks: it does not change the modelled time.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping

from orchestrator.stub_engine.kv_layout import Geometry, Layout
from orchestrator.wire.params import typed_values

TRANSPORT_NAMES = ("auto", "tcp", "shm")
# The cost knobs of prefilling, all of them: zeroed, an engine decodes as a generation-only
# engine would (rate matching's generation probes; with tp > 1 the all-reduces count too).
PREFILL_COST_KNOBS = ("prefill_us_per_token", "tp_comm_us_per_token")
FAULTS = ("none", "fail", "hang", "stall", "slow", "crash", "drop_lease")
FAULT_PHASES = ("any", "context", "generation")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_batch_size: int = 64
    max_num_tokens: int = 8192
    max_input_len: int = 4096
    max_queued_requests: int = 512
    enable_chunked_context: bool = False
    tokens_per_block: int = 32
    max_tokens_in_paged_kv_cache: int = 65536
    enable_kv_cache_reuse: bool = True
    kv_lease_timeout_s: float = 30.0
    kv_transport: str = "auto"
    kv_transfer_host: str = "127.0.0.1"
    kv_secret_file: str = ""
    kv_secret_env: str = "DISAGG_KV_SECRET"
    kv_peer_hosts: str = "127.0.0.0/8,::1,localhost"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    cancel_check_ms: float = 50.0
    fault: str = "none"
    fault_phase: str = "any"
    fault_rate: float = 1.0
    fault_after_tokens: int = 2
    fault_delay_ms: float = 200.0
    step_overhead_ms: float = 0.5
    prefill_us_per_token: float = 32.0
    decode_ms_per_step: float = 6.0
    decode_us_per_seq: float = 32.0
    decode_ns_per_kv_token: float = 49.0
    transfer_us_per_token: float = 5.2
    tp_comm_us_per_token: float = 1.2
    tp_comm_ms_per_step: float = 0.5

    def __post_init__(self) -> None:
        if self.max_queued_requests < 0:
            raise ValueError(
                f"engine parameter 'max_queued_requests' must be >= 0 (0: unlimited), got {self.max_queued_requests}"
            )
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "max_queued_requests":  # 0 means unlimited: checked above
                continue
            if f.type == "int" and value < 1:
                raise ValueError(f"engine parameter '{f.name}' must be >= 1, got {value}")
            if f.type == "float" and not value >= 0:
                raise ValueError(f"engine parameter '{f.name}' must be >= 0, got {value}")
        if self.kv_transport not in TRANSPORT_NAMES:
            raise ValueError(
                f"engine parameter 'kv_transport' must be one of {list(TRANSPORT_NAMES)}, got {self.kv_transport!r}"
            )
        for key, choices in (("fault", FAULTS), ("fault_phase", FAULT_PHASES)):
            if getattr(self, key) not in choices:
                raise ValueError(f"engine parameter '{key}' must be one of {list(choices)}, got {getattr(self, key)!r}")
        if self.fault_rate > 1:
            raise ValueError(f"engine parameter 'fault_rate' must be between 0 and 1, got {self.fault_rate}")
        if self.kv_lease_timeout_s <= 0:
            raise ValueError(f"engine parameter 'kv_lease_timeout_s' must be > 0, got {self.kv_lease_timeout_s}")
        if self.max_tokens_in_paged_kv_cache < self.tokens_per_block:
            raise ValueError(
                f"engine parameter 'max_tokens_in_paged_kv_cache'={self.max_tokens_in_paged_kv_cache} is less than "
                f"one block of tokens_per_block={self.tokens_per_block}"
            )
        if self.enable_chunked_context and self.max_num_tokens % self.tokens_per_block:
            raise ValueError(
                f"engine parameter 'max_num_tokens'={self.max_num_tokens} must be a multiple of "
                f"tokens_per_block={self.tokens_per_block} with enable_chunked_context (a chunk is whole blocks)"
            )
        try:
            self.layout.validate(self.geometry)
        except ValueError as exc:
            raise ValueError(f"engine parameter {exc}") from None

    @property
    def geometry(self) -> Geometry:
        return Geometry(tokens_per_block=self.tokens_per_block)

    @property
    def layout(self) -> Layout:
        return Layout(tp=self.tensor_parallel_size, pp=self.pipeline_parallel_size)

    @property
    def num_kv_blocks(self) -> int:
        return self.max_tokens_in_paged_kv_cache // self.tokens_per_block

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> "EngineConfig":
        """Build from string parameters; a bad value is an error that names its key."""
        values = typed_values(cls, params, "engine")
        return cls(**values)

    @classmethod
    def free(cls, **overrides: object) -> "EngineConfig":
        """All costs zero: steps take only their real CPU time (tests, functional runs)."""
        keep = ("kv_lease_timeout_s", "fault_rate", "fault_delay_ms")
        zero = {f.name: 0.0 for f in fields(cls) if f.type == "float" and f.name not in keep}
        return cls(**{**zero, **overrides})  # type: ignore[arg-type]

    def step_seconds(self, prefill_tokens: int, decoding: int, kv_tokens: int = 0) -> float:
        """Modelled GPU time of one step with these contents (on all tp GPUs at once)."""
        tp = self.tensor_parallel_size
        ring = 2 * (tp - 1) / tp  # the share of a ring all-reduce's bytes each GPU sends
        per_token_us = self.prefill_us_per_token / tp + self.tp_comm_us_per_token * ring
        ms = self.step_overhead_ms + per_token_us * prefill_tokens / 1e3
        if tp > 1:
            ms += self.tp_comm_ms_per_step
        if decoding:
            ms += (
                self.decode_ms_per_step
                + self.decode_us_per_seq * decoding / 1e3
                + self.decode_ns_per_kv_token * kv_tokens / 1e6
            ) / tp
        return ms / 1e3

    def transfer_seconds(self, tokens: int) -> float:
        """Modelled time to pull `tokens` tokens of K/V (each of the tp GPUs pulls its shard)."""
        return self.transfer_us_per_token * tokens / 1e6 / self.tensor_parallel_size
