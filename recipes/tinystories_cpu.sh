#!/usr/bin/env bash
# A small Llama on TinyStories with its own BPE, on a CPU: prepare the sample, train, score, sample.
#
#   bash recipes/tinystories_cpu.sh
#
# Reads the TinyStories sample in ${SHARED_DATA:-../shared/data}/tinystories/ (nothing is
# downloaded); writes the data set to ${DATA_ROOT:-data}/tinystories_sample and the run to
# ${OUT_ROOT:-out}/tinystories_cpu. Rerunning it reuses the data set and resumes the run.
set -euo pipefail

SHARED_DATA=${SHARED_DATA:-../shared/data}
DATA_ROOT=${DATA_ROOT:-data}
OUT_ROOT=${OUT_ROOT:-out}
stories="$SHARED_DATA/tinystories/tinystories_val.txt"
data="$DATA_ROOT/tinystories_sample"
run="$OUT_ROOT/tinystories_cpu"

if [ ! -f "$stories" ]; then
    echo "error: $stories not found; set SHARED_DATA to the folder that holds tinystories/" >&2
    exit 2
fi
if [ ! -f "$data/meta.json" ]; then
    # The sample marks no story boundaries: one document, its last 10% of text is val.
    python prepare_data.py tinystories --input "$stories" --tokenizer bpe:1024 \
        --val_fraction 0.1 --out_dir "$data"
fi

start=$(date +%s)
python train.py --config configs/tinystories_cpu.json --data.dir="$data" --out_dir="$run"
minutes=$(( ($(date +%s) - start + 30) / 60 ))

python evaluate.py --task loss --checkpoint "$run" --split val --output "$run/val.json"
echo "--- a story from the model (temperature 0.8):"
python generate.py --checkpoint "$run" --prompt "Once upon a time" --max_new_tokens 200 --seed 1
python - "$run" "$minutes" <<'PY'
import json, sys
run, minutes = sys.argv[1], sys.argv[2]
scores = json.load(open(f"{run}/val.json"))
print(
    f"tinystories_cpu: val loss {scores['loss']:.4f}, val_bpb {scores['bits_per_byte']:.4f} "
    f"on the whole val split; training took about {minutes} min"
)
PY
