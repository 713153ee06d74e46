"""scripts/bench_batchnorm.py runs (its figures are not checked: timings belong to the
benchmark, not the tests)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_batchnorm.py"), *args],
                          capture_output=True, text=True, timeout=300, env={**os.environ})


@pytest.mark.parametrize("regime", [(), ("--offset", "20", "--beta-per-gamma", "20")])
def test_bench_batchnorm_times_two_checkouts_and_pytorch(regime):
    # the working tree against itself: a row per shape and ReLU, each with its ratios; in
    # the default regime and in backward's guarded one (x - mean summed)
    pytest.importorskip("torch", reason="the table's PyTorch columns need PyTorch")
    out = _run("--old", str(ROOT), "--shapes", "2x4x4x8,3x5x5x4", "--rounds", "1",
               "--steps", "1", "--warmup", "0", "--clock", "thread", *regime)
    assert out.returncode == 0, out.stderr
    assert f"x ~ N({regime[1] if regime else 0}, 1)" in out.stdout.splitlines()[0]
    rows = [line.split() for line in out.stdout.splitlines()[2:]]
    assert [row[:2] for row in rows] == [["2x4x4x8", "yes"], ["2x4x4x8", "no"],
                                         ["3x5x5x4", "yes"], ["3x5x5x4", "no"]]
    for row in rows:  # (old, new, torch: f+b and bwd ms; new/torch twice; new/old)
        assert len(row) == 2 + 6 + 3 and all(r.endswith("x") for r in row[-3:])
        assert all(float(v) > 0 for v in row[2:8])


def test_bench_batchnorm_names_what_is_wrong(tmp_path):
    out = _run("--old", str(tmp_path), "--no-torch")
    assert out.returncode != 0 and "no xpcnn/__init__.py" in out.stderr
    for shapes in ("4x4x8", "4xfourx4x8", "0x4x4x8"):
        out = _run("--shapes", shapes, "--no-torch")
        assert out.returncode != 0 and f"{shapes!r} is not NxHxWxC" in out.stderr
    out = _run("--threads", "2", "--clock", "thread", "--no-torch")
    assert out.returncode != 0 and "only with --threads 1" in out.stderr
    # (checked before PyTorch takes the thread count: was its RuntimeError's traceback)
    out = _run("--threads", "0")
    assert out.returncode != 0 and "--threads, --steps and --rounds must be >= 1" in out.stderr
    assert "Traceback" not in out.stderr
    out = _run("--offset", "nan", "--no-torch")
    assert out.returncode != 0 and "--offset and --beta-per-gamma must be finite" in out.stderr
