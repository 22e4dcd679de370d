"""A process with state worth snapshotting, used by the engine tests.

Builds a dict (and optionally maps a file), says ``ready`` on its control-out pipe (fd 4), then answers
each line on its control-in pipe (fd 3) with a JSON line describing the state it holds.
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

control_in = os.fdopen(3, "rb", buffering=0)
control_out = os.fdopen(4, "wb", buffering=0)
control_out.write(b"ready\n")
for line in control_in:
    request = line.decode().strip()
    if request == "exit":
        break
    digest = hashlib.sha256(repr(sorted(table.items())[:1000]).encode()).hexdigest()
    reply = {
        "request": request,
        "pid_in_namespace": os.getpid(),
        "dict_len": len(table),
        "dict_digest": digest,
        "mapped_head": mapped[:16].decode(errors="replace") if mapped is not None else None,
        "ballast_len": len(ballast),
    }
    control_out.write(json.dumps(reply).encode() + b"\n")
