"""How fast data preparation runs and how much memory it takes: prepare_data.py against nanoGPT's
way, on the same corpus (benchmark.py --prepare).

nanoGPT prepares OpenWebText by loading the corpus with `datasets.load_dataset` (an Arrow copy in
the cache), encoding each document with tiktoken's GPT-2 encoding in `datasets.map(num_proc=...)`,
and copying the token lists into one np.memmap per split. Each way runs as a fresh process with an
empty `datasets` cache; its memory is sampled over the whole process tree (map's workers
included), its CPU time is that of every process it started.
"""

import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from gptlab.errors import UserError

NANOGPT_WAY = r"""
import sys
import numpy as np
import datasets
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

corpus, tokenizer_dir, out_dir, num_proc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
# tiktoken's GPT-2 encoding, from the local copy of OpenAI's vocab.bpe and encoder.json.
ranks = data_gym_to_mergeable_bpe_ranks(f"{tokenizer_dir}/merges.txt", f"{tokenizer_dir}/vocab.json")
gpt2 = tiktoken.Encoding(
    "gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
)
corpus_set = datasets.load_dataset("json", data_files=corpus, split="train", num_proc=num_proc)
splits = corpus_set.train_test_split(test_size=0.0005, seed=2357, shuffle=True)

def encode(example):
    ids = gpt2.encode_ordinary(example["text"]) + [gpt2.eot_token]
    return {"ids": ids, "len": len(ids)}

encoded = splits.map(encode, remove_columns=["text"], num_proc=num_proc)
tokens = 0
for name, part in encoded.items():
    length = int(np.sum(part["len"], dtype=np.uint64))
    out = np.memmap(f"{out_dir}/{name}.bin", dtype=np.uint16, mode="w+", shape=(length,))
    start, shards = 0, min(1024, len(part))
    for index in range(shards):
        shard = part.shard(num_shards=shards, index=index, contiguous=True).with_format("numpy")
        ids = np.concatenate(shard["ids"])
        out[start : start + len(ids)] = ids
        start += len(ids)
    out.flush()
    tokens += length
print("tokens", tokens)
"""


@dataclass
class Measured:
    way: str
    tokens: int
    seconds: float
    cpu_seconds: float
    peak_rss_mb: float
    """Largest sum of the resident memory of the process and all its children at one moment."""

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.seconds


def run_measured(way: str, command: list[str], env: dict, count_tokens) -> Measured:
    """Run a command to its end, sampling the resident memory of its process tree."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        process = psutil.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak = 0
        while process.poll() is None:
            total = 0
            for member in [process, *process.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # it ended since the listing
                    total += member.memory_info().rss
            peak = max(peak, total)
            time.sleep(0.05)
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if process.returncode != 0:
            log.seek(0)
            tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
            raise UserError(f"{way} failed ({process.returncode}): {' | '.join(tail)}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Measured(way, count_tokens(), seconds, cpu, peak / 1e6)


def compare(corpus: Path, tokenizer_dir: Path, nanogpt: bool, repo: Path) -> list[Measured]:
    """Prepare `corpus` (a .jsonl of {"text": ...}) our way and, if asked, nanoGPT's way."""
    if not corpus.is_file():
        raise UserError(f"--prepare {corpus} not found; build the corpus first (see recipes/)")
    if nanogpt:
        try:
            import tiktoken  # noqa: F401  (only for the comparison; not a requirement)
        except ImportError:
            raise UserError("nanoGPT's way needs tiktoken: pip install tiktoken") from None
    results = []
    with tempfile.TemporaryDirectory(dir=corpus.parent) as work:
        work = Path(work)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
        ours = work / "ours"
        command = [sys.executable, str(repo / "prepare_data.py"), "text", "--input", str(corpus)]
        command += ["--tokenizer", str(tokenizer_dir), "--out_dir", str(ours)]
        command += ["--val_fraction", "0.0005"]
        results.append(
            run_measured(
                "prepare_data.py",
                command,
                {**env, "HF_DATASETS_CACHE": str(work / "cache-ours")},
                lambda: sum(json.loads((ours / "meta.json").read_text())["splits"].values()),
            )
        )
        if nanogpt:
            theirs = work / "nanogpt"
            theirs.mkdir()
            command = [sys.executable, "-c", NANOGPT_WAY, str(corpus), str(tokenizer_dir)]
            command += [str(theirs), str(os.cpu_count())]
            results.append(
                run_measured(
                    "nanoGPT's way (tiktoken in datasets.map)",
                    command,
                    {**env, "HF_DATASETS_CACHE": str(work / "cache-nanogpt")},
                    lambda: sum(p.stat().st_size // 2 for p in theirs.glob("*.bin")),
                )
            )
    return results


def report(corpus: Path, results: list[Measured], output: str | None) -> None:
    size = corpus.stat().st_size / 1e6
    for r in results:
        print(
            f"{r.way}: {r.tokens:,} tokens of {corpus} ({size:.0f} MB) in {r.seconds:.1f} s: "
            f"{r.tokens_per_sec:,.0f} tokens/s, {r.cpu_seconds:.1f} CPU-seconds, peak resident "
            f"memory {r.peak_rss_mb:,.0f} MB"
        )
    if output:
        rows = [{**asdict(r), "tokens_per_sec": r.tokens_per_sec} for r in results]
        Path(output).write_text(json.dumps({"corpus_mb": size, "runs": rows}, indent=2) + "\n")
