"""Deployment shapes at GPU scale: how many engines of which tensor-parallel size, as files.

A `Shape` is what the Pareto study and the planner vary: aggregated (n engines of tp GPUs,
each doing both phases, chunked context on) or disaggregated (c context engines of tp_c
GPUs, g generation engines of tp_g GPUs), and `max_batch_size`, the most requests an engine
runs at once. `deployment_data` writes it as a deployment file (the one `disagg deploy`
reads, so a planned shape can be built and served), with stub engines whose cost model is
the stub's default (Llama-3.1-8B BF16 on H100 SXM, `orchestrator/stub_engine/config.py`)
and whose KV pool is what `GPU` leaves for the cache on tp GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from orchestrator.ops.deployment import Deployment, parse
from orchestrator.stub_engine.config import EngineConfig


@dataclass(frozen=True, slots=True)
class Gpu:
    """What one GPU holds for the cost model's model: weights split over tp, the rest KV cache."""

    memory_gb: float = 80.0  # H100 SXM
    weights_gb: float = 16.0  # Llama-3.1-8B in BF16
    kv_fraction: float = 0.9  # TensorRT-LLM's kv_cache_free_gpu_mem_fraction default
    kv_bytes_per_token: int = 131072  # 32 layers x 8 KV heads x 128 dims x K,V x 2 bytes

    def kv_tokens(self, tp: int, tokens_per_block: int = 32) -> int:
        """KV cache tokens an engine of `tp` GPUs holds (whole blocks)."""
        free = (tp * self.memory_gb - self.weights_gb) * self.kv_fraction * 1e9
        blocks = int(free // (self.kv_bytes_per_token * tokens_per_block))
        if blocks < 1:
            raise ValueError(f"{tp} GPU(s) of {self.memory_gb} GB cannot hold {self.weights_gb} GB of weights")
        return blocks * tokens_per_block


H100 = Gpu()
MAX_NUM_TOKENS = 8192  # TensorRT-LLM's default token budget per step


@dataclass(frozen=True, slots=True)
class Shape:
    """A deployment's GPU layout. `context` = 0: aggregated (the generation pool does both phases)."""

    generation: int
    generation_tp: int = 1
    context: int = 0
    context_tp: int = 1
    max_batch_size: int = 64  # per generation (or aggregated) engine
    context_batch_size: int = 16  # per context engine: prefill work, a few prompts a step

    @property
    def aggregated(self) -> bool:
        return self.context == 0

    @property
    def gpus(self) -> int:
        return self.generation * self.generation_tp + self.context * self.context_tp

    @property
    def label(self) -> str:
        gen = f"{self.generation}x tp{self.generation_tp}"
        return f"agg {gen}" if self.aggregated else f"ctx {self.context}x tp{self.context_tp} + gen {gen}"

    @property
    def name(self) -> str:
        gen = f"g{self.generation}tp{self.generation_tp}"
        return (
            f"agg-{gen}-b{self.max_batch_size}"
            if self.aggregated
            else f"c{self.context}tp{self.context_tp}-{gen}-b{self.max_batch_size}"
        )


def _pool(engines: int, tp: int, batch: int, max_input_len: int, chunked: bool, gpu: Gpu) -> dict[str, Any]:
    stub: dict[str, Any] = {"max_num_tokens": MAX_NUM_TOKENS, "max_tokens_in_paged_kv_cache": gpu.kv_tokens(tp),
                            "max_queued_requests": 0}  # fmt: skip
    if chunked:
        stub["enable_chunked_context"] = True
    return {"engines": engines, "tensor_parallel": tp, "max_batch_size": batch, "max_input_len": max_input_len,
            "stub": stub}  # fmt: skip


def deployment_data(shape: Shape, max_input_len: int, gpu: Gpu = H100, name: str = "") -> dict[str, Any]:
    """The shape as deployment-file data (yaml.safe_dump it to get the file).

    Chunked context is on wherever an engine prefills beside running decodes (aggregated
    engines), as a TensorRT-LLM user would set it; context engines only prefill. A prompt
    longer than max_num_tokens then still fits a step on a context engine through chunking
    too, so it is on there when prompts are that long.
    """
    long_prompts = max_input_len > MAX_NUM_TOKENS
    pools = {"generation": _pool(shape.generation, shape.generation_tp, shape.max_batch_size, max_input_len,
                                 chunked=shape.aggregated or long_prompts, gpu=gpu)}  # fmt: skip
    routing: dict[str, Any] = {"generation": {"policy": "least_loaded", "load_metric": "tokens"}}
    if not shape.aggregated:
        pools["context"] = _pool(shape.context, shape.context_tp, shape.context_batch_size, max_input_len,
                                 chunked=long_prompts, gpu=gpu)  # fmt: skip
        routing["context"] = {"policy": "least_loaded", "load_metric": "tokens"}
    return {"name": name or shape.name, "routing": routing, "pools": pools,
            "orchestrator": {"settings": {"max_in_flight": 65536, "engine_timeout_s": 600}}}  # fmt: skip


def deployment(shape: Shape, max_input_len: int, gpu: Gpu = H100) -> Deployment:
    return parse(deployment_data(shape, max_input_len, gpu))


COST_KNOBS = ("step_overhead_ms", "prefill_us_per_token", "decode_ms_per_step", "decode_us_per_seq",
              "decode_ns_per_kv_token", "transfer_us_per_token", "tp_comm_us_per_token", "tp_comm_ms_per_step")  # fmt: skip


def slowed(d: Deployment, factor: float) -> Deployment:
    """The same deployment on GPUs `factor` times slower: every modelled duration x factor.

    Why: a deployment planned for thousands of tokens/s cannot be served in real time by
    stub engines sharing two CPU cores, but the same deployment slowed down can, at the same
    load in users; every simulated time scales by `factor` and every rate by 1 / factor, so
    its served goodput (SLOs x factor) checks the plan's goodput / factor.
    """
    if factor <= 0:
        raise ValueError(f"a slow-down factor must be > 0, got {factor}")
    pools = []
    for pool in d.pools:
        if pool.kind != "stub":
            pools.append(pool)
            continue
        config = EngineConfig.from_parameters(pool.stub)
        costs = {key: repr(getattr(config, key) * factor) for key in COST_KNOBS}
        pools.append(replace(pool, stub={**pool.stub, **costs}))
    return replace(d, pools=tuple(pools))
