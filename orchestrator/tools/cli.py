"""`disagg`: one command for every tool of the project.

    disagg serve [--model-repository DIR] [--http-port N] ...   tritonserver, supervised
    disagg client "the cat sat on the" --max-tokens 32          stream one completion
    disagg deploy check|build|k8s FILE ...                      deployment files
    disagg bench | compare | overhead | cpu-per-token           benchmarks (BENCHMARKS.md)
    disagg soak | stress-bls                                    long checks
    disagg metrics [--url HOST:PORT]                            what the servers hold
    disagg openai [--triton-url HOST:PORT] [--port 9000]        OpenAI-compatible HTTP server

Each subcommand is the `main(argv)` of one module of `orchestrator.tools`, imported only
when it runs (the client does not pay for matplotlib); `disagg SUBCOMMAND --help` is that
module's own help.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

# subcommand -> (module in orchestrator.tools, or a dotted module path; one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("launch", "start tritonserver on a model repository, supervised (./scripts/serve)"),
    "client": ("client", "stream one completion through the ensemble over gRPC"),
    "deploy": ("deploy", "check a deployment file, build its repositories, write Kubernetes manifests"),
    "bench": ("loadgen", "load generator: concurrency sweeps, Poisson rates, JSON/CSV"),
    "compare": ("compare", "deployments side by side, phase sweeps, rate matching, plots"),
    "overhead": ("overhead", "our orchestrator vs a reference-style baseline vs a bare streamer"),
    "cpu-per-token": ("cpu_per_token", "CPU microseconds per generated token, per process"),
    "soak": ("soak", "thousands of mixed requests, stops and faults, then no-leak checks"),
    "stress-bls": ("stress_bls", "the BLS stub crash reproducer: fresh server per round"),
    "metrics": ("metrics", "print the disagg_* gauges a server holds"),
    "simulate": ("simulate", "a deployment file under a load in virtual time: no Triton, no GPU"),
    "fidelity": ("fidelity", "the simulator against the same deployment served on stubs, side by side"),
    "pareto": ("pareto", "aggregated vs disaggregated Pareto frontiers at GPU scale, simulated"),
    "plan": ("plan", "the deployment of a GPU budget with the best goodput per GPU under SLOs, simulated"),
    "openai": ("orchestrator.frontend.server", "OpenAI-compatible HTTP server in front of the ensemble"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "usage: disagg SUBCOMMAND [ARGS...]  (disagg SUBCOMMAND --help)\n\nsubcommands:\n" + "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"disagg: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    target = COMMANDS[name][0]
    module = importlib.import_module(target if "." in target else f"orchestrator.tools.{target}")
    sys.argv = [f"disagg {name}", *rest]  # argparse names the subcommand in its usage line
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
