"""The dashboard's login token: made once per home (``dashboard.token``, root-only), shown by
``warmboot dashboard``, exchanged for a cookie on first use. Every page and API call needs one or the other."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

COOKIE = "warmboot_dashboard"
TOKEN_FILE = "dashboard.token"


class DashboardAuth:
    def __init__(self, home: Path):
        self._path = home / TOKEN_FILE
        self._token = self._load() or self.renew()

    def _load(self) -> str | None:
        try:
            token = self._path.read_text().strip()
        except FileNotFoundError:
            return None
        return token if len(token) >= 32 else None

    @property
    def token(self) -> str:
        return self._token

    def renew(self) -> str:
        """A new token; the old one (and every cookie made from it) stops working."""
        token = secrets.token_urlsafe(32)
        tmp = self._path.with_name(self._path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.replace(tmp, self._path)
        self._token = token
        return token

    def valid(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self._token.encode())
