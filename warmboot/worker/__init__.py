"""The worker: starts containers, checkpoints them with CRIU and restores them.

- :mod:`warmboot.worker.container` starts a process tree in its own namespaces on its own overlay root, with
  caller-owned pipes; :mod:`warmboot.worker.sandbox` holds what confines it (root filesystem, init,
  capabilities, seccomp, network).
- :mod:`warmboot.worker.snapshot` checkpoints a container into a published snapshot and restores copies of it.
- :mod:`warmboot.worker.runner` drives a function container through its phases (boot, snapshot point, start, calls).
- :mod:`warmboot.worker.images` builds images (root filesystems as cached layers, OCI layout, registry pulls).
- :mod:`warmboot.worker.gpus` and :mod:`warmboot.worker.cuda_checkpoint`: GPU devices and GPU memory checkpoints.
- :mod:`warmboot.worker.criu` runs the CRIU binary and reads its log; :mod:`warmboot.worker.host` fingerprints
  this machine (CPU, kernel, CRIU) so snapshots move only where they fit.
- :mod:`warmboot.worker.netinfo`, :mod:`warmboot.worker.cgroups`, :mod:`warmboot.worker.runtime_lib`: open
  connections, resource limits, and the runtime layer (warmboot's runtime, the init, a minimal /dev).
"""
