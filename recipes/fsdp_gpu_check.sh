#!/usr/bin/env bash
# FSDP2 against DDP on ONE GPU with the 303M Llama (configs/llama_303m.json, compile off): a short
# training run of each (tokens/s, MFU), then benchmark.py --memory for each (weights, optimizer
# state, and the peak memory of an optimizer step with activation checkpointing on and off).
#
#   bash recipes/fsdp_gpu_check.sh    # STEPS=100 BATCH=8 by default; sized for under 3 min on an
#                                     # H100 (not yet run on a GPU when written)
#
# Needs no internet and no prepared data: it writes a synthetic character corpus (random words)
# to ${DATA_ROOT:-data}/gpu_check (prepare_data.py, so the `datasets` package must be installed)
# and the runs to ${OUT_ROOT:-out}/gpu_check_{fsdp,ddp}, which it replaces on every run. With one
# process the DDP config keeps the whole model, optimizer state and gradients on the GPU, as DDP
# does on every GPU. On one GPU FSDP shards over one process, so it saves no memory there:
# this checks that the sharded path runs on a GPU and what it costs, not what it saves.
set -euo pipefail

DATA_ROOT=${DATA_ROOT:-data}
OUT_ROOT=${OUT_ROOT:-out}
STEPS=${STEPS:-100}
BATCH=${BATCH:-8}
data="$DATA_ROOT/gpu_check"

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA GPU visible; this check needs one" >&2
    exit 2
fi

if [ ! -f "$data/meta.json" ]; then
    mkdir -p "$DATA_ROOT"
    python - "$DATA_ROOT/gpu_check.txt" <<'PY'
import random, sys
rng = random.Random(0)
words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
         for _ in range(2000)]
with open(sys.argv[1], "w") as out:
    for _ in range(60000):  # about 4.5 MB: more than STEPS x BATCH x 1024 tokens at the defaults
        out.write(" ".join(rng.choice(words) for _ in range(12)) + ".\n")
PY
    python prepare_data.py text --input "$DATA_ROOT/gpu_check.txt" --out_dir "$data"
fi

# Whole 303M model (vocabulary kept at 50,304 so that MFU counts the real output layer).
run_args=(--config configs/llama_303m.json --data.dir="$data" --compile=false
          --batch_size="$BATCH" --grad_accum.peak=1 --max_steps="$STEPS"
          --macro_batch_steps="$STEPS" --log_interval=10 --data.eval_samples=32 --keep_best=1)
memory_args=(--config configs/llama_303m.json --data.dir="$data" --compile=false
             --batch_size="$BATCH" --grad_accum.peak=1 --memory)

for layout in fsdp ddp; do
    run="$OUT_ROOT/gpu_check_$layout"
    rm -rf "$run"
    echo "=== $layout: $STEPS training steps of $BATCH x 1024 tokens"
    accelerate launch --config_file "configs/accelerate/$layout.yaml" --num_processes 1 \
        train.py "${run_args[@]}" --out_dir="$run" 2>&1 | tail -n 6
    echo "=== $layout: memory of one optimizer step, activation checkpointing on and off"
    accelerate launch --config_file "configs/accelerate/$layout.yaml" --num_processes 1 \
        benchmark.py "${memory_args[@]}" --output "$OUT_ROOT/gpu_check_${layout}_memory.json" \
        2>&1 | tail -n 3
done

python - "$OUT_ROOT" <<'PY'
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
print("--- FSDP2 vs DDP on one GPU, configs/llama_303m.json (compile off):")
for layout in ("fsdp", "ddp"):
    events = [json.loads(line) for line in open(out / f"gpu_check_{layout}" / "metrics.jsonl")]
    timed = [e for e in events if "tokens_per_sec" in e][1:]  # the first window holds warm-up
    speed = statistics.median(e["tokens_per_sec"] for e in timed)
    mfus = [e["mfu"] for e in timed if "mfu" in e]
    mfu = f"{100 * statistics.median(mfus):.1f}%" if mfus else "unknown"
    memory = json.load(open(out / f"gpu_check_{layout}_memory.json"))
    p = memory["processes"][0]
    print(
        f"{layout:4s} ({memory['layout']}): {speed:,.0f} tokens/s, MFU {mfu}; weights "
        f"{p['weights_mib']:,.0f} MiB, optimizer {p['optimizer_mib']:,.0f} MiB, peak of a step "
        f"{p['step_peak_mib']:,.0f} MiB, with activation checkpointing "
        f"{p['step_peak_checkpointing_mib']:,.0f} MiB"
    )
PY
