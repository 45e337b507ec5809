"""Benchmark maths: workloads (ISL/OSL distributions, arrivals), latency and throughput
statistics, context:generation rate matching. The top layer, with `ops`.

May import: wire, text.
"""
