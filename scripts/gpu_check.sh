#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one go, for a machine with CuPy (and PyTorch for the
# comparison), in the order that measures issue 18's targets first: short probes of the GPU
# APIs (scripts/gpu_probes.py), the cuDNN and CUDA-graph tests, scripts/bench_gpu.py's grid
# (through fit(), against PyTorch: the speed and memory targets), the MNIST recipe on the GPU
# (the accuracy target, where .gpudata/ holds MNIST), the rest of the GPU tests, the training
# command on the GPU, then the benchmark's extras (what the GPU runs per step, per-convolution
# cuDNN against the hand-written kernels, the loss kernels, a per-layer profile) in whatever
# time is left. Seven files go to OUTDIR (the device tool brings back eight at most):
# gpu.txt (the machine, the probes), tests.log, bench_gpu.log, gpu.json, gpu_extra.json,
# mnist.json and train.log.
#
#   scripts/gpu_wheels.sh PY DATA    # first, where PyPI is reachable: wheels, and MNIST staged
#   scripts/gpu_check.sh [OUTDIR]    # on the GPU machine (installs .whl/*.whl when present)
#
# Each stage has a time limit (the header's 50 s, PROBE_TIMEOUT, NEW_TEST_TIMEOUT,
# BENCH_TIMEOUT, MNIST_TIMEOUT, TEST_TIMEOUT, TRAIN_TIMEOUT seconds) so that a lent machine's
# time is never lost to one stage: they add up to 565 s (20 s more if both test stages need
# their KILL), and the extras get what is left of TOTAL_SECONDS (585), inside the device tool's
# 10-minute command. Their first convolution comparison, resnet20 at batch 1024 (its 8
# geometries timed once each; the stride-2 layers' input gradients on the gather and on
# im2col + cuBLAS), is estimated at 20-40 s, unmeasured so far: what is cut short is the last.
# BENCH_ARGS and EXTRA_ARGS replace the two benchmark calls' arguments. A test stage at its
# limit gets SIGINT (and a KILL 10 s later): pytest then still prints the failures so far, with
# their tracebacks, where a TERM would lose them (`timeout` gives its child SIGINT's default
# action even where the shell ignores it). On the device tool: carry [".whl", ".gpudata"],
# timeout_s 600, and OUTDIR "$OUT".
set -u
out=${1:-gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if [ -d .whl ]; then
  # (one at a time: one that fails leaves the others installed; --target --upgrade replaces a
  # wheel's top-level folders whole, so no two wheels carried may share one, as nvidia/ would)
  for wheel in .whl/*.whl; do
    [ -e "$wheel" ] || continue
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$wheel" 2>&1 || echo "pip could not install $wheel"
  done | tee "$out/gpu.txt"
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  timeout 20 $py -c "import xpcnn.cli as c; c.main(['info'])"
  timeout 20 $py -c "from xpcnn.ops import cudnn_conv as c; m = c.load(); print('cudnn frontend', \
getattr(m, '__version__', None), 'backend', m.backend_version() if m else None)"
} 2>&1 | tee -a "$out/gpu.txt"

echo "== probes: cuDNN's float32 switch, capture rules, NCCL" | tee -a "$out/gpu.txt"
timeout "${PROBE_TIMEOUT:-25}" $py scripts/gpu_probes.py 2>&1 | tee -a "$out/gpu.txt"

echo "== GPU tests: cuDNN and CUDA graphs" | tee "$out/tests.log"
# (no -x or --maxfail: the cuDNN geometry cases come first, and a few failing there would hide
# the capture tests after them in the one run a lent GPU gives; the time limit bounds the stage)
timeout -s INT -k 10 "${NEW_TEST_TIMEOUT:-110}" $py -m pytest -q -m gpu -p no:cacheprovider \
  -k "cudnn or captured or replayed or random_layers" tests/test_gpu.py \
  2>&1 | tee -a "$out/tests.log"

echo "== benchmark: issue 18's grid"
# (rows are saved to gpu.json one by one: a grid cut short keeps what it measured)
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-180}" $py scripts/bench_gpu.py --json "$out/gpu.json" \
  ${BENCH_ARGS:---steps 15 --warmup 3 --no-standard --torch-channels-last} \
  2>&1 | tee "$out/bench_gpu.log"

if [ -d .gpudata ]; then
  echo "== MNIST recipe on the GPU (10 epochs, evaluated on the 10,000 test images)" \
    | tee "$out/train.log"
  timeout "${MNIST_TIMEOUT:-80}" $py scripts/mnist_recipe.py --data-dir .gpudata \
    --device cuda --json "$out/mnist.json" 2>&1 | tee -a "$out/train.log"
fi

echo "== GPU tests: the rest" | tee -a "$out/tests.log"
timeout -s INT -k 10 "${TEST_TIMEOUT:-90}" $py -m pytest -q -m gpu -p no:cacheprovider \
  -k "not (cudnn or captured or replayed or random_layers)" \
  tests/test_gpu.py tests/test_backends.py 2>&1 | tee -a "$out/tests.log"

echo "== xpcnn train --device cuda" | tee -a "$out/train.log"
timeout "${TRAIN_TIMEOUT:-30}" $py -c "import xpcnn.cli as c; c.main(['train', '--device', \
'cuda', '--epoch-lines'])" 2>&1 | tee -a "$out/train.log"

left=$(( ${TOTAL_SECONDS:-585} - SECONDS ))
echo "== benchmark extras (${left} s left)" | tee -a "$out/bench_gpu.log"
if [ "$left" -gt 5 ]; then
  # shellcheck disable=SC2086
  timeout "$left" $py scripts/bench_gpu.py --models "" --json "$out/gpu_extra.json" \
    ${EXTRA_ARGS:---steps 15 --warmup 3 --no-standard --torch-channels-last \
    --kernels cifar:128:float32 --conv-layers resnet20:1024:float32 \
    --conv-layers cifar:512:float32 --conv-layers cifar:512:mixed_float16 \
    --loss-kernels 512 --profile cifar:128:float32} 2>&1 | tee -a "$out/bench_gpu.log"
fi
