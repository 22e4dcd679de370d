"""``Secret``: environment variables kept out of the app's code."""

from __future__ import annotations

from warmboot import validation


class Secret:
    """Environment variables for containers, from a dict or from a named secret on the server.

    Create a named one with ``warmboot secret create NAME KEY=VALUE ...``.
    """

    def __init__(self, *, name: str | None = None, values: dict[str, str] | None = None):
        self.name = name
        self.values = values

    @classmethod
    def from_dict(cls, values: dict[str, str]) -> Secret:
        return cls(values=validation.environment("Secret.from_dict()", values))

    @classmethod
    def from_name(cls, name: str) -> Secret:
        return cls(name=validation.name("secret", name))

    def to_spec(self) -> dict[str, object]:
        return {"name": self.name} if self.name else {"values": self.values}

    def __repr__(self) -> str:
        return f"Secret.from_name({self.name!r})" if self.name else f"Secret.from_dict(<{len(self.values or {})} keys>)"
