"""The stub engine: a CPU stand-in for a TensorRT-LLM engine model with the same
tensor contract (in-flight batching, paged KV cache, KV handed over as real bytes,
signed handoffs, a cost model for GPU time, fault injection). Beside `serving`, never
imported by it: they meet only through Triton and the wire contract.

May import: wire, telemetry, runtime.
"""
