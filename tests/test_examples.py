"""The Modal-style examples of issue 11's features run as a user runs them: `warmboot run examples/FILE`."""

from __future__ import annotations

from pathlib import Path

import pytest
from platform_helpers import Platform

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

EXPECTED = {
    "batching.py": ["10 vectors, first [4.0,", "[1000, 1002, 1004, 1006, 1008, 1010]", "Batch of "],
    "web_endpoints.py": [
        '{"hello":"warmboot"}',
        '{"square":144}',
        "data: 3 | data: 2 | data: 1",
        '"script_root":"/example-web-flask-app-dev"',
        "<h1>served by python -m http.server</h1>",
        '{"greeting":"Bonjour, Ada !"}',
    ],
}


@pytest.mark.parametrize("example", sorted(EXPECTED))
def test_an_example_runs_with_warmboot_run(platform: Platform, example: str) -> None:
    proc = platform.cli("run", str(EXAMPLES / example), timeout=900)
    output = proc.stdout + proc.stderr
    for fragment in EXPECTED[example]:
        assert fragment in output, f"{fragment!r} missing from the output of {example}:\n{output[-3000:]}"
