"""The HTTP gateway: a process of its own that speaks HTTP to the clients that exist (the OpenAI
SDKs, Triton's clients, curl) and the client protocol to a controller over ZeroMQ.

    http.py      the HTTP server's guards (header size and time, body size and time) and the
                 request/response helpers of a plain ASGI app
    app.py       the ASGI app: routing, bearer tokens, errors, metrics, client disconnects
    kserve.py    KServe v2 (the Open Inference Protocol): JSON and binary tensors
    openai.py    OpenAI-compatible completions and chat completions, whole or streamed
    errors.py    a meshserve error as each convention's status and body
    metrics.py   the gateway's own Prometheus metrics
    serve.py     running it: uvicorn (httptools, uvloop), TLS, several processes on one port

The gateway holds no state a client depends on: several gateways serve beside one controller,
and the controller's loop never parses HTTP.
"""
