"""The dashboard's charts and login token, on their own (the pages in a browser: tests/test_dashboard.py)."""

from __future__ import annotations

import os
import re
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

from warmboot.server.dashboard import charts, pages
from warmboot.server.dashboard.auth import DashboardAuth

SVG = "{http://www.w3.org/2000/svg}"


def _points(svg: str) -> list[ET.Element]:
    return [e for e in ET.fromstring(svg).iter(f"{SVG}circle") if e.get("class") == "point"]


def _texts(svg: str) -> list[str]:
    return [e.text or "" for e in ET.fromstring(svg).iter(f"{SVG}text")]


def test_by_kind_draws_one_point_per_call_in_its_column_with_its_median_written() -> None:
    svg = charts.by_kind({"cold": [4200.0, 3900.0], "restore": [230.0, 250.0, 240.0], "warm": [15.0]}, "f: time")
    points = _points(svg)
    assert [p.get("data-kind") for p in points] == ["cold", "cold", "restore", "restore", "restore", "warm"]
    texts = _texts(svg)
    assert "cold boot (n=2)" in texts and "snapshot restore (n=3)" in texts and "warm container (n=1)" in texts
    assert "4.05 s" in texts and "240 ms" in texts and "15 ms" in texts  # the medians, readable without hovering
    # Log scale: slower calls are drawn higher up (smaller y), whatever the column.
    y = {p.get("data-kind"): float(p.get("cy")) for p in points}
    assert y["cold"] < y["restore"] < y["warm"]
    assert all(t in texts for t in ("10 ms", "100 ms", "1.00 s"))  # the axis is labelled


def test_by_kind_with_no_calls_says_so_and_titles_are_escaped() -> None:
    svg = charts.by_kind({}, "<b>f</b>")
    assert _points(svg) == [] and "&lt;b&gt;f&lt;/b&gt;: no calls yet" in svg and "<b>" not in svg


def test_over_time_puts_restores_in_time_order_and_labels_first_last_and_median() -> None:
    svg = charts.over_time([(300.0, 190.0), (100.0, 900.0), (200.0, 210.0)], "restores")
    points = _points(svg)
    assert len(points) == 3
    xs = [float(p.get("cx")) for p in points]
    assert xs == sorted(xs)  # oldest first
    texts = _texts(svg)
    assert "900 ms" in texts and "190 ms" in texts and "n=3, median 210 ms" in texts


def test_pages_escape_what_they_show() -> None:
    html = pages.message_page("<script>x</script>", "<img src=x onerror=y>")
    assert "<script>x" not in html and "<img src=x" not in html
    assert "&lt;script&gt;x&lt;/script&gt;" in html and "&lt;img src=x onerror=y&gt;" in html
    assert re.search(r'href="/_dashboard/apps/a%2Fb%3Cc"', pages.link("x", "apps", "a/b<c"))


def test_the_login_token_is_kept_root_only_and_renewing_it_revokes_the_old_one(tmp_path: Path) -> None:
    auth = DashboardAuth(tmp_path)
    first = auth.token
    assert len(first) >= 32 and auth.valid(first) and not auth.valid(first[:-1] + "x") and not auth.valid(None)
    mode = stat.S_IMODE(os.stat(tmp_path / "dashboard.token").st_mode)
    assert mode == 0o600
    assert DashboardAuth(tmp_path).token == first  # the same URL after a server restart
    second = auth.renew()
    assert second != first and auth.valid(second) and not auth.valid(first)
    assert DashboardAuth(tmp_path).token == second
