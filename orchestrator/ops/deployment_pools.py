"""The engine pools of a deployment file: how many engines, what kind, their layout, where.

Why apart from `deployment.py`: a pool is the one section with two kinds of engine and
rules of its own, kept here with the checks only engines need:

- engines: `stub` (our cost-model engine; knobs under `stub:`) or `tensorrtllm` (a built
  TensorRT-LLM engine: `engine_dir`, `gpu_device_ids`, `participant_ids`, ...). A key of
  one kind on the other is an error, never silently dropped.
- real engines on one server share one MPI world: rank 0 is tritonserver, the engines'
  `participant_ids` must be exactly ranks 1..N with no overlap, their `gpu_device_ids`
  must not overlap, and each engine lists one id per rank (tensor x pipeline parallel).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from orchestrator.ops.deployment_schema import Section, fail
from orchestrator.stub_engine.config import EngineConfig

ENGINE_KINDS = ("stub", "tensorrtllm")
# Stub knobs the pool itself sets (layout), not under `stub:`.
_POOL_OWNED = frozenset({"tensor_parallel_size", "pipeline_parallel_size", "max_batch_size"})
_REAL_KEYS = ("engine_dir", "gpu_device_ids", "participant_ids", "kv_cache_free_gpu_mem_fraction",
              "max_tokens_in_paged_kv_cache", "batch_scheduler_policy", "parameters")  # fmt: skip


@dataclass(frozen=True, slots=True)
class RealEngine:
    """What a `tensorrtllm` engine model needs beyond the pool's shared settings."""

    gpu_device_ids: tuple[int, ...]
    participant_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Pool:
    """The engines of one phase: how many, what kind, their layout, which server hosts them."""

    role: str
    engines: int
    kind: str
    server: str
    tensor_parallel: int
    pipeline_parallel: int
    max_batch_size: int
    tokens_per_block: int
    max_input_len: int
    stub: Mapping[str, str]  # stub engine parameters (EngineConfig keys), checked
    engine_dir: str = ""
    kv_cache_free_gpu_mem_fraction: float = 0.9
    max_tokens_in_paged_kv_cache: int = 0  # 0: let the fraction decide (real engines)
    batch_scheduler_policy: str = "guaranteed_no_evict"
    parameters: Mapping[str, str] | None = None  # further tensorrt_llm parameters, passed through
    real: tuple[RealEngine, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f"{self.role}_{i}" for i in range(self.engines))

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel


def server_ref(section: Section, servers: list[str]) -> str:
    """The server named by `section` (a pool or the orchestrator); optional with one server."""
    if len(servers) == 1:
        value = section.string("server", servers[0])
    else:
        if not section.has("server"):
            raise fail(section.key("server"), f"several servers are defined: say which hosts this, one of {servers}")
        value = section.string("server", "")
    if value not in servers:
        raise fail(section.key("server"), f"unknown server {value!r}; defined: {servers}")
    return value


def parse_pool(s: Section, role: str, servers: list[str], streaming: bool) -> Pool:
    """One `pools.<role>` section: a stub pool (knobs under `stub:`) or a tensorrtllm one."""
    engines = s.integer("engines", 1, minimum=1)
    kind = s.string("kind", "stub", choices=ENGINE_KINDS)
    server = server_ref(s, servers)
    tp = s.integer("tensor_parallel", 1, minimum=1)
    pp = s.integer("pipeline_parallel", 1, minimum=1)
    max_batch = s.integer("max_batch_size", 64, minimum=1)
    tokens_per_block = s.integer("tokens_per_block", 32, minimum=1)
    max_input_len = s.integer("max_input_len", 4096, minimum=1)
    decoupled = s.boolean("decoupled", True)
    if not decoupled:
        why = "streaming is on (streaming: true) and" if streaming else ""
        raise fail(
            s.key("decoupled"),
            f"is false, but {why} the orchestrator reads every engine reply as a stream (decoupled "
            "requests); TensorRT-LLM streams only from a decoupled model. Set decoupled: true",
        )
    common: dict[str, Any] = dict(role=role, engines=engines, kind=kind, server=server, tensor_parallel=tp, pipeline_parallel=pp,
                  max_batch_size=max_batch, tokens_per_block=tokens_per_block, max_input_len=max_input_len)  # fmt: skip
    if kind == "stub":
        for key in _REAL_KEYS:
            if s.has(key):
                raise fail(s.key(key), "is an option of tensorrtllm engines; this pool's kind is stub")
        pool = Pool(**common, stub=_stub_knobs(s, tp, pp, max_batch, tokens_per_block, max_input_len))
    else:
        if s.has("stub"):
            raise fail(
                s.key("stub"), "stub-only options on a tensorrtllm pool: a real engine has no cost model or faults"
            )
        pool = _real_pool(s, common)
    s.done()
    return pool


