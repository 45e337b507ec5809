"""Routing policy and engine state: policies behind one Protocol with a registry
(`policies`), engine pools and load (`pool`), circuit breakers (`health`), the router's
prediction of each engine's cached blocks (`prefix_index`). Pure logic, no I/O.

May import: wire, clients (endpoint names).
"""
