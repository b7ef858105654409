#!/usr/bin/env bash
# Data preparation throughput and peak memory: prepare_data.py against nanoGPT's way (tiktoken
# through datasets.map), on the same 100 MB corpus built from the shared samples.
#
#   pip install tiktoken    # nanoGPT's way needs it (ours falls back to tokenizers without it)
#   bash recipes/prepare_speed.sh
set -euo pipefail

SHARED_DATA=${SHARED_DATA:-../shared/data}
DATA_ROOT=${DATA_ROOT:-data}
OUT_ROOT=${OUT_ROOT:-out}
corpus="$DATA_ROOT/prepare_speed/corpus.jsonl"
mkdir -p "$DATA_ROOT/prepare_speed" "$OUT_ROOT"

# Documents of about 4 KB (OpenWebText's mean) cut at paragraph breaks from TinyStories, tiny
# Shakespeare and the ChnSentiCorp reviews (Chinese), repeated to 100 MB of UTF-8 text.
if [ ! -f "$corpus" ]; then
    python - "$SHARED_DATA" "$corpus" <<'PY'
import csv, json, sys
from pathlib import Path

shared, out = Path(sys.argv[1]), Path(sys.argv[2])
with open(shared / "chnsenticorp/ChnSentiCorp_htl_all.csv", encoding="utf-8") as file:
    reviews = "\n\n".join(row["review"] for row in csv.DictReader(file) if row["review"])
sources = ["tinystories/tinystories_val.txt", "tinyshakespeare/input.txt"]
texts = [(shared / name).read_text(encoding="utf-8") for name in sources] + [reviews]
documents = []
for text in texts:
    paragraphs = []
    for paragraph in text.split("\n\n"):
        paragraphs.append(paragraph)
        if sum(map(len, paragraphs)) >= 4000:
            documents.append("\n\n".join(paragraphs))
            paragraphs = []
    documents.append("\n\n".join(paragraphs))
lines = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in documents)
round_bytes = sum(len(d.encode()) for d in documents)
rounds = -(-100_000_000 // round_bytes)
with open(out.with_suffix(".tmp"), "w", encoding="utf-8") as file:
    for _ in range(rounds):
        file.write(lines)
out.with_suffix(".tmp").rename(out)
print(f"{out}: {rounds * len(documents):,} documents, {rounds * round_bytes / 1e6:.1f} MB of text")
PY
fi

python benchmark.py --prepare "$corpus" --tokenizer "$SHARED_DATA/gpt2-tokenizer" --nanogpt \
    --output "$OUT_ROOT/prepare_speed.json"
