"""`lorakit serve`: an OpenAI-compatible HTTP server over `lorakit.serve.Engine`, as vLLM splits it: the
engine knows nothing of HTTP; this thin layer maps the OpenAI API onto it.

    app.py            the routes                 schemas.py   request bodies (OpenAI's field names)
    generation.py     requests -> engine, back   responses.py response and stream-chunk JSON
    errors.py         OpenAI-shaped errors       auth.py      the API key
    limits.py         body size, concurrency     metrics.py   Prometheus metrics
    adapters_root.py  run-time load paths        server.py    `lorakit serve`, a server on a thread
    playground.html   the side-by-side page      config.py    the command's options

Importing this package is light; FastAPI and uvicorn are imported when a server is built.
"""
