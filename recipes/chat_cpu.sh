#!/usr/bin/env bash
# A chat model on a CPU, every step from the shared data: FastChat's identity conversations as a
# character-level chat set, a small Llama (0.86M parameters, context 512) trained on it from
# scratch, and a four-turn conversation piped through generate.py --chat and checked against
# transformers. Run from the repository root.
#
# The identity set is made to be learnt by heart (FastChat mixes it into its training data), so
# only 5% of the conversations are held out for val: with 10%, seed 0 holds out both conversations
# in which "Who are you?" follows "What is up?".
set -euo pipefail

DATA_ROOT=${DATA_ROOT:-data}
OUT_ROOT=${OUT_ROOT:-out}
SHARED_DATA=${SHARED_DATA:-../shared/data}
DATA=$DATA_ROOT/chat_dummy
RUN=$OUT_ROOT/chat_cpu
QUESTIONS=("What is up?" "Who are you?" "Are you GPT-4?" "Goodbye")

start=$(date +%s)
if [ ! -f "$DATA/meta.json" ]; then
    python prepare_data.py chat --input "$SHARED_DATA/chat/dummy_conversation.json" \
        --val_fraction 0.05 --out_dir "$DATA"
fi
python train.py --config configs/chat_cpu.json --data.dir="$DATA" --out_dir="$RUN"
trained=$(date +%s)
python evaluate.py --task loss --checkpoint "$RUN" --split val --output "$RUN/val.json"

# One conversation of four turns, one message per line in, one reply per line out.
printf '%s\n' "${QUESTIONS[@]}" \
    | python generate.py --checkpoint "$RUN" --chat --temperature 0 > "$RUN/replies.txt"

# The same conversation in transformers: the checkpoint's chat template and greedy generate.
python - "$RUN" <<'PYTHON'
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

run = Path(sys.argv[1])
questions = ["What is up?", "Who are you?", "Are you GPT-4?", "Goodbye"]
ours = (run / "replies.txt").read_text().splitlines()
model = AutoModelForCausalLM.from_pretrained(run / "best").eval()
tokenizer = AutoTokenizer.from_pretrained(run / "best")
messages, same = [], 0
for question, our_reply in zip(questions, ours):
    messages.append({"role": "user", "content": question})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"]
    out = model.generate(ids, max_new_tokens=200, do_sample=False)
    reply = tokenizer.decode(out[0, ids.size(1):], skip_special_tokens=True)
    same += reply == our_reply
    messages.append({"role": "assistant", "content": our_reply})
print(f"transformers (apply_chat_template + greedy generate): {same} of {len(ours)} replies the same")
# What the data answers: help offered, Vicuna by LMSYS, no, goodbye.
says = [
    "help" in ours[0],
    "Vicuna" in ours[1] and "LMSYS" in ours[1],
    ours[2].startswith("No"),
    ours[3].startswith("Goodbye"),
]
print(f"replies that say what the data says: {sum(says)} of {len(says)}")
PYTHON

end=$(date +%s)
echo "--- chat_cpu: the conversation (greedy)"
paste -d '\n' <(printf '> %s\n' "${QUESTIONS[@]}") "$RUN/replies.txt"
python - "$RUN" "$((trained - start))" "$((end - start))" <<'PYTHON'
import json
import sys
from pathlib import Path

run, trained, total = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
val = json.loads((run / "val.json").read_text())["loss"]
print(f"--- chat_cpu: val loss over reply tokens {val:.4f}; data and training {trained // 60} min "
      f"{trained % 60} s; whole recipe {total // 60} min {total % 60} s")
PYTHON
