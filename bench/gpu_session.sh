#!/usr/bin/env bash
# The GPU checks of one lent-GPU session, in one call (see docs/performance.md). Compile first, here:
#   malt compile recipes/llama-124m.yaml -o bench/out/gpu-124m-fsdp --set train.tokens=null --set train.steps=60 \
#        --set train.eval_every=30 --set train.checkpoint_every=30 --set target.parallelism=fsdp --set train.log_every=10
#   malt compile recipes/llama-124m.yaml -o bench/out/gpu-124m --set train.tokens=null --set train.steps=300
#   malt compile recipes/llama-350m.yaml -o bench/out/gpu-350m --set train.tokens=null --set train.steps=100
# then on the GPU machine: bash bench/gpu_session.sh
set -uo pipefail
shim=$(mktemp -d)
mkdir -p "$shim/malt"
ln -s "$PWD/runtime" "$shim/malt/runtime"   # import malt.runtime without installing malt
export PYTHONPATH="$shim" MALT_CACHE_DIR=${MALT_CACHE_DIR:-/tmp/malt-cache} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "== FSDP2 through torchrun, bf16, compile: the generated program, 60 steps, checkpoint at 30 and 60"
rm -rf bench/out/gpu-124m-fsdp/checkpoints bench/out/gpu-124m-fsdp/metrics.jsonl
bash bench/out/gpu-124m-fsdp/launch.sh --quiet && python3 bench/report.py bench/out/gpu-124m-fsdp --skip 2
echo "== resume the FSDP2 run from step 30"
rm -rf bench/out/gpu-124m-fsdp/checkpoints/step_00000060 && echo step_00000030 > bench/out/gpu-124m-fsdp/checkpoints/latest
bash bench/out/gpu-124m-fsdp/launch.sh --resume --quiet && tail -2 bench/out/gpu-124m-fsdp/metrics.jsonl
echo "== side by side: malt's step against transformers"
python3 bench/gpu_compare.py bench/out/gpu-124m --variants malt,malt-loss,hf --steps 15 --batch 16
python3 bench/gpu_compare.py bench/out/gpu-350m --variants malt-loss,hf --steps 10 --batch 16
