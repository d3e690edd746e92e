#!/usr/bin/env bash
# The GPU paths the CPU tests cannot reach, checked in one call on a lent one-GPU machine
# (results in docs/performance.md, "GPU checks"):
#   bash bench/gpu_checks.sh compile    # here, with malt installed: writes the programs to bench/out/gpu2/
#                                       # and the data of tiny and llama-124m, tokenized, to bench/out/gpu2/cache
#   bash bench/gpu_checks.sh run        # on the GPU machine, from the repository root (needs only torch,
#                                       # numpy, tokenizers, safetensors, rich; transformers for distill);
#                                       # with the device tool: carry ["bench/out/gpu2"], so no GPU time goes to data
#   bash bench/gpu_checks.sh run prefix fsdp-dcp   # only the checks named (the names in the summary)
# Each check has its own time limit and the script goes on after a failure; logs go to /tmp/gpu2-logs, archived to $OUT/gpu-checks-logs.tgz.
set -uo pipefail
out=bench/out/gpu2
fast="--set train.tokens=null --set train.checkpoint_every=0"

if [ "${1:-}" = compile ]; then
    rm -rf "$out" && mkdir -p "$out"
    cuda="--set target.accelerator=cuda --set target.compile=on --set target.precision=bf16"
    malt compile recipes/tiny-packed.yaml -o $out/tiny-packed $cuda $fast --set train.steps=300 \
        --set train.eval_every=150 --set train.log_every=20
    malt compile recipes/llama-124m.yaml -o $out/124m-fsdp --set train.tokens=null --set train.steps=60 \
        --set train.eval_every=30 --set train.checkpoint_every=30 --set target.parallelism=fsdp --set train.log_every=10
    for v in bf16 pure_bf16; do
        malt compile recipes/llama-124m.yaml -o $out/124m-$v $fast --set train.steps=60 --set train.eval_every=60 \
            --set train.log_every=10 --set target.precision=$v
    done
    malt compile recipes/llama-124m.yaml -o $out/124m-galore $fast --set train.steps=60 --set train.eval_every=60 \
        --set train.log_every=10 --set optimizer.kind=galore --set optimizer.rank=128 --set optimizer.update_every=50 \
        --set optimizer.scale=0.25
    malt compile recipes/tiny-mosaicbert.yaml -o $out/tiny-mosaicbert $cuda $fast --set train.steps=200 \
        --set train.eval_every=100 --set train.log_every=20
    malt compile recipes/tiny-distill.yaml -o $out/tiny-distill $cuda $fast --set train.steps=100 \
        --set train.eval_every=50 --set train.log_every=10
    malt compile recipes/tiny-swa.yaml -o $out/tiny-swa $cuda $fast --set train.steps=200 \
        --set train.eval_every=100 --set train.log_every=20
    malt compile recipes/tiny-ul2.yaml -o $out/tiny-ul2 $cuda $fast --set train.steps=200 --set train.eval_every=100 \
        --set train.log_every=20
    malt compile recipes/tiny-ul2.yaml -o $out/tiny-ul2-1k $cuda $fast --set train.seq_len=1024 --set train.steps=1
    malt compile recipes/tiny.yaml -o $out/tiny-pinned $cuda $fast --set train.steps=400 --set train.eval_every=0 \
        --set train.log_every=20
    # the same program with pageable batches: the training loop's data.to_device replaced by plain copies
    cp -r $out/tiny-pinned $out/tiny-pageable
    sed -i 's/^\( *\)x, y = data.to_device(DEVICE, x, y)  #.*/\1x, y = x.to(DEVICE, non_blocking=True), y.to(DEVICE, non_blocking=True)  # bench: pageable/' \
        $out/tiny-pageable/train.py
    grep -c "bench: pageable" $out/tiny-pinned/train.py $out/tiny-pageable/train.py
    for r in tiny llama-124m; do   # their data, tokenized here (the BPE-32k training of llama-124m takes a while)
        MALT_CACHE_DIR=$out/cache malt prepare recipes/$r.yaml > /dev/null || exit 1
    done
    du -sh $out
    exit 0
fi

