"""`warmboot doctor`, run for real through the installed console script, and its checks called directly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from warmboot.cli import doctor

CHECK_NAMES = [
    "root / capabilities",
    "kernel",
    "criu binary",
    "criu check",
    "userfaultfd",
    "namespaces",
    "overlayfs",
    "sandbox tools",
    "cgroups",
    "transparent hugepages",
    "snapshot disk",
]


def _warmboot() -> str:
    """The `warmboot` console script of this virtualenv (falling back to PATH)."""
    script = Path(sys.executable).parent / "warmboot"
    if script.exists():
        return str(script)
    found = shutil.which("warmboot")
    assert found, "the `warmboot` console script is not installed; run `make setup`"
    return found


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `warmboot ARGS` with a wide terminal (so the table does not wrap names) and extra env."""
    full_env = {**os.environ, "COLUMNS": "250", **env}
    return subprocess.run([_warmboot(), *args], capture_output=True, text=True, env=full_env, timeout=120, check=False)


def test_doctor_passes_on_this_host() -> None:
    proc = _run("doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in CHECK_NAMES:
        assert name in proc.stdout, f"check {name!r} missing from:\n{proc.stdout}"
    assert "FAIL" not in proc.stdout
    assert "required checks passed" in proc.stdout


def test_doctor_fails_without_criu_and_says_how_to_fix() -> None:
    proc = _run("doctor", WARMBOOT_CRIU="/nonexistent/criu")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout
    assert "/nonexistent/criu" in proc.stdout
    assert "make setup" in proc.stdout
    assert "required check(s) failed: criu binary, criu check" in proc.stdout


def test_help_explains_with_an_example() -> None:
    top = _run("--help")
    assert top.returncode == 0, top.stderr
    assert "doctor" in top.stdout and "sudo warmboot doctor" in top.stdout
    sub = _run("doctor", "--help")
    assert sub.returncode == 0, sub.stderr
    assert "sudo warmboot doctor" in sub.stdout and "Exits 1" in sub.stdout


def test_every_check_returns_a_result_named_as_in_the_table() -> None:
    results = doctor.run_checks()
    assert [r.name for r in results] == CHECK_NAMES
    for r in results:
        assert r.detail
        assert r.ok or r.fix, f"{r.name} failed without a fix: {r.detail}"


def test_disk_check_on_tmp(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    ok = doctor.check_disk(tmp_path, min_free_bytes=1)
    assert ok.ok and ok.required and ok.status == "OK"
    assert "GiB free" in ok.detail and str(tmp_path) in ok.detail

    too_little = doctor.check_disk(tmp_path, min_free_bytes=free + (1 << 40))
    assert not too_little.ok and too_little.status == "FAIL"
    assert "need >=" in too_little.detail and "WARMBOOT_HOME" in too_little.fix


def test_disk_check_measures_nearest_existing_parent(tmp_path: Path) -> None:
    missing = tmp_path / "not" / "yet" / "snapshots"
    result = doctor.check_disk(missing, min_free_bytes=1)
    assert result.ok
    assert f"measured at {tmp_path}" in result.detail


def test_disk_check_defaults_to_the_snapshots_dir(tmp_path: Path) -> None:
    # conftest points WARMBOOT_HOME at tmp_path / "home", which does not exist yet.
    result = doctor.check_disk(min_free_bytes=1)
    assert str(tmp_path / "home" / "snapshots") in result.detail


@pytest.mark.parametrize(
    ("release", "ok"),
    [("6.18.44-fc-v657", True), ("5.9.0", True), ("5.8.18-generic", False), ("4.19.0", False)],
)
def test_kernel_check_threshold(release: str, ok: bool) -> None:
    result = doctor.check_kernel(release)
    assert result.ok is ok and result.required
    assert release in result.detail


def test_privileges_check_reads_capeff(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000000200000\n")  # CAP_SYS_ADMIN only
    result = doctor.check_privileges(status)
    assert not result.ok and "CAP_CHECKPOINT_RESTORE" in result.detail and result.fix
    status.write_text("Name:\tx\nCapEff:\t0000010000200000\n")  # both
    assert doctor.check_privileges(status).ok


def test_hugepages_check_reads_the_mode(tmp_path: Path) -> None:
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    result = doctor.check_hugepages(setting)
    assert (result.ok, result.required) == (False, False)
    assert "madvise" in result.detail and "echo always" in result.fix
    setting.write_text("[always] madvise never\n")
    assert doctor.check_hugepages(setting).ok
