"""What a soak sends: the faulty repository it serves and the requests it plans.

Split from orchestrator/tools/soak.py (the command) so the workload, decided up front from the seed,
can be read and tested apart from the client that sends it and the checks that judge it.
"""

from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from orchestrator.text.tokenizer import WORDS
from orchestrator.tools.launch import DEFAULT_REPOSITORY
from orchestrator.tools.repository import FRONTEND_MODELS, ModelSpec, derive

CONTEXT_ENGINES = ("context_0", "context_1")
GENERATION_ENGINES = ("generation_0", "generation_1")


# --------------------------------------------------------------------------- repository


@dataclass(frozen=True)
class Fault:
    """One engine's injected fault: `kind` on `rate` of the requests of `phase`."""

    engine: str
    kind: str
    rate: float
    phase: str = "any"

    def parameters(self) -> dict[str, str]:
        return {"fault": self.kind, "fault_rate": f"{self.rate:g}", "fault_phase": self.phase}


def default_faults(rate: float) -> tuple[Fault, ...]:
    """A different fault per engine, so one soak covers every recovery path at once:

    - context_0 crashes before its response: the context phase is retried elsewhere;
    - context_1 drops its KV lease: the generation pull finds nothing (NOT_FOUND) and the
      context phase runs again;
    - generation_0 crashes after 2 generated tokens: a streamed request migrates (a context
      phase over prompt + tokens so far, then the other generation engine) and ends ok with
      the same text; a non-streamed one is retried; its blocks are freed mid-stream;
    - generation_1 hangs (at a fifth of the rate, each costs `engine_timeout_s`): the
      orchestrator times the attempt out, stops the silent child and retries.
    """
    return (
        Fault("context_0", "crash", rate, "context"),
        Fault("context_1", "drop_lease", rate, "context"),
        Fault("generation_0", "crash", rate, "generation"),
        Fault("generation_1", "hang", rate / 5, "generation"),
    )


def parse_fault(text: str) -> Fault:
    """`ENGINE=KIND[@RATE]` from the command line (rate defaults to --fault-rate later)."""
    match = re.fullmatch(r"(\w+)=(\w+)(?:@([0-9.]+))?", text)
    if not match:
        raise argparse.ArgumentTypeError(f"--fault wants ENGINE=KIND[@RATE], e.g. generation_0=fail@0.1, got {text!r}")
    return Fault(match[1], match[2], float(match[3]) if match[3] else -1.0)


def soak_repository(dest: Path, faults: Sequence[Fault], engine_timeout_s: float = 2.0) -> Path:
    """Derive the soak's repository: the full ensemble, faults injected, short timeouts.

    `engine_timeout_s` ends hung attempts; the short breaker backoff keeps a faulty engine
    in rotation (its faults are per request, not permanent); 2 s lease expiry bounds how
    long an unpulled prefill may legitimately hold KV blocks after the load.
    """
    by_engine = {f.engine: f for f in faults}
    unknown = set(by_engine) - set(CONTEXT_ENGINES + GENERATION_ENGINES)
    if unknown:
        raise ValueError(f"faults name engines the soak repository does not have: {sorted(unknown)}")
    models: dict[str, ModelSpec] = {name: ModelSpec(name) for name in FRONTEND_MODELS}
    models["orchestrator"] = ModelSpec("orchestrator", {
        "engine_timeout_s": f"{engine_timeout_s:g}",
        "max_retries": "2",
        "max_migrations": "1",
        "breaker_backoff_s": "0.2",
        "breaker_backoff_max_s": "2",
    })  # fmt: skip
    for engine in CONTEXT_ENGINES + GENERATION_ENGINES:
        params = {"kv_lease_timeout_s": "2"}
        if engine in by_engine:
            params.update(by_engine[engine].parameters())
        models[engine] = ModelSpec(engine, params)
    return derive(dest, models, DEFAULT_REPOSITORY)


# --------------------------------------------------------------------------- workload


Key = tuple[str, int, tuple[str, ...]]  # prompt, max_tokens, stop words


@dataclass(frozen=True)
class Plan:
    """One request of the workload, decided up front from the seed (reproducible runs)."""

    request_id: str
    prompt: str
    max_tokens: int
    stream: bool
    stop_words: tuple[str, ...]
    stop_delay_s: float | None  # send stop=true this long after the request; None: never

    @property
    def key(self) -> Key:
        """Requests with the same key must complete with the same text (the stub is deterministic)."""
        return (self.prompt, self.max_tokens, self.stop_words)


SPECIAL_PROMPTS = (
    "héllo wörld, naïve café: the crème brûlée was très bien, héllo wörld",
    "party time 🎉👍🏽 then more 🎉 and 🚀🚀 and 👍🏽🎉 party time",
    "你好世界，今天天气很好。我们去公园散步吧，你好世界",
)


def make_prompts(rng: random.Random, count: int) -> list[str]:
    """Prompts of mixed length (a few words to ~1500 tokens) that repeat phrases, so the
    stub's induction-head model continues them; some share a long prefix (prefix reuse)."""
    shared = " ".join(rng.choice(WORDS) for _ in range(400))
    prompts = list(SPECIAL_PROMPTS)
    while len(prompts) < count:
        phrase = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
        size = rng.choice((rng.randint(4, 30), rng.randint(4, 30), rng.randint(40, 300), rng.randint(400, 1400)))
        words = (phrase * (size // len(phrase) + 1))[:size]
        text = " ".join(words)
        prompts.append(f"{shared} {text}" if rng.random() < 0.2 else text)
    return prompts


def make_plans(count: int, seed: int, cancel_rate: float, prompt_pool: int = 48) -> list[Plan]:
    rng = random.Random(seed)
    prompts = make_prompts(rng, prompt_pool)
    stop_word_sets: tuple[tuple[str, ...], ...] = ((), (), (), (), ("the",), (" and", " of"))
    plans = []
    for i in range(count):
        delay = None
        if rng.random() < cancel_rate:
            # Some race the request's own arrival, most land mid-request, the tail after
            # completion (which must be harmless).
            when = rng.random()
            delay = (
                rng.uniform(0.0, 0.003)
                if when < 0.2
                else rng.uniform(0.003, 0.5)
                if when < 0.8
                else rng.uniform(0.5, 3.0)
            )
        plans.append(Plan(
            request_id=f"soak{seed}-{i:06d}",
            prompt=rng.choice(prompts),
            max_tokens=rng.choice((1, 4, 8, 16, 16, 32, 32, 64)),
            stream=rng.random() < 0.5,
            stop_words=rng.choice(stop_word_sets),
            stop_delay_s=delay,
        ))  # fmt: skip
    return plans
