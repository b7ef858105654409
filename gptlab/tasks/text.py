"""Language modelling on text: any corpus (local files or a Hugging Face data set, see
gptlab/corpus.py) tokenized into train and val token streams, the TinyStories, OpenWebText and
tiny Shakespeare presets, and scoring by mean token loss, perplexity and bits per byte.

Every document is followed by the tokenizer's end-of-text token. The val split is drawn by
document with a seeded generator (no document is in both splits); a corpus that is one document,
such as tiny Shakespeare, is cut by position instead: the last val_fraction of its characters are
val (nanoGPT's split). The whole pass streams: documents are read, encoded on every core and
appended to the token files batch by batch, so no corpus is ever held in memory.
"""

import argparse
import math
import queue
import re
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptlab import storage
from gptlab.cli import fraction, random_seed
from gptlab.corpus import Corpus, count_characters
from gptlab.data import bits_per_byte, is_data_set, token_dtype, write_data_set
from gptlab.errors import UserError
from gptlab.evaluation import evaluate_loss
from gptlab.fast_encoding import BatchEncoder
from gptlab.tokenizer import Tokenizer, bpe_size

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
PIECE_CHARS = 1 << 20
"""Longer documents are encoded in pieces of about this many characters (see cut_into_pieces)."""
BATCH_CHARS = 1 << 22
"""Characters encoded per call of the tokenizer (its threads share out the batch's texts)."""


@dataclass
class Preset:
    source: str
    tokenizer: str
    val_fraction: float
    about: str


PRESETS = {
    "tinystories": Preset(
        "hf:roneneldan/TinyStories",
        "bpe:4096",
        0.01,
        "TinyStories (roneneldan/TinyStories, or --input files), a 4096-token BPE trained on it",
    ),
    "openwebtext": Preset(
        "hf:Skylion007/openwebtext",
        "gpt2",
        0.0005,
        "OpenWebText (Skylion007/openwebtext, or --input files), the GPT-2 tokenizer",
    ),
}


# ----------------------------------------------------------------------------------------------
# What goes where: the split of a corpus into batches of (text, is val, ends a document)


@dataclass
class Batch:
    texts: list[str] = field(default_factory=list)
    is_val: list[bool] = field(default_factory=list)
    ends_document: list[bool] = field(default_factory=list)
    chars: int = 0

    def add(self, text: str, is_val: bool, ends_document: bool) -> None:
        self.texts.append(text)
        self.is_val.append(is_val)
        self.ends_document.append(ends_document)
        self.chars += len(text)


NEWLINE_BETWEEN_WORDS = re.compile(r"(?<=\S)\n(?=\S)")


def cut_into_pieces(text: str) -> list[str]:
    """A long text in pieces of about PIECE_CHARS characters, cut only at a newline between two
    non-space characters. GPT-2-style pre-tokenization always splits there, so the pieces
    encode to exactly the tokens of the whole (for byte-level BPE and characters)."""
    size, pieces, start = PIECE_CHARS, [], 0
    while len(text) - start > size:
        match = NEWLINE_BETWEEN_WORDS.search(text, start + size)
        if match is None:
            break
        pieces.append(text[start : match.end()])
        start = match.end()
    pieces.append(text[start:])
    return pieces


@dataclass
class DocumentSplit:
    """Each document is val with probability val_fraction, drawn in order from a generator
    seeded with `seed`: the same corpus and seed give the same split, however it is read."""

    val_fraction: float
    seed: int

    def batches(self, corpus: Corpus) -> Iterator[Batch]:
        rng = np.random.default_rng(self.seed)
        batch = Batch()
        for texts in corpus.text_batches():
            for text, is_val in zip(texts, rng.random(len(texts)) < self.val_fraction):
                pieces = cut_into_pieces(text)
                for i, piece in enumerate(pieces):
                    batch.add(piece, bool(is_val), i == len(pieces) - 1)
                if batch.chars >= BATCH_CHARS:
                    yield batch
                    batch = Batch()
        if batch.texts:
            yield batch

    def all_texts(self, corpus: Corpus) -> Iterator[str]:
        return corpus.texts()


