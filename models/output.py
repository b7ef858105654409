"""The output layer every model shares: the language-model head (tied to the token embedding or
not) or a classification head, and what a forward pass returns from the final hidden states."""

from torch import Tensor, nn

from models.classification import classify
from models.config import ModelConfig
from models.loss import head_loss


def add_output_layer(model: nn.Module, config: ModelConfig) -> None:
    """Give the model (which has its token embedding `wte`) `score`, class logits, if it is a
    classifier (config.num_labels), else `lm_head`, next-token logits (transformers' names)."""
    if config.num_labels:
        model.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
    else:
        model.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            model.lm_head.weight = model.wte.weight


def output(
    model: nn.Module, hidden: Tensor, idx: Tensor, targets: Tensor | None, logits_to_keep: int
) -> Tensor:
    """What forward returns from the final (normalised) hidden states (batch, time, width): a
    classifier's class logits or their summed loss (see models.classification); a language
    model's summed loss against targets (see models.loss), or logits of the last logits_to_keep
    positions (0: all)."""
    config = model.config
    if config.num_labels:
        return classify(hidden, idx, model.score, config.pad_token_id, targets)
    if targets is not None:
        return head_loss(hidden, model.lm_head.weight, targets, config.loss_chunk)
    return model.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
