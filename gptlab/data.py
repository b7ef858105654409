"""Prepared data on disk, read through np.memmap, and the sampler that orders it.

A data directory holds `meta.json`, the tokenizer, and per split `<split>.bin` (token ids). Three
shapes of data share one interface:
- a token stream (language modelling): sample i of an epoch is the window of block_size + 1
  tokens starting at offset + i * block_size, the offset drawn per epoch so windows vary;
- fixed-length examples (`<split>.bin` of shape (n, length) plus `<split>_mask.bin`): the loss
  sees only target positions whose mask is 1; the others get the ignore index -100;
- labelled texts (classification: `<split>.bin` of shape (n, length), padded on the right with
  the pad token, plus `<split>_labels.bin` and `<split>_lengths.bin`, int32, and the input row of
  each example in `<split>_rows.bin`): a sample is a text and its label, the one target of a
  classifier.

The memmap is opened anew for every batch, so reading never accumulates resident memory.
"""

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptlab import storage
from gptlab.errors import UserError
from gptlab.tokenizer import Tokenizer
from models.loss import IGNORE_INDEX

DTYPES = ("uint16", "uint32")


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def is_data_set(directory: Path) -> bool:
    return (Path(directory) / "meta.json").is_file()


def write_data_set(
    out_dir: Path,
    tokenizer: Tokenizer,
    fill: Callable[[Path], dict],
    overwrite: bool = False,
    reads_from: Iterable[Path] = (),
) -> Path:
    """Build a data directory: fill(tmp_dir) writes the token files and returns the meta fields;
    the tokenizer and meta.json are added and the whole directory is moved into place at once.
    Only an absent or empty directory, or an existing data set with overwrite, is written."""
    out_dir = Path(out_dir)
    storage.check_output_dir(out_dir, "data set", is_data_set, reads_from)
    if is_data_set(out_dir) and not overwrite:
        raise UserError(f"data set {out_dir} already exists; pass --overwrite to replace it")

    def build(tmp_dir: Path) -> None:
        meta = {**fill(tmp_dir), "vocab_size": tokenizer.vocab_size}
        tokenizer.save(tmp_dir)
        (tmp_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    try:
        return storage.write_directory_atomically(out_dir, build)
    except OSError as error:  # a full disk, a read-only one, no permission
        raise UserError(
            f"could not write data set {out_dir} ({error.strerror or error}); free some space "
            "or fix the permissions, then rerun (nothing was changed)"
        ) from None


def read_meta(data_dir: Path) -> dict:
    """The data set's meta.json, checked to describe a data set we can read."""
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.is_file():
        raise UserError(
            f"no prepared data set in {data_dir}; run `python prepare_data.py {Path(data_dir).name}` "
            "(or see `python prepare_data.py --help`)"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        fmt, dtype, vocab = meta["format"], meta["dtype"], meta["vocab_size"]
        valid = fmt in ("stream", "examples", "classify")
        valid = valid and dtype in DTYPES and isinstance(vocab, int)
        valid = valid and isinstance(meta.get("splits", {}), dict)
        if fmt in ("examples", "classify"):
            valid = valid and isinstance(meta["example_length"], int) and meta["example_length"] > 1
        if fmt == "classify":
            labels, pad = meta["labels"], meta["pad_token_id"]
            valid = valid and isinstance(labels, list) and len(labels) >= 2
            valid = valid and all(isinstance(name, str) for name in labels)
            valid = valid and isinstance(pad, int) and 0 <= pad < vocab
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise UserError(f"{meta_path} is corrupt; prepare the data set again with prepare_data.py")
    return meta


def load_tokenizer(data_dir: Path, meta: dict) -> Tokenizer:
    """The data set's tokenizer, checked against the vocabulary size meta.json records."""
    tokenizer = Tokenizer.load(data_dir)
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise UserError(
            f"{Path(data_dir) / 'tokenizer.json'} has {tokenizer.vocab_size} tokens but meta.json "
            f"says vocab_size {meta['vocab_size']}; prepare the data set again with prepare_data.py"
        )
    return tokenizer


def bits_per_byte(loss: float, meta: dict, split: str) -> float | None:
    """A mean token loss (nats) on a split as bits per UTF-8 byte of its text: the loss times the
    split's tokens per byte, over ln 2. It does not depend on the vocabulary, so character and
    BPE models compare. None for data sets without byte counts (arithmetic, older text sets)."""
    n_bytes = (meta.get("bytes") or {}).get(split)
    n_tokens = (meta.get("splits") or {}).get(split)
    if not n_bytes or not n_tokens:
        return None
    return loss * n_tokens / n_bytes / math.log(2)


@dataclass
class StreamSplit:
    """A token stream cut into windows of block_size + 1 tokens (inputs and shifted targets)."""

    path: Path
    dtype: str
    block_size: int
    seed: int

    def __post_init__(self):
        self.sample_length = self.block_size
        self.n_tokens = token_count(self.path, self.dtype, 1)
        self._offsets: dict[int, int] = {}
        # One window of room at the end, so every epoch offset in [0, block_size) fits.
        self.num_samples = max(0, (self.n_tokens - 1) // self.block_size - 1)
        if self.num_samples < 1:
            raise UserError(
                f"{self.path} has {self.n_tokens} tokens, too few for windows of "
                f"{self.block_size + 1}; lower model.block_size or use more data"
            )

    def epoch_offset(self, epoch: int) -> int:
        if epoch not in self._offsets:  # a new generator per sample would cost more than the read
            rng = np.random.default_rng([self.seed, epoch])
            self._offsets[epoch] = int(rng.integers(self.block_size))
        return self._offsets[epoch]

    def fetch(self, indices: np.ndarray, epochs: np.ndarray | None = None) -> tuple:
        """Inputs and targets (len(indices), block_size); epochs=None reads at offset 0 (eval)."""
        tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        offsets = (
            np.zeros_like(indices)
            if epochs is None
            else np.array([self.epoch_offset(int(e)) for e in epochs])
        )
        starts = offsets + np.asarray(indices) * self.block_size
        # One gather of every window's positions: (n, 1) + (1, block_size + 1).
        windows = tokens[starts[:, None] + np.arange(self.block_size + 1)].astype(np.int64)
        windows = torch.from_numpy(windows)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def target_count(self, indices: np.ndarray) -> int:
        """Real target tokens of these samples: every one of a window's."""
        return len(indices) * self.block_size


@dataclass
class ExampleSplit:
    """Fixed-length examples with a loss mask; targets outside the mask are IGNORE_INDEX."""

    path: Path
    dtype: str
    example_length: int

    def __post_init__(self):
        self.sample_length = self.example_length - 1
        self.mask_path = self.path.with_name(self.path.stem + "_mask.bin")
        self.num_samples = token_count(self.path, self.dtype, self.example_length)
        if not self.mask_path.is_file() or self.mask_path.stat().st_size != (
            self.num_samples * self.example_length
        ):
            raise UserError(
                f"{self.mask_path} is missing or does not match {self.path.name}; prepare the "
                "data set again with prepare_data.py"
            )

    def rows(self, indices: np.ndarray) -> np.ndarray:
        tokens = np.memmap(self.path, dtype=self.dtype, mode="r").reshape(-1, self.example_length)
        return tokens[indices].astype(np.int64)

    def fetch(self, indices: np.ndarray, epochs: np.ndarray | None = None) -> tuple:
        mask = np.memmap(self.mask_path, dtype=np.uint8, mode="r").reshape(-1, self.example_length)
        tokens = torch.from_numpy(self.rows(indices))
        keep = torch.from_numpy(mask[indices][:, 1:].astype(bool))
        targets = tokens[:, 1:].masked_fill(~keep, IGNORE_INDEX)
        return tokens[:, :-1], targets

    def target_count(self, indices: np.ndarray) -> int:
        """Real target tokens of these examples: their masked-in positions after the first."""
        mask = np.memmap(self.mask_path, dtype=np.uint8, mode="r").reshape(-1, self.example_length)
        return int(mask[np.asarray(indices)][:, 1:].sum(dtype=np.int64))


@dataclass
class LabelledSplit:
    """Labelled texts: token rows padded on the right, one label and one real length per row.

    fetch gives (tokens, labels): the rows cut to the longest text of the batch (with causal
    attention the padding after a text changes nothing before it, so this only saves work) and
    the labels (batch,), each example one target.
    """

    path: Path
    dtype: str
    example_length: int

    def __post_init__(self):
        self.sample_length = self.example_length
        self.num_samples = token_count(self.path, self.dtype, self.example_length)
        for name in ("labels", "lengths"):
            column = self.path.with_name(f"{self.path.stem}_{name}.bin")
            if not column.is_file() or column.stat().st_size != 4 * self.num_samples:
                raise UserError(
                    f"{column} is missing or does not match {self.path.name}; prepare the data "
                    "set again with prepare_data.py"
                )

    def column(self, name: str) -> np.ndarray:
        """The labels or the real lengths of every example (int32, memory-mapped)."""
        return np.memmap(self.path.with_name(f"{self.path.stem}_{name}.bin"), np.int32, mode="r")

    def fetch(self, indices: np.ndarray, epochs: np.ndarray | None = None) -> tuple:
        indices = np.asarray(indices)
        tokens = np.memmap(self.path, dtype=self.dtype, mode="r").reshape(-1, self.example_length)
        width = int(self.column("lengths")[indices].max(initial=1))
        rows = torch.from_numpy(tokens[indices, :width].astype(np.int64))
        return rows, torch.from_numpy(self.column("labels")[indices].astype(np.int64))

    def target_count(self, indices: np.ndarray) -> int:
        """Targets of these examples: one label each."""
        return len(indices)


Split = StreamSplit | ExampleSplit | LabelledSplit


def token_count(path: Path, dtype: str, row_length: int) -> int:
    """Rows of row_length tokens in a token file, refusing a file cut short or of an odd size."""
    row_bytes = np.dtype(dtype).itemsize * row_length
    size = path.stat().st_size
    if size % row_bytes:
        raise UserError(
            f"{path} is truncated or corrupt ({size} bytes is not a whole number of "
            f"{dtype} rows of {row_length}); prepare the data set again with prepare_data.py"
        )
    return size // row_bytes


def open_split(data_dir: Path, meta: dict, split: str, block_size: int, seed: int) -> Split:
    path = Path(data_dir) / f"{split}.bin"
    known = meta.get("splits", {})
    if known and split not in known:
        raise UserError(
            f"data set {data_dir} has no split {split!r}; choose one of {', '.join(known)}"
        )
    if not path.is_file():
        raise UserError(f"{path} is missing; prepare the data set again with prepare_data.py")
    if meta["format"] == "stream":
        split_data = StreamSplit(path, meta["dtype"], block_size, seed)
        count, unit = split_data.n_tokens, "tokens"
    else:
        split_class = LabelledSplit if meta["format"] == "classify" else ExampleSplit
        length = meta["example_length"] - (split_class is ExampleSplit)  # inputs, without targets
        if length > block_size:
            raise UserError(
                f"examples of {length} input tokens do not fit model.block_size {block_size}; set "
                f"--model.block_size={length}, or prepare the data with a shorter context"
            )
        split_data = split_class(path, meta["dtype"], meta["example_length"])
        count, unit = split_data.num_samples, "examples"
    expected = known.get(split)
    if expected is not None and expected != count:
        raise UserError(
            f"{path} holds {count} {unit} but meta.json says {expected}; "
            "prepare the data set again with prepare_data.py"
        )
    return split_data


class EpochSampler:
    """Order of samples: a fresh permutation each epoch, a pure function of (seed, position).

    Global position p (samples consumed by all processes together) is sample
    permutation_e[p % n] of epoch e = p // n. A global batch is a run of consecutive positions,
    and each process takes its own contiguous share of it, so shares are disjoint and a resume
    only needs the position.
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = num_samples
        self.seed = seed
        self._permutations: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            self._permutations = {k: v for k, v in self._permutations.items() if k >= epoch - 1}
            rng = np.random.default_rng([self.seed, epoch])
            self._permutations[epoch] = rng.permutation(self.num_samples)
        return self._permutations[epoch]

    def positions(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(epochs, sample indices) of global positions start, ..., start + count - 1."""
        positions = np.arange(start, start + count)
        epochs = positions // self.num_samples
        indices = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            indices[chosen] = self.permutation(int(epoch))[positions[chosen] % self.num_samples]
        return epochs, indices

    def batch_for_process(self, split: Split, start: int, batch_size: int, rank: int) -> tuple:
        """This process's share of the global batch that starts at global position `start`."""
        epochs, indices = self.positions(start + rank * batch_size, batch_size)
        return split.fetch(indices, epochs)


def fixed_subset(num_samples: int, count: int) -> np.ndarray:
    """The same evenly spread sample indices every time: a stable val subset."""
    return np.unique(np.linspace(0, num_samples - 1, min(count, num_samples)).round().astype(int))