def _stub_knobs(s: Section, tp: int, pp: int, max_batch: int, tpb: int, max_input_len: int) -> dict[str, str]:
    knobs = s.scalars("stub")
    stub = Section.of(s.data.get("stub"), s.key("stub"))
    known = {f.name for f in fields(EngineConfig)}
    for key in knobs:
        if key in _POOL_OWNED or key in ("tokens_per_block", "max_input_len"):
            raise fail(
                stub.key(key), "is set on the pool itself (tensor_parallel, pipeline_parallel, max_batch_size, ...)"
            )
        if key not in known:
            raise fail(
                stub.key(key),
                f"unknown stub engine knob; see orchestrator/stub_engine/config.py: {sorted(known - _POOL_OWNED)}",
            )
    params = {"max_batch_size": str(max_batch), "tokens_per_block": str(tpb), "max_input_len": str(max_input_len),
              "tensor_parallel_size": str(tp), "pipeline_parallel_size": str(pp), **knobs}  # fmt: skip
    try:
        EngineConfig.from_parameters(params)
    except ValueError as exc:
        raise fail(s.path, str(exc)) from None
    return params


def _real_pool(s: Section, common: dict[str, Any]) -> Pool:
    engine_dir = s.string("engine_dir", "")
    if not engine_dir:
        raise fail(
            s.key("engine_dir"), "a tensorrtllm pool needs the folder of its built engine (trtllm-build --output_dir)"
        )
    size = common["tensor_parallel"] * common["pipeline_parallel"]
    devices = s.id_groups("gpu_device_ids", common["engines"], size, "GPU device ids")
    participants = s.id_groups("participant_ids", common["engines"], size, "participant ids (MPI ranks)")
    return Pool(
        **common,
        stub={},
        engine_dir=engine_dir,
        kv_cache_free_gpu_mem_fraction=s.number("kv_cache_free_gpu_mem_fraction", 0.9, 0.01, 1.0),
        max_tokens_in_paged_kv_cache=s.integer("max_tokens_in_paged_kv_cache", 0),
        batch_scheduler_policy=s.string(
            "batch_scheduler_policy", "guaranteed_no_evict", choices=("guaranteed_no_evict", "max_utilization")
        ),  # fmt: skip
        parameters=s.scalars("parameters"),
        real=tuple(RealEngine(d, p) for d, p in zip(devices, participants)),
    )


def check_mpi_world(server: str, pools: list[Pool], several: bool) -> None:
    """Real engines of one server: ranks 1..N exactly once, each GPU used by one rank."""
    where = f" on server {server!r}" if several else ""
    owner_rank: dict[int, str] = {}
    owner_gpu: dict[int, str] = {}
    for pool in pools:
        for i, engine in enumerate(pool.real):
            here = f"pools.{pool.role} engine {i}"
            for rank in engine.participant_ids:
                if rank in owner_rank:
                    raise fail(
                        f"pools.{pool.role}.participant_ids[{i}]",
                        f"rank {rank} is also used by {owner_rank[rank]}{where}",
                    )
                owner_rank[rank] = here
            for gpu in engine.gpu_device_ids:
                if gpu in owner_gpu:
                    raise fail(
                        f"pools.{pool.role}.gpu_device_ids[{i}]", f"GPU {gpu} is also used by {owner_gpu[gpu]}{where}"
                    )
                owner_gpu[gpu] = here
    if not owner_rank:
        return
    expected = set(range(1, len(owner_rank) + 1))
    if set(owner_rank) != expected:
        ranks = sorted(owner_rank)
        raise fail(
            f"pools.{pools[0].role}.participant_ids",
            f"the engines{where} use ranks {ranks} but their MPI world has {len(owner_rank) + 1} ranks: rank 0 is "
            f"tritonserver and the engines' ranks must be exactly 1..{len(owner_rank)}",
        )
