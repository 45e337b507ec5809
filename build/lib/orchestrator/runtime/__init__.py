"""How our python models live inside Triton 2.51's python backend stub: tensors in
and out (`triton_io`), each model's own event loop thread, the response sender thread
(`outbox`), the BLS iterator fence, the stuck-loop watchdog, this server's own address.

May import: wire, telemetry.
"""
