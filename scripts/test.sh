#!/usr/bin/env bash
# The test command (README): set up .venv if needed (idempotent), then the whole suite on CPU.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k sequence -x`.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$top/scripts/setup.sh"
cd "$top"
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "${NEXTX_VENV:-$top/.venv}/bin/python" -m pytest -q -p no:cacheprovider "$@"
