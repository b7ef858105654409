"""Language-modelling text: any UTF-8 text file (or tiny Shakespeare) as one token stream, and
its scoring by mean token loss and perplexity."""

import argparse
import math
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gptlab.cli import fraction
from gptlab.data import token_dtype, write_data_set
from gptlab.errors import UserError
from gptlab.evaluation import evaluate_loss
from gptlab.tokenizer import Tokenizer

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
CHUNK_CHARS = 1 << 20  # text is read and encoded a megabyte at a time


def read_chunks(path: Path) -> Iterator[str]:
    """The file's text in pieces of about CHUNK_CHARS, cut at line ends (BPE never sees half words)."""
    try:
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
    except UnicodeDecodeError as error:
        raise UserError(
            f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); convert it to UTF-8"
        ) from None


def write_stream(tmp_dir: Path, text_path: Path, tokenizer: Tokenizer, val_fraction: float) -> dict:
    """Encode a text file chunk by chunk; the first 1 - val_fraction of tokens train, the rest val."""
    dtype = token_dtype(tokenizer.vocab_size)
    all_path = tmp_dir / "all.tmp"
    with open(all_path, "wb") as file:
        for chunk in read_chunks(text_path):
            np.asarray(tokenizer.encode(chunk), dtype=dtype).tofile(file)
    tokens = np.memmap(all_path, dtype=dtype, mode="r")
    if len(tokens) < 2:
        raise UserError(f"{text_path} holds too little text ({len(tokens)} tokens) to train on")
    n_val = max(1, int(len(tokens) * val_fraction))
    splits = {"train": tokens[: len(tokens) - n_val], "val": tokens[len(tokens) - n_val :]}
    for split, values in splits.items():
        with open(tmp_dir / f"{split}.bin", "wb") as file:
            for start in range(0, len(values), 1 << 24):
                values[start : start + (1 << 24)].tofile(file)
    counts = {split: len(values) for split, values in splits.items()}
    del tokens, splits
    all_path.unlink()
    return {"format": "stream", "dtype": dtype, "splits": counts}


def char_vocabulary(text_path: Path) -> Tokenizer:
    chars = set()
    for chunk in read_chunks(text_path):
        chars.update(chunk)
    if not chars:
        raise UserError(f"{text_path} is empty; give a file with text in it")
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
    if not (math.isfinite(val_fraction) and 0.0 < val_fraction < 1.0):
        raise UserError(f"--val_fraction {val_fraction} must be between 0 and 1")
    tokenizer = (
        char_vocabulary(text_path) if tokenizer_name == "char" else Tokenizer.load(tokenizer_name)
    )

    def fill(tmp_dir: Path) -> dict:
        meta = write_stream(tmp_dir, text_path, tokenizer, val_fraction)
        return {"source": str(text_path), "tokenizer": tokenizer_name, **meta}

    return write_data_set(out_dir, tokenizer, fill, overwrite, reads_from=[text_path])


def prepare_shakespeare_char(
    input_path: str | None, out_dir: Path, overwrite: bool = False
) -> Path:
    """Tiny Shakespeare with a character vocabulary, 90/10 train/val (nanoGPT's split)."""
    if input_path is not None:
        return prepare_text(input_path, "char", out_dir, 0.1, overwrite)
    with tempfile.TemporaryDirectory() as download_dir:
        input_path = str(Path(download_dir) / "input.txt")
        try:
            urllib.request.urlretrieve(SHAKESPEARE_URL, input_path)
        except OSError as error:
            raise UserError(
                f"could not download tiny Shakespeare ({error}); pass a local copy with --input FILE"
            ) from None
        return prepare_text(input_path, "char", out_dir, 0.1, overwrite)


# ----------------------------------------------------------------------------------------------
# prepare_data.py shakespeare_char|text and evaluate.py --task loss

COMMANDS = {
    "shakespeare_char": "tiny Shakespeare, characters (downloads it, or --input FILE)",
    "text": "any UTF-8 text file as one token stream",
}
SCORES = {"loss": "mean token loss and perplexity (any data set)"}
CHECKPOINT_METRIC = "val_loss"


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "shakespeare_char":
        parser.add_argument("--input", help="local input.txt (default: download it)")
        return
    parser.add_argument("--input", required=True, help="a UTF-8 text file")
    parser.add_argument(
        "--tokenizer", default="char", help="'char', a tokenizer directory, or a hub name"
    )
    parser.add_argument("--name", default="text", help="data set name (directory under data/)")
    parser.add_argument("--val_fraction", type=fraction, default=0.1)


def prepare(command: str, args: argparse.Namespace, out_dir: Path) -> Path:
    if command == "shakespeare_char":
        return prepare_shakespeare_char(args.input, out_dir, args.overwrite)
    return prepare_text(args.input, args.tokenizer, out_dir, args.val_fraction, args.overwrite)


def score(task_name: str, model, tokenizer, meta: dict, split, indices, accelerator, batch_size):
    """Mean token loss and perplexity over the split: (result fields, one-line summary)."""
    loss = evaluate_loss(model, split, indices, accelerator, batch_size)
    result = {"loss": loss, "perplexity": math.exp(loss), "samples": len(indices)}
    return result, f"loss {loss:.4f}, perplexity {math.exp(loss):.3f} on {len(indices):,} samples"


def val_metrics(meta: dict, tokenizer: Tokenizer, split, samples: int):
    """Text adds nothing to the val loss during training."""
    return None
