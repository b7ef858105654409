"""The training losses, written once for every model: summed cross-entropy over real targets
(tokens of a language model, examples of a classifier)."""

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
"""Target id that the loss skips (prompt positions, padding)."""


def token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy (in fp32) of logits (batch, time, vocab) against targets (batch, time),
    skipping IGNORE_INDEX. Summed, not averaged: the trainer divides by the real-token count of
    the whole optimizer step, so every token weighs the same in every micro-batch and process."""
    return F.cross_entropy(
        logits.float().view(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def head_loss(hidden: Tensor, head_weight: Tensor, targets: Tensor, chunk: int = 0) -> Tensor:
    """token_loss of the output layer's logits (hidden @ head_weight.T) against targets.

    With chunk > 0 the positions go chunk at a time, and each chunk's logits are recomputed in
    the backward pass instead of kept: fp32 logits of at most `chunk` positions ever exist, not
    of the whole batch (for a 50k vocabulary, 16 x 1024 positions hold 3.3 GB of them), for one
    more output-layer matmul.
    """
    if chunk <= 0 or chunk >= targets.numel():
        return token_loss(F.linear(hidden, head_weight), targets)
    hidden = hidden.reshape(-1, hidden.size(-1))
    targets = targets.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk):
        piece = slice(start, start + chunk)
        total = total + checkpoint(
            _chunk_loss, hidden[piece], head_weight, targets[piece], use_reentrant=False
        )
    return total


def _chunk_loss(hidden: Tensor, head_weight: Tensor, targets: Tensor) -> Tensor:
    return token_loss(F.linear(hidden, head_weight), targets)


def label_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed cross-entropy (in fp32) of class logits (batch, num_labels) against labels (batch,).
    Summed like token_loss: each example is one target, so the trainer's count of real targets
    is the number of examples and every example weighs the same."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
