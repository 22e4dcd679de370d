"""W4 (part of `make bench`): a FastAPI endpoint that embeds with MiniLM, through warmboot's HTTP gateway.

1. **Time to first byte with zero containers**: from sending ``POST /embed`` to the first byte of the response,
   with no container running: cold boot (the app run ephemerally: no snapshot) against restore (the deployed app
   redeployed unchanged: its memory snapshot, no container). Alternating, at least 5 runs each.
2. **Steady-state gateway overhead**: the same FastAPI app served directly by uvicorn on this machine (one
   process, httptools, as the gateway's own uvicorn) and through warmboot (a warm container,
   ``@modal.concurrent(max_inputs=32)``), in the same run, on its ``GET /ping`` route (the route does no work, so
   what is measured is the serving path): p50/p99 latency of sequential requests on one keep-alive connection,
   and requests per second with 16 connections from wrk (installed by `make setup`).

Targets (issue 11): p50 overhead <= 2 ms and throughput >= 0.5x the direct uvicorn's.
Writes docs/benchmarks/web-endpoints.{json,md}. Usage: `.venv/bin/python bench/web_endpoints.py [--runs N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from cold_starts import fresh_server, git_commit, machine, machine_line, stop_quietly, summary
from harness import console, deploy_app, ensure_model_volume, load, snapshot_records, stop_app

from warmboot.errors import NotFoundError
from warmboot.sdk import client

ROOT = Path(__file__).resolve().parent.parent
APP_FILE = ROOT / "bench" / "workloads" / "w4_web_embedder.py"
OUT_DIR = ROOT / "docs" / "benchmarks"
NAME = "bench-w4-web"
COLD_NAME = "bench-w4-web-cold"
TEXT = {"text": "what is the meaning of life?"}
LATENCY_REQUESTS = 2000
THROUGHPUT_SECONDS = 5.0
CLIENTS = 16


def first_byte(url: str) -> tuple[float, dict[str, Any]]:
    """Seconds from sending the request to its response's first byte (the status line), and the JSON body."""
    with httpx.Client(timeout=300) as http:
        started = time.perf_counter()
        with http.stream("POST", url + "/embed", json=TEXT) as response:
            seconds = time.perf_counter() - started
            body = json.loads(response.read())
    if response.status_code != 200:
        raise SystemExit(f"W4: POST {url}/embed answered {response.status_code}: {body}")
    return seconds, body


def run_once(kind: str, app: Any) -> dict[str, Any]:
    name = COLD_NAME if kind == "cold" else NAME
    result = deploy_app_with_urls(app, name=name, ephemeral=kind == "cold")
    try:
        seconds, body = first_byte(result["url"])
    finally:
        stop_app(result["app_id"])
    return {"seconds": seconds, "body": body}


def deploy_app_with_urls(app: Any, *, name: str, ephemeral: bool) -> dict[str, Any]:
    app_id = deploy_app(APP_FILE, app, name=name, ephemeral=ephemeral)
    urls = [e["url"] for e in client.request("web_list") if e["app_id"] == app_id]
    if not urls or urls[0] is None:
        raise SystemExit("W4: the deployed app has no web URL; is the gateway running? see the server log")
    return {"app_id": app_id, "url": urls[0]}


def prepare(app: Any) -> dict[str, Any]:
    stop_quietly(NAME)
    stop_quietly(COLD_NAME)
    for record in snapshot_records(NAME):
        with contextlib.suppress(NotFoundError):
            client.request("snapshot_rm", key=record["key"])
    result = deploy_app_with_urls(app, name=NAME, ephemeral=False)
    seconds, reference = first_byte(result["url"])
    stop_app(result["app_id"])
    records = [r for r in snapshot_records(NAME) if r["state"] == "ok"]
    if not records:
        raise SystemExit(f"W4: the first request made no memory snapshot; see `warmboot logs {NAME}`")
    size_mb = records[0]["size_bytes"] / 1e6
    console.print(f"[bold]W4[/] first request {seconds:.2f} s (cold boot + snapshot of {size_mb:.0f} MB)")
    return {"reference": reference, "first_request_s": round(seconds, 3)}


# ----- steady state ------------------------------------------------------------------------------------------


def latencies(url: str, n: int) -> list[float]:
    with httpx.Client(timeout=60) as http:
        for _ in range(50):  # warm the connection and both ends
            http.get(url)
        out = []
        for _ in range(n):
            started = time.perf_counter()
            response = http.get(url)
            out.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise SystemExit(f"W4: GET {url} answered {response.status_code}")
    return out


def throughput(url: str) -> float:
    """Requests per second with wrk (C, two threads, 16 connections): a Python client tops out first."""
    out = subprocess.run(
        ["wrk", "-t2", f"-c{CLIENTS}", f"-d{THROUGHPUT_SECONDS:g}s", url],
        capture_output=True, text=True, check=True, timeout=THROUGHPUT_SECONDS + 60,
    ).stdout  # fmt: skip
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out)
    if found is None or errors is not None:
        raise SystemExit(f"W4: wrk against {url} reported errors or no rate:\n{out}")
    return float(found.group(1))


def throughput_python(url: str) -> float:
    """The same with 16 concurrent httpx clients in one Python process (client-bound: for comparison only)."""
    return asyncio.run(_throughput(url, THROUGHPUT_SECONDS, CLIENTS))


