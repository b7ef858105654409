"""Prepared data on disk, read through np.memmap, and the sampler that orders it.

A data directory holds `meta.json`, the tokenizer, and per split `<split>.bin` (token ids). Two
shapes of data share one interface:
- a token stream (language modelling): sample i of an epoch is the window of block_size + 1
  tokens starting at offset + i * block_size, the offset drawn per epoch so windows vary;
- fixed-length examples (`<split>.bin` of shape (n, length) plus `<split>_mask.bin`): the loss
  sees only target positions whose mask is 1; the others get the ignore index -100.

The memmap is opened anew for every batch, so reading never accumulates resident memory.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from config import UserError

IGNORE_INDEX = -100


def read_meta(data_dir: Path) -> dict:
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.is_file():
        raise UserError(
            f"no prepared data set in {data_dir}; run `python prepare_data.py {Path(data_dir).name}` "
            "(or see `python prepare_data.py --help`)"
        )
    return json.loads(meta_path.read_text())


@dataclass
class StreamSplit:
    """A token stream cut into windows of block_size + 1 tokens (inputs and shifted targets)."""

    path: Path
    dtype: str
    block_size: int
    seed: int

    def __post_init__(self):
        self.n_tokens = self.path.stat().st_size // np.dtype(self.dtype).itemsize
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


@dataclass
class ExampleSplit:
    """Fixed-length examples with a loss mask; targets outside the mask are IGNORE_INDEX."""

    path: Path
    dtype: str
    example_length: int

    def __post_init__(self):
        self.mask_path = self.path.with_name(self.path.stem + "_mask.bin")
        itemsize = np.dtype(self.dtype).itemsize
        self.num_samples = self.path.stat().st_size // (itemsize * self.example_length)

    def rows(self, indices: np.ndarray) -> np.ndarray:
        tokens = np.memmap(self.path, dtype=self.dtype, mode="r").reshape(-1, self.example_length)
        return tokens[indices].astype(np.int64)

    def fetch(self, indices: np.ndarray, epochs: np.ndarray | None = None) -> tuple:
        mask = np.memmap(self.mask_path, dtype=np.uint8, mode="r").reshape(-1, self.example_length)
        tokens = torch.from_numpy(self.rows(indices))
        keep = torch.from_numpy(mask[indices][:, 1:].astype(bool))
        targets = tokens[:, 1:].masked_fill(~keep, IGNORE_INDEX)
        return tokens[:, :-1], targets


Split = StreamSplit | ExampleSplit


def open_split(data_dir: Path, meta: dict, split: str, block_size: int, seed: int) -> Split:
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise UserError(f"{path} is missing; prepare the data set again with prepare_data.py")
    if meta["format"] == "stream":
        return StreamSplit(path, meta["dtype"], block_size, seed)
    if meta["example_length"] - 1 > block_size:
        raise UserError(
            f"examples of {meta['example_length'] - 1} input tokens do not fit model.block_size "
            f"{block_size}; set --model.block_size={meta['example_length'] - 1}"
        )
    return ExampleSplit(path, meta["dtype"], meta["example_length"])


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
