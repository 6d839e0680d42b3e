"""`python -m serve`: an OpenAI-compatible HTTP server over the InternVL engine (docs/SERVE.md).

    cli.py         flags (vLLM's names), start-up, graceful shutdown
    app.py         FastAPI routes, auth, error bodies
    protocol.py    request models and OpenAI wire-format helpers
    completions.py sampling params from requests; outputs -> responses and SSE chunks
    bridge.py      the engine thread <-> asyncio
    media.py       image URL policy and fetching
    metrics.py     Prometheus

The HTTP layer knows nothing about JAX: it talks to the engine through `add_request`, `abort` and
the outputs' sink.
"""