@dataclass
class PositionSplit:
    """A corpus that is one document (a .txt file): its first 1 - val_fraction of characters
    train, the rest is val (ended by the end-of-text token)."""

    val_fraction: float
    file: Path

    def batches(self, corpus: Corpus) -> Iterator[Batch]:
        cut = int(count_characters(self.file) * (1 - self.val_fraction))
        batch = Batch()
        position, pending = 0, ""  # characters before `pending`, and text not yet in a batch
        for line in corpus.lines():
            if position + len(pending) < cut <= position + len(pending) + len(line):
                head = cut - position - len(pending)  # val begins in this line
                for piece in cut_into_pieces(pending + line[:head]):
                    batch.add(piece, False, False)
                position, pending, line = cut, "", line[head:]
            pending += line
            if len(pending) >= 2 * PIECE_CHARS:
                *done, pending = cut_into_pieces(pending)
                for piece in done:
                    batch.add(piece, position >= cut, False)
                    position += len(piece)
            if batch.chars >= BATCH_CHARS:
                yield batch
                batch = Batch()
        for piece in cut_into_pieces(pending) if pending else []:
            batch.add(piece, position >= cut, False)
            position += len(piece)
        batch.add("", True, True)  # the document ends at the end of val: its end-of-text token
        yield batch

    def all_texts(self, corpus: Corpus) -> Iterator[str]:
        for batch in self.batches(corpus):
            yield from batch.texts


def split_plan(corpus: Corpus, val_fraction: float, seed: int) -> DocumentSplit | PositionSplit:
    single = corpus.single_document()
    return PositionSplit(val_fraction, single) if single else DocumentSplit(val_fraction, seed)


# ----------------------------------------------------------------------------------------------
# Tokenizers: char, a directory or hub name, or bpe:N trained on the train split


def make_tokenizer(spec: str, corpus: Corpus, plan) -> Tokenizer:
    """The tokenizer `spec` names, with an end-of-text token (added where it has none)."""
    if spec == "char":  # every character of the corpus (a val-only character must encode too)
        chars: set[str] = set()
        for text in plan.all_texts(corpus):
            chars.update(text)
        if not chars:
            raise UserError(
                f"{corpus.describe()} is empty (no text in it); give a corpus with text"
            )
        return Tokenizer.from_chars("".join(chars))
    if spec.startswith("bpe:"):
        size = bpe_size(spec)  # checked before anything is read
        print(f"training a {size}-token BPE on the train split of {corpus.describe()}")
        train_texts = (
            text
            for batch in plan.batches(corpus)
            for text, is_val in zip(batch.texts, batch.is_val)
            if not is_val
        )
        return Tokenizer.train_bpe(train_texts, size)
    return Tokenizer.load(spec).with_end_of_text()


# ----------------------------------------------------------------------------------------------
# Writing the token files


@dataclass
class SplitFile:
    """One split's token file, appended to batch by batch, with its counts."""

    path: Path
    dtype: str
    tokens: int = 0
    bytes: int = 0
    documents: int = 0
    last_document: tuple[int, int] = (0, 0)
    """Tokens and bytes of the last whole document written (to move it to the other split)."""
    _open_document: tuple[int, int] = (0, 0)

    def write(self, pieces: list, texts: list[str], ends: list[bool], eos: int) -> None:
        """Append the ids of some texts; an end-of-text token after those that end a document."""
        parts = []
        for piece, text, end in zip(pieces, texts, ends):
            size = len(text) if text.isascii() else len(text.encode("utf-8"))
            tokens, n_bytes = self._open_document
            self._open_document = (tokens + len(piece) + end, n_bytes + size)
            parts.append(np.asarray(piece, dtype=self.dtype))
            if end:
                parts.append(np.array([eos], dtype=self.dtype))
                self.documents += 1
                self.last_document, self._open_document = self._open_document, (0, 0)
            self.bytes += size
        values = np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)
        with open(self.path, "ab") as file:
            values.tofile(file)
        self.tokens += len(values)

    def move_last_document_to(self, other: "SplitFile") -> None:
        tokens, n_bytes = self.last_document
        keep = (self.tokens - tokens) * np.dtype(self.dtype).itemsize
        with open(self.path, "r+b") as file:
            file.seek(keep)
            tail = file.read()
            file.truncate(keep)
        with open(other.path, "ab") as file:
            file.write(tail)
        self.tokens, self.bytes, self.documents = (
            self.tokens - tokens,
            self.bytes - n_bytes,
            self.documents - 1,
        )
        other.tokens, other.bytes, other.documents = (
            other.tokens + tokens,
            other.bytes + n_bytes,
            other.documents + 1,
        )