logs=/tmp/gpu2-logs   # one file per check here; $OUT gets one archive of them (the device tool returns few files)
rm -rf "$logs" && mkdir -p "$logs"
shim=$(mktemp -d)
mkdir -p "$shim/malt"
ln -s "$PWD/runtime" "$shim/malt/runtime"   # import malt.runtime without installing malt
export PYTHONPATH="$shim" MALT_CACHE_DIR=${MALT_CACHE_DIR:-$PWD/$out/cache} PYTHONUNBUFFERED=1
shift   # "run"; the rest, if any: the names of the checks to run
only=" $* "
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$logs/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$logs/gpu.txt"

check() {  # check NAME SECONDS COMMAND...: run it with a time limit, log to $logs/NAME.log, say how it ended
    local name=$1 limit=$2; shift 2
    [ "$only" = "  " ] || [[ "$only" == *" $name "* ]] || return 0   # not among the checks asked for
    local t0=$SECONDS
    timeout "$limit" bash -c "$*" > "$logs/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$logs/summary.txt"
    grep -h '^{\|^ *"\(median_tokens_per_s\|mfu\|max_memory_gib\|val_losses\|last_loss\)"' "$logs/$name.log" \
        | tail -12 | sed 's/^/   /' | tee -a "$logs/summary.txt"
    [ "$rc" = 0 ] || tail -5 "$logs/$name.log" | sed 's/^/   /' | tee -a "$logs/summary.txt"
    [ -z "${OUT:-}" ] || tar czf "$OUT/gpu-checks-logs.tgz" -C "$logs" .   # after every check: a kill loses nothing
}
report() {  # report.py on a run directory, with its metrics kept beside the logs
    echo "python3 bench/report.py $1 --skip ${2:-2} && cp $1/metrics.jsonl $logs/$(basename $1).metrics.jsonl"
}

# what no GPU has run yet comes first (the changes listed in docs/performance.md), then what was measured before
check prefix 120 "python3 bench/gpu_prefix_check.py $out/tiny-ul2-1k --batch 8 --steps 20"
check tiny-ul2 70 "python3 $out/tiny-ul2/train.py --quiet && $(report $out/tiny-ul2)"
check fsdp-dcp 180 "bash $out/124m-fsdp/launch.sh --quiet && python3 bench/report.py $out/124m-fsdp --skip 2 \
    && ls $out/124m-fsdp/checkpoints/step_00000030 \
    && rm -rf $out/124m-fsdp/checkpoints/step_00000060 && echo step_00000030 > $out/124m-fsdp/checkpoints/latest \
    && cp $out/124m-fsdp/metrics.jsonl $logs/124m-fsdp.full.metrics.jsonl \
    && bash $out/124m-fsdp/launch.sh --resume --quiet && tail -3 $out/124m-fsdp/metrics.jsonl"
check ckpt-stall 150 "python3 bench/checkpoint_stall.py --device cuda --program $out/124m-bf16 --rounds 4 --work 3 \
    && python3 bench/checkpoint_stall.py --device cuda --program $out/124m-bf16 --rounds 4 --work 3 --format sharded"
for v in pinned pageable pinned pageable; do   # tiny's data: carried in $out/cache, or tokenized by the first
    check tiny-$v 45 "rm -rf $out/tiny-$v/checkpoints $out/tiny-$v/metrics.jsonl; python3 $out/tiny-$v/train.py --quiet \
        && $(report $out/tiny-$v 3)"
done
check mosaicbert 70 "python3 $out/tiny-mosaicbert/train.py --quiet && $(report $out/tiny-mosaicbert)"
check distill 60 "python3 $out/tiny-distill/train.py --quiet && $(report $out/tiny-distill)"
check 124m-bf16 120 "python3 $out/124m-bf16/train.py --quiet && $(report $out/124m-bf16)"
for v in pure_bf16 galore; do
    check 124m-$v 75 "python3 $out/124m-$v/train.py --quiet && $(report $out/124m-$v)"
done
check flex 100 "python3 bench/gpu_flex_check.py $out/tiny-packed --batch 16 --steps 20"
check tiny-packed 80 "python3 $out/tiny-packed/train.py --quiet && $(report $out/tiny-packed)"
check window 100 "python3 bench/gpu_window_check.py $out/tiny-swa"
check tiny-swa 70 "python3 $out/tiny-swa/train.py --quiet && $(report $out/tiny-swa)"
cat "$logs/summary.txt"
