"""``modal.functions``: the handles of functions and their calls, under Modal's module path."""

from warmboot.sdk.function import Function, FunctionCall, gather

__all__ = ["Function", "FunctionCall", "gather"]
