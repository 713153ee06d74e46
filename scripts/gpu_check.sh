#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one go, for a machine with CuPy (and PyTorch for the
# comparison): short probes of the GPU APIs (scripts/gpu_probes.py), the GPU tests (cuDNN and
# CUDA graphs first), the training command on the GPU,
# the MNIST recipe on the GPU (where .gpudata/ holds MNIST), then scripts/bench_gpu.py
# (through fit(), what the GPU runs per step against PyTorch, per-convolution cuDNN against the
# hand-written kernels, TFLOP/s, a per-layer profile). Logs, mnist.json and gpu.json go to
# OUTDIR. The stages' limits add up to 9 minutes 5 s (20 s more if both test stages need their
# KILL), inside the device tool's 10-minute command.
#
#   scripts/gpu_wheels.sh PY DATA    # first, where PyPI is reachable: wheels, and MNIST staged
#   scripts/gpu_check.sh [OUTDIR]    # on the GPU machine (installs .whl/*.whl when present)
#
# Each stage has a time limit (PROBE_TIMEOUT, NEW_TEST_TIMEOUT, TEST_TIMEOUT, TRAIN_TIMEOUT,
# MNIST_TIMEOUT, BENCH_TIMEOUT seconds) so that a lent machine's time is never lost to one stage;
# BENCH_ARGS replaces the benchmark's arguments. A test stage at its limit gets SIGINT (and a
# KILL 10 s later): pytest then still prints the failures so far, with their tracebacks, where a
# TERM would lose them (`timeout` gives its child SIGINT's default action even where the shell
# ignores it). On the device tool: carry [".whl", ".gpudata"], timeout_s 600, and OUTDIR "$OUT".
set -u
out=${1:-gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if [ -d .whl ]; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $py -c "import xpcnn.cli as c; c.main(['info'])"
  $py -c "from xpcnn.ops import cudnn_conv as c; m = c.load(); print('cudnn frontend', \
getattr(m, '__version__', None), 'backend', m.backend_version() if m else None)"
} 2>&1 | tee "$out/gpu.txt"

echo "== probes: cuDNN's float32 switch, capture rules, NCCL"
timeout "${PROBE_TIMEOUT:-30}" $py scripts/gpu_probes.py 2>&1 | tee "$out/gpu_probes.log"

echo "== GPU tests: cuDNN and CUDA graphs"
# (no -x or --maxfail: the cuDNN geometry cases come first, and a few failing there would hide
# the capture tests after them in the one run a lent GPU gives; the time limit bounds the stage)
timeout -s INT -k 10 "${NEW_TEST_TIMEOUT:-120}" $py -m pytest -q -m gpu -p no:cacheprovider \
  -k "cudnn or captured or replayed or random_layers" tests/test_gpu.py \
  2>&1 | tee "$out/gpu_tests_new.log"

echo "== GPU tests: the rest"
timeout -s INT -k 10 "${TEST_TIMEOUT:-120}" $py -m pytest -q -m gpu -p no:cacheprovider \
  -k "not (cudnn or captured or replayed or random_layers)" \
  tests/test_gpu.py tests/test_backends.py 2>&1 | tee "$out/gpu_tests.log"

echo "== xpcnn train --device cuda"
timeout "${TRAIN_TIMEOUT:-45}" $py -c "import xpcnn.cli as c; c.main(['train', '--device', 'cuda', '--epoch-lines'])" \
  2>&1 | tee "$out/train_cuda.log"

if [ -d .gpudata ]; then
  echo "== MNIST recipe on the GPU (10 epochs, evaluated on the 10,000 test images)"
  timeout "${MNIST_TIMEOUT:-80}" $py scripts/mnist_recipe.py --data-dir .gpudata \
    --device cuda --json "$out/mnist.json" 2>&1 | tee "$out/mnist_cuda.log"
fi

echo "== benchmark"
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-150}" $py scripts/bench_gpu.py --json "$out/gpu.json" \
  ${BENCH_ARGS:---steps 15 --warmup 3 --no-standard --torch-channels-last \
  --kernels cifar:128:float32 \
  --conv-layers cifar:512:float32 --conv-layers cifar:512:mixed_float16 \
  --loss-kernels 512 --profile cifar:128:float32} 2>&1 | tee "$out/bench_gpu.log"
