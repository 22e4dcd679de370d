"""The HTTP gateway: every web endpoint's URL, served by uvicorn inside the server process.

- ``routes.py``: which endpoint a request is for (its label, from the path or the host name), and the labels of
  every running app;
- ``tokens.py``: proxy auth tokens (``warmboot token create``) for ``requires_proxy_auth=True`` endpoints;
- ``asgi.py``: the gateway's own ASGI app: routing, auth, error pages;
- ``exchange.py``: a request to an ASGI/WSGI/FastAPI endpoint, carried over the container's control pipes;
- ``proxy.py``: a request to a ``web_server`` endpoint, forwarded over TCP into the container's network namespace;
- ``serve.py``: uvicorn on a thread of its own, bound to ``WARMBOOT_GATEWAY_HOST``:``WARMBOOT_GATEWAY_PORT``.

Each request is an input of its function's pool, so scaling, ``max_containers``, ``@modal.concurrent`` and memory
snapshots apply to web traffic as to calls: a request that finds no container waits while one starts.
"""
