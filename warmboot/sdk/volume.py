"""``Volume``: a named directory that persists across containers and deploys."""

from __future__ import annotations

from warmboot import validation


class Volume:
    """A persistent directory, mounted at a path of your choice in containers.

    Example::

        vol = warmboot.Volume.from_name("models", create_if_missing=True)

        @app.function(volumes={"/models": vol})
        def f(): ...
    """

    def __init__(self, name: str, create_if_missing: bool):
        self.name = validation.name("volume", name)
        self.create_if_missing = create_if_missing

    @classmethod
    def from_name(cls, name: str, *, create_if_missing: bool = False) -> Volume:
        """Refer to the volume ``name``; it must exist at deploy time unless ``create_if_missing``."""
        return cls(name, create_if_missing)

    def commit(self) -> None:
        """Make writes visible to other containers. Volumes here are host directories: writes already are."""

    def reload(self) -> None:
        """See other containers' committed writes. Volumes here are host directories: they already do."""

    def __repr__(self) -> str:
        return f"Volume({self.name!r})"
