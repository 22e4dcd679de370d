"""The Linux capabilities a function container keeps.

The container's root is the host's root (no user namespace; see docs/security.md), so every capability it
keeps is a real host privilege, limited only by the namespaces, the mount tree and the seccomp filter around it.
The starting point is Docker's default set; from it we drop what lets such a root reach outside its sandbox,
and what no function needs. Everything not in :data:`ALLOWED` is removed from the bounding set by the init
(``init.c``), so no ``execve`` (setuid binaries, file capabilities) can bring it back.

Docker's default set, and what we do with each:

- ``chown``, ``dac_override``, ``fowner``, ``fsetid``: kept. Root owning and writing its own files (``pip`` and
  ``apt`` in the image's writable layer, volumes). They act only on files the mount tree shows; volumes are
  mounted ``nosuid,nodev``, so a setuid file or device node made in one gains nothing inside a container.
- ``kill``: kept. Signals reach only processes of the container's own PID namespace.
- ``setuid``, ``setgid``: kept. Dropping to an unprivileged user (servers, ``su``) inside the container.
- ``setpcap``: kept. Lets a program drop capabilities from its own bounding and inheritable sets; it cannot add
  any above the bounding set.
- ``net_bind_service``: kept. Ports below 1024 in the container's own network namespace.
- ``sys_chroot``: kept. ``chroot`` inside a root that is ``pivot_root``'ed with the old root detached has no
  ``..`` above it to climb; some build tools use it.
- ``audit_write``: kept. Writing user records to the audit log (``login``-style tools); reads are not allowed.
- ``mknod``: DROPPED. With no devices cgroup here, a node such as ``/dev/sda``'s would open the host's disk.
  FIFOs and sockets (``mkfifo``) need no capability and still work.
- ``net_raw``: DROPPED. Raw and packet sockets forge traffic (ARP/ICMP spoofing on the container's link).
- ``setfcap``: DROPPED. Setting file capabilities on a file in a volume would plant a privileged binary on the
  host's side of the volume; no function needs it.

Never held (the issue forbids them; none is in Docker's set either): ``sys_admin`` (mount, namespaces, most of
the kernel), ``sys_module``, ``sys_ptrace``, ``net_admin``, ``sys_rawio``, ``dac_read_search``
(``open_by_handle_at`` walks the host's filesystems: the "shocker" escape).
"""

from __future__ import annotations

# Names as the init takes them in ``--caps`` (lower case, no ``cap_`` prefix), in kernel bit order.
ALLOWED: tuple[str, ...] = (
    "chown",
    "dac_override",
    "fowner",
    "fsetid",
    "kill",
    "setgid",
    "setuid",
    "setpcap",
    "net_bind_service",
    "sys_chroot",
    "audit_write",
)

# Held by Docker's default set, removed here (see the module docstring for why).
DROPPED_FROM_DOCKER: tuple[str, ...] = ("mknod", "net_raw", "setfcap")

# The list: a container must never hold any of these.
FORBIDDEN: tuple[str, ...] = ("sys_admin", "sys_module", "sys_ptrace", "net_admin", "sys_rawio", "dac_read_search")

# Kernel bit numbers (linux/capability.h), for reading /proc/PID/status masks.
NUMBERS: dict[str, int] = {
    "chown": 0,
    "dac_override": 1,
    "dac_read_search": 2,
    "fowner": 3,
    "fsetid": 4,
    "kill": 5,
    "setgid": 6,
    "setuid": 7,
    "setpcap": 8,
    "net_bind_service": 10,
    "net_admin": 12,
    "net_raw": 13,
    "sys_module": 16,
    "sys_rawio": 17,
    "sys_chroot": 18,
    "sys_ptrace": 19,
    "sys_admin": 21,
    "mknod": 27,
    "audit_write": 29,
    "setfcap": 31,
}


def caps_argument() -> str:
    """The ``--caps`` value for the init: ``chown,dac_override,...``."""
    return ",".join(ALLOWED)


def mask(names: tuple[str, ...] = ALLOWED) -> int:
    """The capability bit mask of ``names``, as ``CapEff``/``CapBnd`` in ``/proc/PID/status`` show it (hex)."""
    return sum(1 << NUMBERS[name] for name in names)
