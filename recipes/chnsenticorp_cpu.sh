#!/usr/bin/env bash
# ChnSentiCorp hotel-review sentiment on a CPU: a small character-level GPT is pretrained on the
# training reviews (next character), then fine-tuned as a classifier; prints its test accuracy.
#
#   recipes/chnsenticorp_cpu.sh                # the classifier in $OUT_ROOT/chnsenticorp_cpu
#   ABLATION=1 recipes/chnsenticorp_cpu.sh     # and the README's ablation: pooling x freezing
#
# Every step is skipped or resumed when its result is already there, so a rerun only finishes.
set -euo pipefail
DATA_ROOT=${DATA_ROOT:-data}
OUT_ROOT=${OUT_ROOT:-out}
CSV=${SHARED_DATA:-../shared/data}/chnsenticorp/ChnSentiCorp_htl_all.csv

# The data: texts of at most 128 characters (the language model's context; longer reviews keep
# their start), one seeded 80/10/10 split (stratified by label) shared by every run; the language
# model's data are the same training and val reviews, with the same character vocabulary.
if [ ! -f "$DATA_ROOT/chnsenticorp/meta.json" ]; then
  python prepare_data.py chnsenticorp --input "$CSV" --out_dir "$DATA_ROOT/chnsenticorp" \
    --context 128 --lm_dir "$DATA_ROOT/chnsenticorp_lm" --overwrite
fi

# 1. Pretrain: a 4-layer character GPT learns to continue the training reviews.
python train.py --config configs/chnsenticorp_lm_cpu.json \
  --data.dir="$DATA_ROOT/chnsenticorp_lm" --out_dir="$OUT_ROOT/chnsenticorp_lm_cpu"

# 2. Fine-tune as a classifier (its best checkpoint by val accuracy), then score the test split.
finetune() {  # run name, data set, extra config flags
  python train.py --config configs/chnsenticorp_cpu.json --data.dir="$DATA_ROOT/$2" \
    --init_from="$OUT_ROOT/chnsenticorp_lm_cpu" --out_dir="$OUT_ROOT/$1" "${@:3}"
  python evaluate.py --task classify --checkpoint "$OUT_ROOT/$1" --split test \
    --output "$OUT_ROOT/$1/test.json"
}
finetune chnsenticorp_cpu chnsenticorp
RUNS=(chnsenticorp_cpu)

if [ "${ABLATION:-0}" = 1 ]; then
  # The same reviews and split, each text followed by <|endoftext|>, where the head pools.
  if [ ! -f "$DATA_ROOT/chnsenticorp_eot/meta.json" ]; then
    python prepare_data.py chnsenticorp --input "$CSV" --out_dir "$DATA_ROOT/chnsenticorp_eot" \
      --context 128 --pooling eot --overwrite
  fi
  FROZEN=(--finetune.freeze=backbone --finetune.train_blocks=0 --lr.peak=3e-3)
  finetune chnsenticorp_cpu_eot chnsenticorp_eot
  finetune chnsenticorp_cpu_frozen chnsenticorp "${FROZEN[@]}"
  finetune chnsenticorp_cpu_eot_frozen chnsenticorp_eot "${FROZEN[@]}"
  RUNS+=(chnsenticorp_cpu_eot chnsenticorp_cpu_frozen chnsenticorp_cpu_eot_frozen)
fi

python - "$OUT_ROOT" "${RUNS[@]}" <<'PY'
import json, sys
from pathlib import Path

out_root, runs = Path(sys.argv[1]), sys.argv[2:]
pretrain = [json.loads(l) for l in (out_root / "chnsenticorp_lm_cpu/metrics.jsonl").open()]
print(f"pretraining: {pretrain[-1]['message']}")
print("| run | pooling | trains | test accuracy | macro F1 | training time |")
print("| --- | --- | --- | --- | --- | --- |")
for run in runs:
    scores = json.loads((out_root / run / "test.json").read_text())
    config = json.loads((out_root / run / "config.json").read_text())
    data = json.loads((Path(config["data"]["dir"]) / "meta.json").read_text())
    done = [json.loads(l) for l in (out_root / run / "metrics.jsonl").open()][-1]["message"]
    freeze = config["finetune"]["freeze"]
    trains = "all weights" if freeze == "none" else "head + final norm"
    print(
        f"| {run} | {data['pooling']} | {trains} | {scores['accuracy']:.2%} "
        f"({scores['correct']} of {scores['total']}) | {scores['macro_f1']:.4f} | "
        f"{done.split(' tokens in ')[1].split(';')[0]} |"
    )
PY
