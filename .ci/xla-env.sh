#!/usr/bin/env bash
# Build the torch-xla environment: torch 2.9.0 with torch-xla 2.9.0 (they pair only with each other), malt's
# dependencies and malt itself, from the project's own files (pyproject's optional extra `xla`).
#   bash .ci/xla-env.sh [VENV]        (default .venv-xla)
# torch 2.9.0 comes from PyPI as its CUDA build, which cannot be imported without its nvidia-* wheels
# (torch/__init__.py preloads them): about 3.9 GB to download, 7.1 GB installed. Measured on the CI machine
# (2 cores): download 40 s, install 70 s, malt's dependencies 12 s. The tests run torch-xla's CPU backend
# (PJRT_DEVICE=CPU); a TPU host installs the extra `tpu` instead, which adds libtpu.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-xla}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet -e '.[xla]' 'pytest>=8'
PJRT_DEVICE=CPU "$VENV/bin/python" - <<'PY'
import torch, torch_xla
assert torch.__version__.split("+")[0] == "2.9.0" and torch_xla.__version__.startswith("2.9.0"), (torch.__version__, torch_xla.__version__)
print(f"xla environment: torch {torch.__version__}, torch-xla {torch_xla.__version__}")
PY