def read_ahead(batches: Iterator[Batch], depth: int = 2) -> Iterator[Batch]:
    """The batches, read by a thread of their own while the tokenizer encodes the previous ones
    (encoding releases the GIL, so reading and encoding overlap)."""
    pending: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def reader() -> None:
        try:
            for batch in batches:
                pending.put(batch)
            pending.put(done)
        except BaseException as error:  # handed to the main thread, raised there
            pending.put(error)

    threading.Thread(target=reader, daemon=True).start()
    while (item := pending.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def write_splits(tmp_dir: Path, corpus: Corpus, plan, tokenizer: Tokenizer) -> dict:
    """Encode the corpus into train.bin and val.bin; return the meta.json fields they add."""
    dtype = token_dtype(tokenizer.vocab_size)
    train, val = (SplitFile(tmp_dir / f"{name}.bin", dtype) for name in ("train", "val"))
    for split in (train, val):
        split.path.touch()
    encode = BatchEncoder(tokenizer)
    bar = tqdm(unit="doc", unit_scale=True, disable=not sys.stderr.isatty(), desc="encoding")
    started = time.perf_counter()
    for batch in read_ahead(plan.batches(corpus)):
        encoded = encode(batch.texts)
        for split, wanted in ((train, False), (val, True)):
            chosen = [i for i, is_val in enumerate(batch.is_val) if is_val == wanted]
            if chosen:
                split.write(
                    [encoded[i] for i in chosen],
                    [batch.texts[i] for i in chosen],
                    [batch.ends_document[i] for i in chosen],
                    tokenizer.eos_token_id,
                )
        bar.update(sum(batch.ends_document))
        bar.set_postfix(tokens=f"{train.tokens + val.tokens:,}")
    bar.close()
    seconds = time.perf_counter() - started
    documents = train.documents + val.documents
    if documents == 0 or train.bytes + val.bytes == 0:
        raise UserError(f"{corpus.describe()} is empty (no text in it); give a corpus with text")
    if isinstance(plan, DocumentSplit):
        if documents == 1:
            raise UserError(
                f"{corpus.describe()} holds a single document, which cannot be split by "
                "document; give it as one .txt file to split it by position"
            )
        if val.documents == 0:  # a small corpus where no draw fell below val_fraction
            train.move_last_document_to(val)
        elif train.documents == 0:
            val.move_last_document_to(train)
    if min(train.tokens, val.tokens) < 2:
        raise UserError(
            f"{corpus.describe()} holds too little text to split ({train.tokens} train and "
            f"{val.tokens} val tokens); give more text or another --val_fraction"
        )
    tokens = train.tokens + val.tokens
    print(
        f"encoded {documents:,} documents, {tokens:,} tokens in {seconds:.1f} s "
        f"({tokens / max(seconds, 1e-9):,.0f} tokens/s, {encode.engine})"
    )
    return {
        "format": "stream",
        "dtype": dtype,
        "splits": {"train": train.tokens, "val": val.tokens},
        "bytes": {"train": train.bytes, "val": val.bytes},
        "documents": {"train": train.documents, "val": val.documents},
        "eos_token_id": tokenizer.eos_token_id,
        "split_by": "position" if isinstance(plan, PositionSplit) else "document",
    }


def prepare_corpus(
    corpus: Corpus,
    tokenizer_spec: str,
    out_dir: Path,
    val_fraction: float = 0.1,
    seed: int = 1337,
    overwrite: bool = False,
) -> Path:
    """Tokenize a corpus into a data set directory (written whole or not at all)."""
    if not (math.isfinite(val_fraction) and 0.0 < val_fraction < 1.0):
        raise UserError(f"--val_fraction {val_fraction} must be between 0 and 1")
    # Refuse a bad output directory before spending time on a tokenizer.
    storage.check_output_dir(out_dir, "data set", is_data_set, corpus.files)
    if is_data_set(out_dir) and not overwrite:
        raise UserError(f"data set {out_dir} already exists; pass --overwrite to replace it")
    plan = split_plan(corpus, val_fraction, seed)
    tokenizer = make_tokenizer(tokenizer_spec, corpus, plan)

    def fill(tmp_dir: Path) -> dict:
        meta = write_splits(tmp_dir, corpus, plan, tokenizer)
        settings = {"tokenizer": tokenizer_spec, "val_fraction": val_fraction, "seed": seed}
        return {"source": corpus.describe(), **settings, **meta}

    return write_data_set(out_dir, tokenizer, fill, overwrite, reads_from=corpus.files)


def prepare_text(
    input_path: str,
    tokenizer_name: str,
    out_dir: Path,
    val_fraction: float = 0.1,
    overwrite: bool = False,
) -> Path:
    """A local corpus (a file, directory or glob) with the tokenizer named (see prepare_corpus)."""
    return prepare_corpus(
        Corpus(input_path), tokenizer_name, out_dir, val_fraction, 1337, overwrite
    )


def prepare_shakespeare_char(
    input_path: str | None, out_dir: Path, overwrite: bool = False
) -> Path:
    """Tiny Shakespeare with a character vocabulary, 90/10 train/val by position (nanoGPT's)."""
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
# prepare_data.py shakespeare_char|text|tinystories|openwebtext and evaluate.py --task loss

COMMANDS = {
    "shakespeare_char": "tiny Shakespeare, characters (downloads it, or --input FILE)",
    "text": "any corpus: .txt/.jsonl/.json/.parquet/.csv files, a directory, a glob or hf:NAME",
    **{name: preset.about for name, preset in PRESETS.items()},
}
SCORES = {"loss": "mean token loss, perplexity and bits per byte (any data set)"}
CHECKPOINT_METRIC = "val_loss"


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "shakespeare_char":
        parser.add_argument("--input", help="local input.txt (default: download it)")
        return
    preset = PRESETS.get(command)
    parser.add_argument(
        "--input",
        required=preset is None,
        default=preset.source if preset else None,
        help="a .txt/.jsonl/.json/.parquet/.csv file, a directory or glob of them, or hf:NAME "
        f"(a Hugging Face data set){f'; default {preset.source}' if preset else ''}",
    )
    parser.add_argument(
        "--text_column", default="text", help="column holding the documents (default: text)"
    )
    parser.add_argument("--config_name", help="hf: sources: the data set's configuration")
    parser.add_argument("--split", default="train", help="hf: sources: the split to read")
    parser.add_argument(
        "--tokenizer",
        default=preset.tokenizer if preset else "char",
        help="char, a tokenizer directory, a hub name, or bpe:N (a byte-level BPE of N tokens "
        f"trained on the train split); default {preset.tokenizer if preset else 'char'}",
    )
    if preset is None:
        parser.add_argument("--name", default="text", help="data set name (directory under data/)")
    parser.add_argument(
        "--val_fraction",
        type=fraction,
        default=preset.val_fraction if preset else 0.1,
        help="share of documents drawn for val (of characters, for a one-document corpus)",
    )
    parser.add_argument(
        "--seed", type=random_seed, default=1337, help="seed of the val draw (default 1337)"
    )


def prepare(command: str, args: argparse.Namespace, out_dir: Path) -> Path:
    if command == "shakespeare_char":
        return prepare_shakespeare_char(args.input, out_dir, args.overwrite)
    corpus = Corpus(args.input, args.text_column, args.config_name, args.split)
    return prepare_corpus(
        corpus, args.tokenizer, out_dir, args.val_fraction, args.seed, args.overwrite
    )


def score(task_name: str, model, tokenizer, meta: dict, split, indices, accelerator, batch_size):
    """Mean token loss, perplexity and bits per byte over the split: (result fields, summary)."""
    loss = evaluate_loss(model, split, indices, accelerator, batch_size)
    result = {"loss": loss, "perplexity": math.exp(loss), "samples": len(indices)}
    summary = f"loss {loss:.4f}, perplexity {math.exp(loss):.3f}"
    bpb = bits_per_byte(loss, meta, split.path.stem)
    if bpb is not None:
        result["bits_per_byte"] = bpb
        summary += f", {bpb:.4f} bits per byte"
    return result, f"{summary} on {len(indices):,} samples"


def val_metrics(meta: dict, tokenizer: Tokenizer, split, samples: int):
    """Text adds nothing to the val loss during training (val_bpb is derived from it)."""
    return None
