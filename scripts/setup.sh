#!/usr/bin/env bash
# Create or reuse .venv and install nextx with the pinned working set (constraints.txt). Idempotent:
# a second run with nothing changed only checks a stamp and exits in well under a second.
#   NEXTX_VENV   where the environment lives (default: .venv in the repo)
#   NEXTX_PYTHON the interpreter that creates it (default: python3)
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${NEXTX_VENV:-$top/.venv}
py=${NEXTX_PYTHON:-python3}
stamp=$venv/.nextx-installed
want=$(cat "$top/pyproject.toml" "$top/constraints.txt" | sha256sum | cut -c1-16)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import nextx" 2>/dev/null; then
  exit 0
fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
echo "nextx: installing into $venv (pinned by constraints.txt; a few minutes the first time)" >&2
"$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$top/constraints.txt" -e "$top[dev]"
"$venv/bin/python" - <<'EOF'
import torch, torchvision, transformers, sentencepiece, webdataset, open_clip, deepspeed  # noqa: F401
print(f"nextx: torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}")
EOF
echo "$want" > "$stamp"
