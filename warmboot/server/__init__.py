"""The control plane: the local server that deploys apps, queues inputs and scales containers.

- :mod:`state`: apps and secrets in SQLite under ``WARMBOOT_HOME``;
- :mod:`pool`: one pool of containers per function, with its input queue and scaling rules;
- :mod:`logs`: per-app log files and live subscribers;
- :mod:`daemon`: the root-only Unix-socket API the SDK and CLI talk to.
"""
