"""A process with state worth snapshotting, used by the engine tests.

Builds a dict (and optionally maps a file), says ``ready`` on its control-out pipe (fd 4), then answers
each line on its control-in pipe (fd 3) with a JSON line describing the state it holds. A line that starts
with one of the commands below also runs it, and its outcome is the reply's ``result``:

    status              NoNewPrivs, Seccomp and the capability masks from /proc/self/status
    mounts              the mount points of its mount namespace (/proc/self/mountinfo)
    exists PATH         whether PATH exists, as the container sees it
    read PATH           PATH's text, or null when it does not exist
    write PATH TEXT     write TEXT to PATH (the directories above it must exist)
    remove PATH         delete the file PATH
    map PATH            keep PATH mapped from now on too (the replies' ``more_mapped_heads`` end with its head)
"""

import argparse
import hashlib
import json
import mmap
import os

parser = argparse.ArgumentParser()
parser.add_argument("--dict-size", type=int, default=1000)
parser.add_argument("--map", help="a file to keep mapped")
parser.add_argument("--fill-mb", type=int, default=0, help="MB of touched memory to hold")
opts = parser.parse_args()

table = {i: f"value-{i}" for i in range(opts.dict_size)}
mapped = None
if opts.map:
    with open(opts.map, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
ballast = bytearray(os.urandom(1024)) * (opts.fill_mb * 1024) if opts.fill_mb else b""


def status():
    fields = ("NoNewPrivs", "Seccomp", "CapEff", "CapPrm", "CapBnd")
    with open("/proc/self/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f) if k in fields}


def mounts():
    """``[mount point, filesystem type]`` of each mount (mountinfo: fields, then `` - TYPE SOURCE OPTIONS``)."""
    with open("/proc/self/mountinfo") as f:
        return [[line.split()[4], line.split(" - ", 1)[1].split()[0]] for line in f]


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


more_mapped = []


def map_file(path):
    with open(path, "rb") as f:
        more_mapped.append(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ))
    return True


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return True


COMMANDS = {
    "status": lambda: status(),
    "mounts": lambda: mounts(),
    "exists": lambda path: os.path.exists(path),
    "read": read,
    "write": write,
    "remove": lambda path: os.unlink(path) or True,
    "map": map_file,
}

control_in = os.fdopen(3, "rb", buffering=0)
control_out = os.fdopen(4, "wb", buffering=0)
control_out.write(b"ready\n")
for line in control_in:
    request = line.decode().strip()
    if request == "exit":
        break
    outcome = {}
    name, *args = request.split(" ", 2)
    if name in COMMANDS:  # first, so the reply shows the state it leaves
        try:
            outcome["result"] = COMMANDS[name](*args)
        except OSError as exc:
            outcome["error"] = f"{type(exc).__name__}: {exc}"
    digest = hashlib.sha256(repr(sorted(table.items())[:1000]).encode()).hexdigest()
    reply = {
        "request": request,
        "pid_in_namespace": os.getpid(),
        "dict_len": len(table),
        "dict_digest": digest,
        "mapped_head": mapped[:16].decode(errors="replace") if mapped is not None else None,
        "ballast_len": len(ballast),
        "more_mapped_heads": [m[:16].decode(errors="replace") for m in more_mapped],
        **outcome,
    }
    control_out.write(json.dumps(reply).encode() + b"\n")