async def _throughput(url: str, seconds: float, clients: int) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            response = await http.get(url)
            response.raise_for_status()
            done += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await asyncio.gather(*(http.get(url) for _ in range(clients)))  # open the connections first
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(worker(http) for _ in range(clients)))
        return done / (time.perf_counter() - started)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def direct_uvicorn() -> Any:
    """The same FastAPI app (``make_web``), served by uvicorn alone in a process of its own."""
    port = free_port()
    code = (
        "import sys, uvicorn; sys.path.insert(0, sys.argv[1]); import w4_web_embedder as w4; "
        "uvicorn.run(w4.make_web(), host='127.0.0.1', port=int(sys.argv[2]), http='httptools', "
        "log_level='warning', access_log=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(APP_FILE.parent), str(port)])
    url = f"http://127.0.0.1:{port}/ping"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("W4: the direct uvicorn server did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def steady_state(app: Any) -> dict[str, Any]:
    result = deploy_app_with_urls(app, name=NAME, ephemeral=False)
    try:
        through = result["url"] + "/ping"
        httpx.get(through, timeout=300).raise_for_status()  # a warm container (restored)
        with direct_uvicorn() as direct:
            out: dict[str, Any] = {}
            for label, url in (("direct", direct), ("warmboot", through), ("direct_again", direct)):
                lat = latencies(url, LATENCY_REQUESTS)
                out[label] = {
                    "p50_ms": round(statistics.median(lat) * 1000, 3),
                    "p99_ms": round(sorted(lat)[int(len(lat) * 0.99) - 1] * 1000, 3),
                    "rps": round(throughput(url), 1),
                    "rps_python_client": round(throughput_python(url), 1),
                }
                console.print(f"  {label:>12}: p50 {out[label]['p50_ms']:.2f} ms, p99 {out[label]['p99_ms']:.2f} ms, "
                              f"{out[label]['rps']:.0f} requests/s")  # fmt: skip
    finally:
        stop_app(result["app_id"])
    direct_p50 = statistics.mean([out["direct"]["p50_ms"], out["direct_again"]["p50_ms"]])
    direct_rps = statistics.mean([out["direct"]["rps"], out["direct_again"]["rps"]])
    out["overhead_p50_ms"] = round(out["warmboot"]["p50_ms"] - direct_p50, 3)
    out["throughput_ratio"] = round(out["warmboot"]["rps"] / direct_rps, 3)
    direct_py = statistics.mean([out["direct"]["rps_python_client"], out["direct_again"]["rps_python_client"]])
    out["throughput_ratio_python_client"] = round(out["warmboot"]["rps_python_client"] / direct_py, 3)
    return out


# ----- report --------------------------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    ttfb, steady = results["ttfb"], results["steady"]
    cold, restore = ttfb["cold"], ttfb["restore"]
    lines = [
        "# W4: a FastAPI embedding endpoint through the HTTP gateway",
        "",
        f"Measured {results['date']} on {machine_line(results['machine'])} (commit {results['commit']}), by "
        "`bench/web_endpoints.py` (part of `make bench`).",
        "",
        "## Time to first byte with zero containers (POST /embed, page cache warm)",
        "",
        "| start | median | p95 | runs |",
        "|---|---:|---:|---:|",
        f"| cold boot | {cold['median_s'] * 1000:.0f} ms | {cold['p95_s'] * 1000:.0f} ms | {cold['n']} |",
        f"| memory-snapshot restore | {restore['median_s'] * 1000:.0f} ms | {restore['p95_s'] * 1000:.0f} ms | "
        f"{restore['n']} |",
        "",
        f"Speed-up: {cold['median_s'] / restore['median_s']:.1f}x.",
        "",
        f"## Steady state: GET /ping, {LATENCY_REQUESTS} sequential requests on one connection (httpx); "
        f"{CLIENTS} connections for {THROUGHPUT_SECONDS:g} s (wrk, and 16 httpx clients for comparison)",
        "",
        "| served by | p50 | p99 | requests/s (wrk) | requests/s (httpx clients) |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, title in (("direct", "uvicorn directly"), ("warmboot", "warmboot gateway + container"),
                         ("direct_again", "uvicorn directly (again)")):  # fmt: skip
        s = steady[label]
        lines.append(
            f"| {title} | {s['p50_ms']:.2f} ms | {s['p99_ms']:.2f} ms | {s['rps']:.0f} | {s['rps_python_client']:.0f} |"
        )
    lines += [
        "",
        f"Gateway overhead at p50: **{steady['overhead_p50_ms']:.2f} ms** (target <= 2 ms); throughput "
        f"**{steady['throughput_ratio']:.2f}x** the direct server's under wrk (target >= 0.5x; "
        f"{steady['throughput_ratio_python_client']:.2f}x with Python clients, which saturate before either server).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed cold and restore starts each (default 5)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/web_endpoints.py runs containers: run it as root")
    fresh_server()
    ensure_model_volume()
    app = load(APP_FILE)
    started = time.perf_counter()
    prepared = prepare(app)
    runs: dict[str, list[float]] = {"cold": [], "restore": []}
    for i in range(args.runs):
        for kind in ("cold", "restore"):
            run = run_once(kind, app)
            if run["body"] != prepared["reference"]:
                raise SystemExit(f"W4 {kind} run {i + 1}: the embedding differs from the first request's")
            runs[kind].append(run["seconds"])
            console.print(f"  W4 {kind:>7} run {i + 1}/{args.runs}: first byte after {run['seconds'] * 1000:.0f} ms")
    steady = steady_state(app)
    results = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "commit": git_commit(),
        "elapsed_s": round(time.perf_counter() - started, 1),
        "prepare": prepared,
        "ttfb": {kind: summary(values) for kind, values in runs.items()},
        "steady": steady,
    }
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "web-endpoints.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (OUT_DIR / "web-endpoints.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
