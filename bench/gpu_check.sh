#!/usr/bin/env bash
# Every CUDA check of nextx in one command, <= 8 minutes on one GPU (bench/gpu_check.py has the list):
#   bash bench/gpu_check.sh [OUT_DIR]          on a GPU machine (default OUT_DIR: gpu_check_out/)
#   bash bench/gpu_check.sh --tiny [OUT_DIR]   toy sizes on the CPU: the smoke test the test suite runs
# Installs nothing. Uses .venv when present (scripts/setup.sh), else the python on PATH (a GPU machine's own torch;
# deepspeed / webdataset / open_clip wheels carried there are installed beforehand with pip --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export DS_ACCELERATOR="${DS_ACCELERATOR:-$($PY -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" bench/gpu_check.py "$@"
