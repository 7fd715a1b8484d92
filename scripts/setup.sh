#!/usr/bin/env bash
# Set up vitpipe in ./.venv: the CPU build of torch first (a plain `pip install torch` pulls
# several GB of CUDA wheels), then the package and its test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
python -m pip install -q -e ".[test]"
python -c "import torch, timm, dvc; print(f'vitpipe ready: torch {torch.__version__}, timm {timm.__version__}')"
