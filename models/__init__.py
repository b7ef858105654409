"""Models shared by the scripts: build one from a ModelConfig, and the parts every model shares."""

from dataclasses import replace

from torch import nn

from models.config import ModelConfig
from models.generation import KVCache, generate, sample_next_token
from models.gpt import GPT
from models.llama import Llama
from models.loss import IGNORE_INDEX, token_loss

ARCHITECTURES: dict[str, type[nn.Module]] = {"gpt": GPT, "llama": Llama}

__all__ = [
    "IGNORE_INDEX",
    "ModelConfig",
    "token_loss",
    "KVCache",
    "build_model",
    "generate",
    "sample_next_token",
    "optimizer_groups",
    "count_parameters",
    "with_classification_head",
    "freeze_backbone",
]


def build_model(config: ModelConfig) -> nn.Module:
    """A freshly initialised model of the configured architecture."""
    return ARCHITECTURES[config.arch](config)


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices (2-D and up) only, never on biases or norms.

    The decayed group comes first, so the trainer can update its weight decay by index.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def count_parameters(model: nn.Module, exclude_position_embeddings: bool = True) -> int:
    """Number of parameters (tied weights once). GPT-2 convention: positions excluded."""
    total = sum(p.numel() for p in model.parameters())
    if exclude_position_embeddings and hasattr(model, "wpe"):
        total -= model.wpe.weight.numel()
    return total


def with_classification_head(model: nn.Module, labels: list[str], pad_token_id: int) -> nn.Module:
    """A classifier with the weights of a language model: the same backbone, its output layer
    dropped, and a freshly initialised head of len(labels) classes."""
    config = replace(model.config, labels=list(labels), pad_token_id=pad_token_id)
    classifier = build_model(config)
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    missing, unexpected = classifier.load_state_dict(backbone, strict=False)
    assert missing == ["score.weight"] and not unexpected, (missing, unexpected)
    return classifier.train(model.training)


def freeze_backbone(model: nn.Module, train_blocks: int) -> None:
    """Freeze every weight but the head, the last train_blocks blocks and the final norm.

    Chosen by module, never by parameter name, so the head is always trained, whatever it is
    called (for a language model with tied embeddings, the head is the embedding matrix too).
    """
    if not 0 <= train_blocks <= len(model.blocks):
        raise ValueError(f"train_blocks {train_blocks} is not in 0..{len(model.blocks)}")
    model.requires_grad_(False)
    head = model.score if model.config.num_labels else model.lm_head
    final_norm = model.ln_f if isinstance(model, GPT) else model.norm_f
    for module in (head, final_norm, *model.blocks[len(model.blocks) - train_blocks :]):
        module.requires_grad_(True)
