"""Open network connections of a container's processes, read from /proc (no extra tools needed).

A memory snapshot cannot carry a live TCP connection or a connected UDP socket into its copies (every copy
would claim the same peer), so the worker looks before it checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct

_TCP_LISTEN = "0A"
_TABLES = ("tcp", "tcp6", "udp", "udp6")


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def _address(hex_addr: str) -> str:
    ip_hex, port_hex = hex_addr.split(":")
    port = int(port_hex, 16)
    raw = bytes.fromhex(ip_hex)
    if len(raw) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, raw[::-1])}:{port}"
    # /proc prints IPv6 as four little-endian 32-bit words.
    words = struct.unpack("<4I", raw)
    return f"[{socket.inet_ntop(socket.AF_INET6, struct.pack('>4I', *words))}]:{port}"


def open_connections(pids: list[int]) -> list[str]:
    """Connections held by these processes (a container's): ``"tcp 10.0.0.5:5432 (local ...)"`` strings."""
    pid = pids[0]
    inodes: set[str] = set()
    for p in pids:
        inodes |= _socket_inodes(p)
    if not inodes:
        return []
    found = []
    for table in _TABLES:
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if inode not in inodes:
                continue
            if table.startswith("tcp") and state == _TCP_LISTEN:
                continue
            if table.startswith("udp") and int(remote.split(":")[1], 16) == 0:
                continue  # an unconnected UDP socket has no peer to lose
            found.append(f"{table.rstrip('6')} {_address(remote)} (local {_address(local)})")
    return found
