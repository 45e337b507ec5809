"""The OpenAI-compatible HTTP frontend (`disagg openai`): an ASGI app in front of Triton's
`ensemble`, over asyncio gRPC. protocol.py (request validation, chunks; pure), ensemble.py
(one gRPC stream per request, stop=true, errors -> OpenAI errors), app.py (Starlette routes,
SSE, disconnects), chat_template.py (messages -> prompt, as transformers renders them),
metrics.py (Prometheus text), server.py (the command, uvicorn).

A layer above text: it imports only wire and text, never serving or stub_engine; it meets
them only through Triton.
"""
