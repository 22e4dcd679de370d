"""What the dashboard's log tail and volume pages read, on their own (no server): the live tail's offsets, a line
still being written, a rotated log; a volume name that is a path."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from warmboot.errors import NotFoundError
from warmboot.server.dashboard import views


def _plane(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(
        home=tmp_path,
        logs=SimpleNamespace(path=lambda name: tmp_path / "logs" / f"{name}.log"),
        volume_dir=lambda name: tmp_path / "volumes" / name,
    )


def test_the_tail_starts_at_the_end_and_then_returns_only_new_complete_lines(tmp_path: Path) -> None:
    plane = _plane(tmp_path)
    assert views.log_tail(plane, "a", None) == ([], 0), "no log yet: nothing, from offset 0"
    log = tmp_path / "logs" / "a.log"
    log.parent.mkdir()
    log.write_bytes(b"".join(b"line %d\n" % i for i in range(views.LOG_LINES + 50)))
    lines, offset = views.log_tail(plane, "a", None)
    assert len(lines) == views.LOG_LINES and lines[-1] == f"line {views.LOG_LINES + 49}"
    assert offset == log.stat().st_size
    assert views.log_tail(plane, "a", offset) == ([], offset)

    with open(log, "ab") as f:
        f.write(b"new <b>one</b>\nhalf a li")
    lines, after = views.log_tail(plane, "a", offset)
    assert lines == ["new <b>one</b>"], "a line still being written waits for the next poll"
    with open(log, "ab") as f:
        f.write(b"ne\n")
    assert views.log_tail(plane, "a", after) == (["half a line"], log.stat().st_size)


def test_a_rotated_log_is_read_from_its_start(tmp_path: Path) -> None:
    plane = _plane(tmp_path)
    log = tmp_path / "logs" / "a.log"
    log.parent.mkdir()
    log.write_bytes(b"fresh\n")
    assert views.log_tail(plane, "a", 10_000) == (["fresh"], 6)


def test_a_volume_page_names_a_volume_never_a_path(tmp_path: Path) -> None:
    plane = _plane(tmp_path)
    (tmp_path / "volumes" / "v" / "sub").mkdir(parents=True)
    (tmp_path / "volumes" / "v" / "sub" / "f.bin").write_bytes(b"x" * 10)
    (tmp_path / "volumes" / "v" / "link").symlink_to("/etc/passwd")
    assert views.volume(plane, "v") == [("link", len("/etc/passwd")), ("sub/f.bin", 10)]
    for bad in ("..", "v/sub", ".hidden", "missing"):
        with pytest.raises(NotFoundError):
            views.volume(plane, bad)
