#!/usr/bin/env bash
# ChnSentiCorp hotel-review sentiment on a CPU: a character-level GPT is pretrained on the
# training reviews (next character), fine-tuned as a classifier three times (seeds 2 to 4), and
# the three fine-tunes' weights are averaged into one classifier; prints its test accuracy.
#
#   recipes/chnsenticorp_cpu.sh                # the classifier in $OUT_ROOT/chnsenticorp_cpu
#   ABLATION=1 recipes/chnsenticorp_cpu.sh     # and the README's ablation: pooling x freezing
#
# Every step is skipped or resumed when its result is already there, so a rerun only finishes.
set -euo pipefail
DATA_ROOT=${DATA_ROOT:-data}
OUT_ROOT=${OUT_ROOT:-out}
CSV=${SHARED_DATA:-../shared/data}/chnsenticorp/ChnSentiCorp_htl_all.csv
KEEP=start

# The data: texts of at most 126 characters, each between two <|endoftext|> (128 tokens, the
# language model's context); the classifier pools at the second. Of a longer review the start is
# kept. One seeded 80/10/10 split (stratified by label) is shared by every run; the language
# model's data are the same training and val reviews, whole, with the same character vocabulary,
# each review after an <|endoftext|>: hence the one before each text (--bos), so the classifier
# reads a review as the language model learnt to.
if [ ! -f "$DATA_ROOT/chnsenticorp_bos/meta.json" ]; then
  python prepare_data.py chnsenticorp --input "$CSV" --out_dir "$DATA_ROOT/chnsenticorp_bos" \
    --context 128 --pooling eot --keep "$KEEP" --bos --lm_dir "$DATA_ROOT/chnsenticorp_lm" \
    --overwrite
fi

# 1. Pretrain: a 4-layer character GPT learns to continue the training reviews: 900 steps, then
#    1,200 more from those weights at half the peak learning rate (a second cosine cycle).
python train.py --config configs/chnsenticorp_lm_cpu.json \
  --data.dir="$DATA_ROOT/chnsenticorp_lm" --out_dir="$OUT_ROOT/chnsenticorp_lm_cpu"
python train.py --config configs/chnsenticorp_lm_cpu_cont.json \
  --data.dir="$DATA_ROOT/chnsenticorp_lm" --init_from="$OUT_ROOT/chnsenticorp_lm_cpu" \
  --out_dir="$OUT_ROOT/chnsenticorp_lm_cpu_cont"

# 2. Fine-tune it as a classifier; score a run's best checkpoint by val accuracy on test.
finetune() {  # run name, data set, extra config flags
  python train.py --config configs/chnsenticorp_cpu.json --data.dir="$DATA_ROOT/$2" \
    --init_from="$OUT_ROOT/chnsenticorp_lm_cpu_cont" --out_dir="$OUT_ROOT/$1" "${@:3}"
  score "$1" test
}
score() {  # run or checkpoint directory under $OUT_ROOT, split: scores in DIR/<split>.json
  python evaluate.py --task classify --checkpoint "$OUT_ROOT/$1" --split "$2" \
    --output "$OUT_ROOT/$1/$2.json"
}

# 3. Three fine-tunes with dropout 0.1 that differ only in their seed, every checkpoint kept; the
#    mean of their final weights (a "model soup", see the README's Averaging) is the classifier.
SOUP=()
for seed in 2 3 4; do
  finetune "chnsenticorp_cpu_seed$seed" chnsenticorp_bos --model.dropout=0.1 --seed="$seed" \
    --keep_best=0
  SOUP+=("$OUT_ROOT/chnsenticorp_cpu_seed$seed/latest")
done
python train.py --average "${SOUP[@]}" --out_dir "$OUT_ROOT/chnsenticorp_cpu"
score chnsenticorp_cpu test
score chnsenticorp_cpu val >/dev/null
RUNS=(chnsenticorp_cpu_seed2 chnsenticorp_cpu_seed3 chnsenticorp_cpu_seed4)

if [ "${ABLATION:-0}" = 1 ]; then
  # One fine-tune (seed 2) of each: pooling at an appended end-of-text token or at the last
  # character, each with every weight training or the backbone frozen (only the head and final
  # norm train), on the same reviews and split without the starting <|endoftext|>.
  for pooling in eot last; do
    if [ ! -f "$DATA_ROOT/chnsenticorp_$pooling/meta.json" ]; then
      python prepare_data.py chnsenticorp --input "$CSV" \
        --out_dir "$DATA_ROOT/chnsenticorp_$pooling" \
        --context 128 --pooling "$pooling" --keep "$KEEP" --overwrite
    fi
  done
  FROZEN=(--finetune.freeze=backbone --finetune.train_blocks=0 --lr.peak=3e-3 --seed=2)
  finetune chnsenticorp_cpu_eot chnsenticorp_eot --model.dropout=0.1 --seed=2
  finetune chnsenticorp_cpu_last chnsenticorp_last --model.dropout=0.1 --seed=2
  finetune chnsenticorp_cpu_eot_frozen chnsenticorp_eot "${FROZEN[@]}"
  finetune chnsenticorp_cpu_last_frozen chnsenticorp_last "${FROZEN[@]}"
  RUNS+=(chnsenticorp_cpu_eot chnsenticorp_cpu_last chnsenticorp_cpu_eot_frozen)
  RUNS+=(chnsenticorp_cpu_last_frozen)
fi

python - "$OUT_ROOT" "${RUNS[@]}" <<'PY'
import json, sys
from pathlib import Path

out_root, runs = Path(sys.argv[1]), sys.argv[2:]
read = lambda path: json.loads(path.read_text())
last_message = lambda run: list((out_root / run / "metrics.jsonl").open())[-1]
for stage in ("chnsenticorp_lm_cpu", "chnsenticorp_lm_cpu_cont"):
    print(f"pretraining, {stage}: {json.loads(last_message(stage))['message']}")


def seconds(run: str) -> int:
    """The training time of a run, from its last message: "... tokens in H:MM:SS; ..."."""
    clock = json.loads(last_message(run))["message"].split(" tokens in ")[1].split(";")[0]
    hours, minutes, secs = (int(part) for part in clock.split(":"))
    return 3600 * hours + 60 * minutes + secs


def row(name: str, run: str, pooling: str, trains: str, time: str) -> str:
    scores = read(out_root / run / "test.json")
    return (
        f"| {name} | {pooling} | {trains} | {scores['accuracy']:.2%} "
        f"({scores['correct']} of {scores['total']}) | {scores['macro_f1']:.4f} | {time} |"
    )


clock = lambda total: f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"
print("| run | pooling | trains | test accuracy | macro F1 | training time |")
print("| --- | --- | --- | --- | --- | --- |")
seeds = [run for run in runs if "_seed" in run]
val = read(out_root / "chnsenticorp_cpu/val.json")["accuracy"]
print(row(f"chnsenticorp_cpu (mean of the {len(seeds)} below; val {val:.2%})", "chnsenticorp_cpu",
          "end-of-text, text after one", "all weights", clock(sum(seconds(run) for run in seeds))))
for run in runs:
    config = read(out_root / run / "config.json")
    meta = read(Path(config["data"]["dir"]) / "meta.json")
    pooling = "end-of-text" if meta["pooling"] == "eot" else "last token"
    pooling += ", text after one" if meta.get("bos") else ""
    frozen = config["finetune"]["freeze"] != "none"
    trains = "head + final norm" if frozen else "all weights"
    print(row(f"{run} (best by val)", run, pooling, trains, clock(seconds(run))))
PY
