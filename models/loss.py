"""The training loss, written once for every model: summed token cross-entropy over real targets."""

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
