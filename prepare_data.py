"""Turn a corpus or a synthetic task into token files that train.py reads through np.memmap.

    python prepare_data.py shakespeare_char [--input input.txt]
    python prepare_data.py adder [--digits 3]
    python prepare_data.py multiplier [--digits 2]
    python prepare_data.py text --input corpus.txt --tokenizer char|DIR|HUB_NAME [--name NAME]

Each writes data/<name>/ (or --out_dir): meta.json, tokenizer.json, and <split>.bin files. The
tokenizer travels with the data and then with every checkpoint, so nothing needs the corpus again.
A directory is built under a temporary name and renamed when complete; an existing data set is
only replaced with --overwrite.
"""

import argparse
import json
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from arithmetic import DEFAULT_DIGITS, VOCABULARY, ArithmeticTask
from config import UserError, run_cli
from tokenizer import Tokenizer

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
CHUNK_CHARS = 1 << 20  # text is read and encoded a megabyte at a time


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def read_chunks(path: Path) -> Iterator[str]:
    """The file's text in pieces of about CHUNK_CHARS, cut at line ends (BPE never sees half words)."""
    with open(path, encoding="utf-8") as file:
        pending = []
        size = 0
        for line in file:
            pending.append(line)
            size += len(line)
            if size >= CHUNK_CHARS:
                yield "".join(pending)
                pending, size = [], 0
        if pending:
            yield "".join(pending)


