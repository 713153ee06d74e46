"""scripts/bench_batchnorm.py runs (its figures are not checked: timings belong to the
benchmark, not the tests)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_scripts import _RUN_CASES

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_batchnorm.py"



def _run_all(*cases: list[str]) -> list[subprocess.CompletedProcess]:
    """Each case's run of the script (its arguments), all in one child interpreter."""
    # (test_scripts' runner: one start, and one PyTorch import, for them all)
    out = subprocess.run([sys.executable, "-c", _RUN_CASES, str(SCRIPT)],
                         input=json.dumps([[args, str(ROOT)] for args in cases]),
                         capture_output=True, text=True, timeout=300, env={**os.environ})
    assert out.returncode == 0, out.stderr
    return [subprocess.CompletedProcess([str(SCRIPT), *args], status, stdout, stderr)
            for args, (status, stdout, stderr) in zip(cases, json.loads(out.stdout),
                                                      strict=True)]


def test_bench_batchnorm_times_two_checkouts_and_pytorch():
    # the working tree against itself: a row per shape and ReLU, each with its ratios; in
    # the default regime and in backward's guarded one (x - mean summed) (both runs in one
    # interpreter: PyTorch imported once)
    pytest.importorskip("torch", reason="the table's PyTorch columns need PyTorch")
    regimes = [(), ("--offset", "20", "--beta-per-gamma", "20")]
    runs = _run_all(*[["--old", str(ROOT), "--shapes", "2x4x4x8,3x5x5x4", "--rounds", "1",
                       "--steps", "1", "--warmup", "0", "--clock", "thread", *regime]
                      for regime in regimes])
    for regime, out in zip(regimes, runs, strict=True):
        assert out.returncode == 0, (regime, out.stderr)
        assert f"x ~ N({regime[1] if regime else 0}, 1)" in out.stdout.splitlines()[0], regime
        rows = [line.split() for line in out.stdout.splitlines()[2:]]
        assert [row[:2] for row in rows] == [["2x4x4x8", "yes"], ["2x4x4x8", "no"],
                                             ["3x5x5x4", "yes"], ["3x5x5x4", "no"]], regime
        for row in rows:  # (old, new, torch: f+b and bwd ms; new/torch twice; new/old)
            assert len(row) == 2 + 6 + 3 and all(r.endswith("x") for r in row[-3:]), regime
            assert all(float(v) > 0 for v in row[2:8]), regime


def test_bench_batchnorm_names_what_is_wrong(tmp_path):
    # (each refusal a run of its own, all in one interpreter)
    shapes = ("4x4x8", "4xfourx4x8", "0x4x4x8")
    old, *bad_shapes, clock, threads, offset = _run_all(
        ["--old", str(tmp_path), "--no-torch"],
        *[["--shapes", s, "--no-torch"] for s in shapes],
        ["--threads", "2", "--clock", "thread", "--no-torch"],
        # (checked before PyTorch takes the thread count: was its RuntimeError's traceback)
        ["--threads", "0"],
        ["--offset", "nan", "--no-torch"])
    assert old.returncode != 0 and "no xpcnn/__init__.py" in old.stderr
    for spec, out in zip(shapes, bad_shapes, strict=True):
        assert out.returncode != 0 and f"{spec!r} is not NxHxWxC" in out.stderr
    assert clock.returncode != 0 and "only with --threads 1" in clock.stderr
    assert threads.returncode != 0
    assert "--threads, --steps and --rounds must be >= 1" in threads.stderr
    assert "Traceback" not in threads.stderr
    assert offset.returncode != 0
    assert "--offset and --beta-per-gamma must be finite" in offset.stderr
