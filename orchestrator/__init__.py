"""Disaggregated LLM serving on Triton: the library behind every model in model_repository/.

Layers, bottom to top; a module imports only from its own layer or the ones below
(tests/unit/test_layers.py checks it, and that there is no import cycle):

    wire         the tensor contract, errors, parameters, stop conditions, KV block hashes
    text         tokenizers, streaming detokenization, pre/postprocessing
    telemetry    metric registry, per-request measures, holding gauges
    runtime      living inside Triton's python backend (tensors in/out, loops, sender thread)
    clients      reaching engines: BLS, loopback or remote gRPC
    routing      policies, pools, circuit breakers, prefix prediction
    serving      the orchestrator's request flow        | stub_engine  the stub engine
    ops, bench   deployment files, launch, access, supervisor | benchmark maths
    frontend     the OpenAI-compatible HTTP server in front of the ensemble (imports wire, text)
    sim          the simulator: serving + stub_engine in virtual time, Pareto sweeps, the planner
    tools        the `disagg` command: launcher, client, deploy, benchmarks, soak

`serving` and `stub_engine` sit side by side and never import each other.
"""
