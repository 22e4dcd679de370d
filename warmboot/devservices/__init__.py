"""Real services started on loopback for tests, benchmarks and one-machine trials (never by the server itself)."""
