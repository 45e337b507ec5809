"""The project's tools, one command (`disagg`, `cli.py`) over all of them: the server
launcher and supervisor loop, the gRPC client, the deployment tool, load generation,
benchmarks, the soak and the BLS stress reproducer, and their library halves that the
tests share (a real tritonserver fixture, repository derivation, gauges). The top layer.

May import: every layer.
"""
