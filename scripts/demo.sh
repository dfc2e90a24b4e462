#!/usr/bin/env bash
# The demo command (README): set up .venv if needed (idempotent), then `nextx demo` on the built-in shapes data.
# Extra arguments go to `nextx demo`, e.g. `bash scripts/demo.sh --force`.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$top/scripts/setup.sh"
cd "$top"
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "${NEXTX_VENV:-$top/.venv}/bin/nextx" demo "$@"
