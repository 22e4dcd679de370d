"""Proxy auth tokens: what a ``requires_proxy_auth=True`` endpoint asks of each request.

A token is an id (``wk-...``) and a secret (``ws-...``), created with ``warmboot token create``; the secret is
shown once and stored only as its SHA-256. A request carries them in the ``Modal-Key`` and ``Modal-Secret``
headers, as Modal's proxy auth does.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from typing import Any

from warmboot.errors import NotFoundError
from warmboot.server.db import Database

KEY_HEADER = b"modal-key"
SECRET_HEADER = b"modal-secret"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS proxy_tokens (
    token_id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class ProxyTokens:
    """The tokens table; :meth:`verify` is called once per request to a protected endpoint."""

    def __init__(self, connection: Database, lock: threading.Lock):
        self._db = connection
        self._lock = lock
        with self._lock:
            self._db.executescript(_SCHEMA)
        self._cache: dict[str, str] = {}
        self._load()

    def _load(self) -> None:
        with self._lock:
            rows = self._db.execute("SELECT token_id, secret_sha256 FROM proxy_tokens").fetchall()
        self._cache = dict(rows)

    def create(self) -> dict[str, Any]:
        token_id = "wk-" + secrets.token_hex(8)
        secret = "ws-" + secrets.token_urlsafe(24)
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO proxy_tokens (token_id, secret_sha256, created_at) VALUES (?, ?, ?)",
                (token_id, _digest(secret), time.time()),
            )
        self._load()
        return {"token_id": token_id, "token_secret": secret}

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT token_id, created_at FROM proxy_tokens ORDER BY created_at").fetchall()
        return [{"token_id": token_id, "created_at": created} for token_id, created in rows]

    def delete(self, token_id: str) -> None:
        with self._lock, self._db:
            deleted = self._db.execute("DELETE FROM proxy_tokens WHERE token_id = ?", (token_id,)).rowcount
        if not deleted:
            raise NotFoundError(f"no proxy auth token {token_id!r}; `warmboot token list` shows them")
        self._load()

    def verify(self, token_id: str | None, secret: str | None) -> bool:
        if not token_id or not secret:
            return False
        expected = self._cache.get(token_id)
        return expected is not None and hmac.compare_digest(expected, _digest(secret))
