"""`make demo`: the reference's Embedder, cold boot vs memory-snapshot restore, to the first embedding.

1. copies all-MiniLM-L6-v2 into the `sentence-transformers-models` volume (once);
2. deploys examples/sentence_transformers_embedder.py (the image build is cached after the first run);
3. times `Embedder().run.remote(...)` with no warm container, RUNS times each:
   - cold boot: the app run ephemerally (as `warmboot run` does), which never snapshots;
   - restore: the deployed app, whose first cold start made the memory snapshot;
4. times the same call on the warm container the last restore left, and checks the embeddings agree;
5. prints the table (`warmboot dashboard` shows the same calls, by start kind).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness import (
    console,
    deploy_app,
    ensure_model_volume,
    load,
    median,
    snapshot_records,
    stop_app,
    timed,
)
from rich.table import Table

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sentence_transformers_embedder.py"
SENTENCES = ["what is the meaning of life?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="timed cold starts of each kind (default 3)")
    runs = parser.parse_args().runs

    ensure_model_volume()
    app = load(EXAMPLE)
    embedder = app.registered["Embedder"]
    call = lambda: embedder().run.remote(sentences=SENTENCES)  # noqa: E731

    console.print("[bold]Deploying the Embedder[/] (the first build of its image installs torch and friends)")
    deploy_app(EXAMPLE, app, name=app.name)
    console.print("First call of the deployed app: a cold boot that also makes the memory snapshot ...")
    first_s, reference = timed(call)
    console.print(f"  {first_s:.2f} s (cold boot + snapshot creation)")

    cold, restored = [], []
    for i in range(runs):
        app_id = deploy_app(EXAMPLE, app, name=f"{app.name}-cold", ephemeral=True)
        seconds, result = timed(call)
        stop_app(app_id)
        cold.append(seconds)
        console.print(f"  cold boot {i + 1}/{runs}: {seconds:.2f} s to the first embedding")
        assert abs(result - reference).max() < 1e-4, "cold boot gave another embedding"
    for i in range(runs):
        stop_app(app.name)  # its containers are gone before the clock starts
        deploy_app(EXAMPLE, app, name=app.name)  # unchanged redeploy: no containers, same snapshot
        seconds, result = timed(call)
        restored.append(seconds)
        console.print(f"  restore {i + 1}/{runs}: {seconds:.2f} s to the first embedding")
        assert abs(result - reference).max() < 1e-4, "restored container gave another embedding"
    warm = []
    for _ in range(runs):  # the restored container is still there: what every call after the first costs
        seconds, result = timed(call)
        warm.append(seconds)
    console.print(f"  warm container: {median(warm) * 1000:.0f} ms (median of {runs})")
    stop_app(app.name)

    records = [r for r in snapshot_records(app.name) if r["state"] == "ok"]
    size = f"{records[0]['size_bytes'] / 1e6:.0f} MB" if records else "?"
    made = f"{records[0]['create_seconds']:.2f} s" if records else "?"
    table = Table(title=f"Embedder (all-MiniLM-L6-v2 on CPU): time to the first embedding, median of {runs}")
    table.add_column("cold start")
    table.add_column("median", justify="right")
    table.add_column("min", justify="right")
    table.add_column("max", justify="right")
    table.add_row("boot (imports + model load)", f"{median(cold):.2f} s", f"{min(cold):.2f} s", f"{max(cold):.2f} s")
    table.add_row(
        "restore from memory snapshot",
        f"{median(restored):.2f} s",
        f"{min(restored):.2f} s",
        f"{max(restored):.2f} s",
    )
    table.add_row("warm container (no start)", f"{median(warm):.3f} s", f"{min(warm):.3f} s", f"{max(warm):.3f} s")
    table.add_section()
    table.add_row("speed-up", f"{median(cold) / median(restored):.1f}x", "", "")
    table.add_row("snapshot", f"{size}, made in {made}", "", "")
    console.print(table)
    print(f"cold_median_s={median(cold):.3f} restore_median_s={median(restored):.3f}", file=sys.stdout)


if __name__ == "__main__":
    main()
