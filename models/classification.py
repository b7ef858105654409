"""The classification head every model shares, as transformers' *ForSequenceClassification does it:
class logits from the hidden state at the last real token of each row.

Rows are padded on the right with the model's pad token. Attention is causal, so the padding after
a text changes nothing at or before its last token: no attention mask is needed, only the right
position to pool. A text with an end-of-text token appended (see prepare_data.py classify
--pooling eot) is pooled at that token, since it is the text's last real token.
"""

import torch
from torch import Tensor, nn

from models.loss import label_loss


def last_real_positions(idx: Tensor, pad_token_id: int) -> Tensor:
    """Position of the rightmost token that is not padding, in each row of idx (batch, time)."""
    not_pad = (idx != pad_token_id).to(torch.int32)
    positions = torch.arange(idx.size(1), device=idx.device, dtype=torch.int32)
    return (positions * not_pad).argmax(dim=-1)


def classify(
    hidden: Tensor, idx: Tensor, score: nn.Linear, pad_token_id: int, labels: Tensor | None
) -> Tensor:
    """Logits (batch, num_labels) from the final hidden states (batch, time, width) at each row's
    last real token, or their summed loss against labels (batch,) when labels are given."""
    rows = torch.arange(hidden.size(0), device=hidden.device)
    logits = score(hidden[rows, last_real_positions(idx, pad_token_id)])
    return logits if labels is None else label_loss(logits, labels)
