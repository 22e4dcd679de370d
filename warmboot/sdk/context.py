"""What a function can ask about the call it is running, inside its container.

The runtime sets :data:`CALL_ID` around each input it runs (in the input's thread, or in its asyncio task), so
concurrent inputs each see their own.
"""

from __future__ import annotations

from contextvars import ContextVar

#: The id of the call being run in this thread or task ("fc-..."), or None outside a call.
CALL_ID: ContextVar[str | None] = ContextVar("warmboot_call_id", default=None)


def current_call_id() -> str | None:
    """The id of the call this code runs for (``modal.current_function_call_id()``), or None outside one."""
    return CALL_ID.get()
