"""The benchmark helpers under scripts/ run (their figures are not checked: timings belong to the
benchmarks, not the tests)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_revisions.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_compare_revisions_times_two_checkouts():
    # the working tree against itself: one line per model:mode, each with a ratio
    out = _run("--old", str(ROOT), "--specs", "mnist:infer,notebook:train", "--rounds", "2",
               "--block", "1", "--batch-size", "4")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for spec in ("mnist:infer", "notebook:train"):
        row = next(line for line in lines if line.startswith(spec))
        assert row.split()[3].endswith("x") and "/2)" in row


def test_compare_revisions_names_what_is_wrong(tmp_path):
    out = _run("--old", str(tmp_path))
    assert out.returncode != 0 and "no xpcnn/__init__.py" in out.stderr
    out = _run("--old", str(ROOT), "--specs", "mnist:fly")
    assert out.returncode != 0 and "'mnist:fly' is not model:mode" in out.stderr
