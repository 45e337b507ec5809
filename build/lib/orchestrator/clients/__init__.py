"""How the orchestrator reaches engines: the client protocol and its in-process fake
(`engine_client`), BLS (`bls`), another server's gRPC (`remote`), endpoint names and the
dispatch between them (`endpoints`, `dispatch`).

May import: wire, runtime.
"""
