"""`pdserve proxy`: routes OpenAI requests through prefill + decode instances (disagg) or to one
standalone instance (standard). No torch: it only moves bytes.

settings.py   ProxySettings (frozen)            command.py     the `proxy` subcommand (uvicorn)
instances.py  the instance table, leases        registry.py    ZMQ ROUTER: Register heartbeats, eviction
health.py     static instances: /health, /kv_info   routing.py  round-robin, least-loaded pickers
bodies.py     the two halves' bodies, kv params  upstream.py    pooled aiohttp calls, retryable failures
orchestrate.py standard / READ / WRITE, retries, fallback   relay.py  the ASGI endpoint, SSE relay
metrics.py    Prometheus metrics                 errors.py      OpenAI-style errors
app.py        the ASGI app: hot paths + FastAPI admin routes (/health /instances /metrics /v1/models)
responses.py  stored /v1/responses: GET and previous_response_id go to the instance that has it
"""
