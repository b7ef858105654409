"""The training losses, written once for every model: summed cross-entropy over real targets
(tokens of a language model, examples of a classifier)."""

from torch import Tensor
from torch.nn import functional as F

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


def label_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed cross-entropy (in fp32) of class logits (batch, num_labels) against labels (batch,).
    Summed like token_loss: each example is one target, so the trainer's count of real targets
    is the number of examples and every example weighs the same."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
