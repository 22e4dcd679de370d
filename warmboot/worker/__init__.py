"""The worker: starts containers, checkpoints them with CRIU and restores them.

- :mod:`warmboot.worker.container` starts a process tree in its own namespaces, with caller-owned pipes.
- :mod:`warmboot.worker.snapshot` checkpoints a container into a published snapshot and restores copies of it.
- :mod:`warmboot.worker.criu` runs the CRIU binary and reads its log.
- :mod:`warmboot.worker.host` fingerprints this machine (CPU, kernel, CRIU) so snapshots move only where they fit.
"""