def write_atomically(out_dir: Path, overwrite: bool, fill) -> Path:
    """Build a data directory with fill(tmp_dir) under a temporary name, then move it into place."""
    if out_dir.exists() and not overwrite:
        raise UserError(f"{out_dir} already exists; pass --overwrite to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    tmp_dir.chmod(0o755)  # mkdtemp makes it private; a data set is meant to be shared
    try:
        fill(tmp_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp_dir.rename(out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def write_stream(
    out_dir: Path, text_path: Path, tokenizer: Tokenizer, val_fraction: float, meta: dict
) -> None:
    """Encode a text file chunk by chunk; the first 1 - val_fraction of tokens train, the rest val."""
    dtype = token_dtype(tokenizer.vocab_size)
    all_path = out_dir / "all.tmp"
    with open(all_path, "wb") as file:
        for chunk in read_chunks(text_path):
            np.asarray(tokenizer.encode(chunk), dtype=dtype).tofile(file)
    tokens = np.memmap(all_path, dtype=dtype, mode="r")
    n_val = int(len(tokens) * val_fraction)
    splits = {"train": tokens[: len(tokens) - n_val], "val": tokens[len(tokens) - n_val :]}
    for split, values in splits.items():
        with open(out_dir / f"{split}.bin", "wb") as file:
            for start in range(0, len(values), 1 << 24):
                values[start : start + (1 << 24)].tofile(file)
    del tokens
    all_path.unlink()
    tokenizer.save(out_dir)
    meta.update(
        format="stream",
        dtype=dtype,
        vocab_size=tokenizer.vocab_size,
        splits={split: len(values) for split, values in splits.items()},
    )
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def char_vocabulary(text_path: Path) -> Tokenizer:
    chars = set()
    for chunk in read_chunks(text_path):
        chars.update(chunk)
    return Tokenizer.from_chars("".join(chars))


def prepare_text(
    input_path: str,
    tokenizer_name: str,
    out_dir: Path,
    val_fraction: float = 0.1,
    overwrite: bool = False,
) -> Path:
    text_path = Path(input_path)
    if not text_path.is_file():
        raise UserError(f"input file {input_path} not found")
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val_fraction {val_fraction} must be between 0 and 1")
    tokenizer = (
        char_vocabulary(text_path) if tokenizer_name == "char" else Tokenizer.load(tokenizer_name)
    )
    meta = {"source": str(text_path), "tokenizer": tokenizer_name}
    return write_atomically(
        out_dir, overwrite, lambda tmp: write_stream(tmp, text_path, tokenizer, val_fraction, meta)
    )


def prepare_shakespeare_char(
    input_path: str | None, out_dir: Path, overwrite: bool = False
) -> Path:
    """Tiny Shakespeare with a character vocabulary, 90/10 train/val (nanoGPT's split)."""
    if input_path is None:
        download_dir = Path(tempfile.mkdtemp())
        input_path = str(download_dir / "input.txt")
        try:
            urllib.request.urlretrieve(SHAKESPEARE_URL, input_path)
        except OSError as error:
            raise UserError(
                f"could not download tiny Shakespeare ({error}); pass a local copy with --input FILE"
            ) from None
    return prepare_text(input_path, "char", out_dir, 0.1, overwrite)


def prepare_arithmetic(
    name: str,
    out_dir: Path,
    digits: int | None = None,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Every pair of n-digit operands (0 .. 10**n - 1), shuffled once and split, no pair in two splits."""
    task = ArithmeticTask(name, digits or DEFAULT_DIGITS[name])
    if not 1 <= task.digits <= 6:
        raise UserError(f"--digits {task.digits} must be between 1 and 6")
    if val_fraction <= 0 or test_fraction <= 0 or val_fraction + test_fraction >= 1:
        raise UserError("--val_fraction and --test_fraction must be positive and sum below 1")
    tokenizer = Tokenizer.from_chars(VOCABULARY)
    n = 10**task.digits
    order = np.random.default_rng(seed).permutation(n * n)
    n_val, n_test = int(n * n * val_fraction), int(n * n * test_fraction)
    splits = {
        "val": order[:n_val],
        "test": order[n_val : n_val + n_test],
        "train": order[n_val + n_test :],
    }

    def fill(tmp_dir: Path) -> None:
        dtype = token_dtype(tokenizer.vocab_size)
        for split, pairs in splits.items():
            examples = task.examples(pairs // n, pairs % n, tokenizer)
            examples.astype(dtype).tofile(tmp_dir / f"{split}.bin")
            mask = np.broadcast_to(task.loss_mask(), examples.shape)
            np.ascontiguousarray(mask).tofile(tmp_dir / f"{split}_mask.bin")
        tokenizer.save(tmp_dir)
        meta = {
            "format": "examples",
            "dtype": dtype,
            "vocab_size": tokenizer.vocab_size,
            "example_length": task.example_length,
            "splits": {split: len(pairs) for split, pairs in splits.items()},
            "task": {"name": name, "digits": task.digits},
        }
        (tmp_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    return write_atomically(out_dir, overwrite, fill)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="dataset", required=True)
    shakespeare = commands.add_parser("shakespeare_char", help="tiny Shakespeare, characters")
    shakespeare.add_argument("--input", help="local input.txt (default: download it)")
    for name in ("adder", "multiplier"):
        task = commands.add_parser(name, help=f"every pair of n-digit operands ({name})")
        task.add_argument("--digits", type=int, default=DEFAULT_DIGITS[name])
        task.add_argument("--val_fraction", type=float, default=0.05)
        task.add_argument("--test_fraction", type=float, default=0.05)
        task.add_argument("--seed", type=int, default=0, help="seed of the split")
    text = commands.add_parser("text", help="any local text file")
    text.add_argument("--input", required=True, help="a UTF-8 text file")
    text.add_argument(
        "--tokenizer", default="char", help="'char', a tokenizer directory, or a hub name"
    )
    text.add_argument("--name", default="text", help="data set name (directory under data/)")
    text.add_argument("--val_fraction", type=float, default=0.1)
    for command in commands.choices.values():
        command.add_argument("--out_dir", help="output directory (default: data/<name>)")
        command.add_argument("--overwrite", action="store_true", help="replace an existing set")
    args = parser.parse_args(argv)

    name = args.name if args.dataset == "text" else args.dataset
    out_dir = Path(args.out_dir or f"data/{name}")
    if args.dataset == "shakespeare_char":
        prepare_shakespeare_char(args.input, out_dir, args.overwrite)
    elif args.dataset == "text":
        prepare_text(args.input, args.tokenizer, out_dir, args.val_fraction, args.overwrite)
    else:
        prepare_arithmetic(
            args.dataset,
            out_dir,
            args.digits,
            args.val_fraction,
            args.test_fraction,
            args.seed,
            args.overwrite,
        )
    meta = json.loads((out_dir / "meta.json").read_text())
    print(f"wrote {out_dir}: vocabulary {meta['vocab_size']}, splits {meta['splits']}")


if __name__ == "__main__":
    run_cli(main)
