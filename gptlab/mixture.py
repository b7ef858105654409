"""Training on several prepared data sets at once, mixed by weight.

Weights are shares of training samples. The order is a deterministic interleaving, a pure
function of the global position (like EpochSampler's), so a resume needs nothing but the
position and every process can take its own disjoint share of a batch:

- sample j of source k is due at (2j + 1) / w_k (w normalised to sum to 1: the middle of the
  j-th of its slots), and positions take the samples in order of due time, ties to the lower
  source. At each position the source furthest behind its share (in its own slots) goes next,
  so after any n positions every source has had round(w_k * n) samples, give or take one
  (Webster's apportionment, which never takes back a sample as n grows);
- each source then reads its samples through its own EpochSampler, so a small source repeats
  with a fresh permutation every epoch, without disturbing the others.
"""

import math

import numpy as np

from gptlab.data import EpochSampler, StreamSplit


class BlendedOrder:
    """Which source each global position draws from, and how many each had before a position."""

    def __init__(self, weights: list[float]):
        total = math.fsum(weights)
        self.weights = [w / total for w in weights]

    def due(self, source: int, j: int) -> float:
        """When sample j of a source is due: keys are compared as (due, source)."""
        return (2 * j + 1) / self.weights[source]

    def _earlier(self, source: int, key: tuple[float, int]) -> int:
        """How many samples of `source` come before the sample with (due, source) `key`."""
        n = max(0, math.ceil((key[0] * self.weights[source] - 1) / 2))  # then made exact:
        while n > 0 and (self.due(source, n - 1), source) >= key:
            n -= 1
        while (self.due(source, n), source) < key:
            n += 1
        return n

    def position_of(self, source: int, j: int) -> int:
        """The global position of sample j of a source."""
        key = (self.due(source, j), source)
        return j + sum(self._earlier(i, key) for i in range(len(self.weights)) if i != source)

    def taken(self, position: int) -> list[int]:
        """Samples each source gives to positions 0 .. position - 1."""
        counts = []
        for source in range(len(self.weights)):
            low, high = 0, position  # the count is the first j whose position is >= position
            while low < high:
                middle = (low + high) // 2
                if self.position_of(source, middle) < position:
                    low = middle + 1
                else:
                    high = middle
            counts.append(low)
        return counts

    def sources(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, sample number j within the source) of positions start .. start + count - 1."""
        first = self.taken(start)
        # No source gives more than `count` of the next `count` positions: these candidates hold
        # them all, and sorting by (due, source) puts them in order.
        sources = np.repeat(np.arange(len(self.weights)), count)
        numbers = np.concatenate([np.arange(f, f + count) for f in first])
        due = (2 * numbers + 1) / np.asarray(self.weights)[sources]
        order = np.lexsort((sources, due))[:count]
        return sources[order], numbers[order]


class MixtureSplit:
    """The train splits of several sources as one split: sample offsets[k] + i is sample i of
    source k (the indices MixtureSampler hands out)."""

    def __init__(self, splits: list[StreamSplit]):
        self.splits = splits
        self.sample_length = splits[0].sample_length  # the sources share model.block_size
        self.offsets = np.cumsum([0] + [s.num_samples for s in splits])
        self.num_samples = int(self.offsets[-1])

    def fetch(self, indices: np.ndarray, epochs: np.ndarray | None = None) -> tuple:
        indices = np.asarray(indices)
        owners = np.searchsorted(self.offsets, indices, side="right") - 1
        inputs, targets = None, None
        for k in np.unique(owners):
            rows = np.flatnonzero(owners == k)
            x, y = self.splits[k].fetch(
                indices[rows] - self.offsets[k], None if epochs is None else epochs[rows]
            )
            if inputs is None:
                inputs = x.new_empty((len(indices), x.size(1)))
                targets = y.new_empty((len(indices), y.size(1)))
            inputs[rows], targets[rows] = x, y
        return inputs, targets

    def target_count(self, indices: np.ndarray) -> int:
        """Real target tokens of these samples: every one of a window's (text sources only)."""
        return len(indices) * self.splits[0].block_size


class MixtureSampler:
    """EpochSampler's interface over a blended order of sources, each with its own sampler."""

    def __init__(self, num_samples: list[int], weights: list[float], seed: int):
        self.order = BlendedOrder(weights)
        # Each source its own permutations: seeded apart so that equal sizes differ in order.
        self.samplers = [EpochSampler(n, seed + k) for k, n in enumerate(num_samples)]
        self.offsets = np.cumsum([0] + list(num_samples))
        self.num_samples = int(self.offsets[-1])

    def positions(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(epochs of each source's own sampler, MixtureSplit indices) of global positions
        start, ..., start + count - 1."""
        sources, numbers = self.order.sources(start, count)
        epochs = np.empty(count, dtype=np.int64)
        indices = np.empty(count, dtype=np.int64)
        for k in np.unique(sources):
            rows = np.flatnonzero(sources == k)  # consecutive sample numbers of source k
            e, i = self.samplers[k].positions(int(numbers[rows[0]]), len(rows))
            epochs[rows], indices[rows] = e, i + self.offsets[k]
        return epochs, indices

    def batch_for_process(self, split: MixtureSplit, start: int, batch_size: int, rank: int):
        """This process's share of the global batch that starts at global position `start`."""
        epochs, indices = self.positions(start + rank * batch_size, batch_size)
        return split.fetch(indices, epochs)

    def taken(self, position: int) -> list[int]:
        """Samples drawn from each source by global position `position`."""
        return self.order.taken(position)
