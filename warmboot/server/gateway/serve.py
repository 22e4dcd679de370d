"""uvicorn on a thread of its own, serving the gateway (its own event loop; the server's socket API is apart)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import threading
from typing import Any

from warmboot.errors import ServerError

log = logging.getLogger("warmboot.gateway")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8700


def settings() -> tuple[str, int]:
    """Where the gateway listens: ``WARMBOOT_GATEWAY_HOST`` (127.0.0.1) and ``WARMBOOT_GATEWAY_PORT`` (8700; 0 picks
    a free port)."""
    host = os.environ.get("WARMBOOT_GATEWAY_HOST", DEFAULT_HOST)
    raw = os.environ.get("WARMBOOT_GATEWAY_PORT", str(DEFAULT_PORT))
    try:
        port = int(raw)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise ServerError(f"WARMBOOT_GATEWAY_PORT={raw!r} is not a TCP port number (0-65535)") from None
    return host, port


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class GatewayServer:
    """Binds the gateway's socket at once (so its port is known, and a taken port is a clear error), then serves
    it with uvicorn on a daemon thread until :meth:`stop`."""

    def __init__(self, app: Any, host: str, port: int):
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit it: without it, a response written as headers then body waits out the
        # client's delayed ACK (40 ms a request measured here).
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise ServerError(
                f"the HTTP gateway cannot listen on {host}:{port} ({exc.strerror}); set WARMBOOT_GATEWAY_PORT to a "
                "free port (0 picks one) or WARMBOOT_GATEWAY_HOST to another address"
            ) from None
        self._sock.listen(1024)
        self.host = host
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            http="httptools",
            ws="websockets-sansio",
            timeout_graceful_shutdown=5,
            proxy_headers=False,  # the gateway is the edge: no proxy in front of it to trust
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="gateway", daemon=True)

    @property
    def base_url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", "::"):
            host = os.environ.get("WARMBOOT_GATEWAY_PUBLIC_HOST") or socket.gethostname()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._sock]))

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
