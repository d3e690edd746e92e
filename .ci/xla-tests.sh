#!/usr/bin/env bash
# The TPU program's tests (tests/xla/) in the torch-xla environment, on torch-xla's CPU backend.
#   bash .ci/xla-tests.sh [VENV]      (builds VENV with .ci/xla-env.sh first; default .venv-xla)
# Cost on the 2-core CI machine, measured: 2 min 10 s to build the environment without a pip cache
# (3.9 GB of wheels), then 1.5 to 3 minutes of tests (11 tests: four 8-step runs of a 95k-parameter
# model, 1 device in bf16 and fp32, a 2-device SPMD mesh, the CPU program; two resumes; the SPMD
# shardings; the errors without a TPU); about 4 minutes in all. The tests import torch_xla at the top: they
# fail, never skip, when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-xla}"
bash .ci/xla-env.sh "$VENV"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/xla
