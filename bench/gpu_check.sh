#!/usr/bin/env bash
# GPU check: the llama-124m recipe on one GPU (bf16 autocast, torch.compile), tokens/s and MFU.
#
# Compile here (the GPU machine may lack pydantic; the generated program needs only torch,
# numpy, tokenizers, safetensors and rich):
#   malt compile recipes/llama-124m.yaml -o bench/out/gpu-124m --set train.tokens=null \
#        --set train.steps=300 --set train.eval_every=150 --set train.checkpoint_every=0
# then on the GPU machine, from the repository root:
#   bash bench/gpu_check.sh bench/out/gpu-124m [PEAK_TFLOPS]
set -euo pipefail
run=${1:-bench/out/gpu-124m}
peak=${2:-}
shim=$(mktemp -d)
mkdir -p "$shim/malt"
ln -s "$PWD/runtime" "$shim/malt/runtime"   # import malt.runtime without installing malt
export PYTHONPATH="$shim" MALT_CACHE_DIR=${MALT_CACHE_DIR:-/tmp/malt-cache} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
rm -rf "$run/checkpoints" "$run/metrics.jsonl"
time python3 "$run/train.py"
python3 bench/report.py "$run" ${peak:+--peak-tflops "$peak"}
