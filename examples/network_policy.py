"""Network inside containers: `warmboot deploy examples/network_policy.py`.

Containers have their own network. A function with a memory snapshot initialises with loopback only (no
connection can end up in a snapshot) and gets outbound network once it is running; `block_network=True`
keeps a function off the network entirely. Neither can reach services on the host's loopback.
"""

import socket

import warmboot as modal

app = modal.App("network-policy")


def can_resolve(name: str) -> bool:
    try:
        socket.getaddrinfo(name, 443)
    except OSError:
        return False
    return True


@app.cls(enable_memory_snapshot=True)
class Fetcher:
    @modal.enter(snap=True)
    def before_snapshot(self) -> None:
        self.online_while_snapshotting = can_resolve("pypi.org")

    @modal.method()
    def report(self) -> dict:
        return {"before snapshot": self.online_while_snapshotting, "now": can_resolve("pypi.org")}


@app.function(block_network=True)
def offline() -> bool:
    return can_resolve("pypi.org")
