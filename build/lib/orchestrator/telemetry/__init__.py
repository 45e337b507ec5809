"""What is measured: the metric registry (Triton's or in-memory), per-request and
per-engine measures and the request log line (`recorder`), and the holding gauges that
are the leak check (`gauges`).

May import: wire.
"""
