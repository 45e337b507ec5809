"""The simulator: our engines, router and orchestrator in virtual time, at any scale.

What runs is the production code (the stub engine's scheduler, block accounting, leases,
pulls and cost model; the orchestrator's phases, router policies and conditional
disaggregation), on an asyncio loop whose clock only moves when every task waits
(`virtual_loop.py`). Engines are symbolic (no K/V bytes, `stub_engine/backing.py`) and pull
KV in process (`cluster.py`), so a run's timings are the cost model's alone.
"""
