#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one go, for a machine with CuPy (and PyTorch for the
# comparison): the GPU tests, the training command on the GPU, then scripts/bench_gpu.py with a
# per-layer profile. Logs and gpu.json go to OUTDIR.
#
#   scripts/gpu_check.sh [OUTDIR]
#
# Each stage has a time limit (TEST_TIMEOUT, TRAIN_TIMEOUT, BENCH_TIMEOUT seconds) so that a
# lent machine's time is never lost to one stage; BENCH_ARGS adds arguments to the benchmark.
set -u
out=${1:-gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $py -c "import xpcnn.cli as c; c.main(['info'])"
} 2>&1 | tee "$out/gpu.txt"

echo "== GPU tests"
timeout "${TEST_TIMEOUT:-240}" $py -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_gpu.py tests/test_backends.py 2>&1 | tee "$out/gpu_tests.log"

echo "== xpcnn train --device cuda"
timeout "${TRAIN_TIMEOUT:-90}" $py -c "import xpcnn.cli as c; c.main(['train', '--device', 'cuda', '--quiet'])" \
  2>&1 | tee "$out/train_cuda.log"

echo "== benchmark"
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-300}" $py scripts/bench_gpu.py --json "$out/gpu.json" \
  --profile cifar:128:float32 ${BENCH_ARGS:-} 2>&1 | tee "$out/bench_gpu.log"
