#!/usr/bin/env bash
# Download, on a machine that reaches PyPI, the wheels that the lent GPU machine lacks (its
# image has CuPy, PyTorch, cuDNN's library, pytest, hypothesis and tqdm, but not these), into
# .whl/ (ignored by git), for Python 3.12 on x86-64 Linux; with DATA_DIR, also stage MNIST's
# four IDX files from there in .gpudata/ (ignored by git): the device machine reaches nothing
# outside the checkout, and the MNIST recipe's accuracy on the GPU is one of its checks.
#
#   scripts/gpu_wheels.sh [PYTHON] [DATA_DIR]     # e.g. .venv/bin/python ../shared/data
#
# The device command then installs them first (scripts/gpu_check.sh does it where .whl/ is
# there): pip install --no-index --no-deps --target /tmp/site .whl/*.whl. On the device tool,
# carry [".whl", ".gpudata"] (about 18 MB together).
set -euo pipefail
py=${1:-python3}
data=${2:-}
case "$py" in */*) py=$(cd "$(dirname "$py")" && pwd)/$(basename "$py") ;; esac  # (before the cd)
[ -z "$data" ] || data=$(cd "$data" && pwd)
cd "$(dirname "$0")/.."
rm -rf .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
# The versions this session tested with (array-api-*, ml_dtypes: CuPy's bfloat16) and the
# frontend that pyproject's [cuda12]/[cuda13] extras pin.
$py -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  "array-api-compat==1.16.0" "array-api-strict==2.6.1" "nvidia-cudnn-frontend==1.28.0" \
  "ml_dtypes==0.7.0"
ls -la .whl
if [ -n "$data" ]; then
  rm -rf .gpudata && mkdir .gpudata
  cp "$data"/train-images-idx3-ubyte.gz "$data"/train-labels-idx1-ubyte.gz \
    "$data"/t10k-images-idx3-ubyte.gz "$data"/t10k-labels-idx1-ubyte.gz .gpudata/
  ls -la .gpudata
fi
