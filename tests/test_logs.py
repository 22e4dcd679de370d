"""App logs: rotation at a size limit, and readers that follow a log across a rotation (real files, a thread)."""

from __future__ import annotations

import queue
import threading
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
    seen: queue.Queue[str] = queue.Queue()
    stop = threading.Event()

    def follow() -> None:
        for line in book.follow("app", from_end=False, follow=True, keep_going=lambda: not stop.is_set()):
            seen.put(line)

    reader = threading.Thread(target=follow)
    reader.start()
    try:
        assert seen.get(timeout=10).endswith("before")  # the follower has the file open
        first = (tmp_path / "app.log").stat().st_ino
        for i in range(20):
            book.max_bytes = 0 if i == 10 else 1 << 20  # exactly one rotation, in the middle
            book.write("app", "src", f"n={i}")
        assert (tmp_path / "app.log").stat().st_ino != first, "the log was rotated"
        got = [int(seen.get(timeout=10).split("n=")[1]) for _ in range(20)]
    finally:
        stop.set()
        reader.join(timeout=5)
    assert got == list(range(20)), got  # every line once, in order, across the rotation
