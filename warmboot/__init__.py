"""warmboot: serverless Python functions on your own machines, with memory-snapshot cold starts."""

__version__ = "0.1.0"
