"""The wire: what crosses between models, and nothing else. The bottom layer.

Owns the tensorrt_llm tensor contract as dataclasses (`contract`), the typed errors every
response carries (`errors`), typed model parameters (`params`), stop conditions that a
request carries (`stop_condition`) and the chained hashes that name KV blocks, on which
engines and the router must agree (`block_hash`). Imports only the standard library and
numpy.
"""
