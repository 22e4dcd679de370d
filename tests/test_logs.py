"""App logs: rotation at a size limit, and readers that follow a log across a rotation (real files, a thread)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from warmboot.server.logs import LogBook


def test_log_rotates_at_its_limit_and_keeps_one_old_file(tmp_path: Path) -> None:
    book = LogBook(tmp_path, max_bytes=1000)
    for i in range(100):
        book.write("app", "src", f"line {i:03d} " + "x" * 40)
    current, old = book.path("app"), tmp_path / "app.log.1"
    assert current.stat().st_size < 1000 + 100 and old.stat().st_size >= 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.log", "app.log.1"]
    lines = list(book.follow("app", from_end=False, follow=False))
    numbers = [int(line.split("line ")[1][:3]) for line in lines]
    assert numbers == sorted(numbers) and numbers[-1] == 99  # the old file first, then the current one
    assert len(lines) * 60 < 3000, "about two files' worth is kept, no more"


def test_a_follower_continues_across_a_rotation(tmp_path: Path) -> None:
    book = LogBook(tmp_path, max_bytes=1 << 20)
    book.write("app", "src", "before")
    seen: list[str] = []
    stop = threading.Event()
    reader = threading.Thread(
        target=lambda: seen.extend(book.follow("app", from_end=True, follow=True, keep_going=lambda: not stop.is_set()))
    )
    reader.start()
    try:
        # The follower starts at the end: wait until it has opened the file, by writing until it sees a line.
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            book.write("app", "src", "warm-up")
            time.sleep(0.02)
        first = (tmp_path / "app.log").stat().st_ino
        for i in range(20):
            book.max_bytes = 0 if i == 10 else 1 << 20  # exactly one rotation, in the middle
            book.write("app", "src", f"n={i}")
        assert (tmp_path / "app.log").stat().st_ino != first, "the log was rotated"
        deadline = time.monotonic() + 10
        while not any(line.endswith("n=19") for line in seen) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        reader.join(timeout=5)
    got = [int(line.split("n=")[1]) for line in seen if "n=" in line]
    assert got == list(range(20)), got  # every line once, in order, across the rotation
