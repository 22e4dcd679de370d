"""Outbound network for a container, attached after its snapshot point.

A container boots in a network namespace with loopback only, so nothing it opens while initialising
can end up in a snapshot (Modal behaves the same). At START, unless the function has
``block_network=True``, the worker attaches slirp4netns: a user-mode TCP/IP stack that gives the namespace a
tap device (10.0.2.100/24, gateway 10.0.2.2, DNS 10.0.2.3) and carries its connections through ordinary
sockets of the slirp4netns process. Chosen over a veth pair with NAT because it needs no host-wide change
(ip_forward, iptables rules) and, with ``--disable-host-loopback``, keeps the host's loopback services out
of reach. slirp4netns confines itself too (``--enable-sandbox``, ``--enable-seccomp``).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import time

from warmboot.errors import ContainerError, HostSetupError

#: How long slirp4netns may take to configure the namespace before the container's start fails.
READY_TIMEOUT = 10.0


class Network:
    """slirp4netns serving one container's network namespace; :meth:`close` detaches it."""

    def __init__(self, init_pid: int, *, timeout: float = READY_TIMEOUT):
        binary = shutil.which("slirp4netns")
        if binary is None:
            raise HostSetupError("slirp4netns is not installed; run `make setup` (it gives containers network)")
        ready_r, ready_w = os.pipe()
        # slirp4netns exits when this pipe's write end closes: with the container, or with this worker.
        self._exit_r, self._exit_w = os.pipe()
        os.set_inheritable(self._exit_w, False)
        try:
            self._proc = subprocess.Popen(
                [
                    # A mount namespace of its own, receiving the host's mount events but never sending any:
                    # slirp4netns's sandbox makes only "/" private (not its submounts) before it pivots and
                    # detaches the old root, so the unmounts of the host's shared submounts (the network
                    # namespaces `ip netns add` keeps in /run/netns, for one) propagated back and the host lost
                    # them at every container start.
                    "unshare",
                    "--mount",
                    "--propagation",
                    "slave",
                    "--",
                    binary,
                    "--configure",
                    "--mtu=65520",
                    "--disable-host-loopback",
                    "--enable-sandbox",
                    "--enable-seccomp",
                    f"--ready-fd={ready_w}",
                    f"--exit-fd={self._exit_r}",
                    str(init_pid),
                    "tap0",
                ],
                pass_fds=(ready_w, self._exit_r),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        finally:
            os.close(ready_w)
            os.close(self._exit_r)
        try:
            self._wait_ready(ready_r, timeout)
        finally:
            os.close(ready_r)

    def _wait_ready(self, ready_r: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([ready_r], [], [], max(left, 0))
            if ready and os.read(ready_r, 1) == b"1":
                return
            if ready or left <= 0:  # EOF: it exited; or it took too long
                self.close()
                assert self._proc.stderr is not None
                detail = self._proc.stderr.read().decode(errors="replace").strip()
                raise ContainerError(f"could not attach the container's network (slirp4netns: {detail or 'timeout'})")

    def close(self) -> None:
        """Stop serving the namespace (idempotent)."""
        with contextlib.suppress(OSError):
            os.close(self._exit_w)
        with contextlib.suppress(OSError):
            self._proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)
        if self._proc.stderr is not None:
            with contextlib.suppress(OSError):
                self._proc.stderr.close()
