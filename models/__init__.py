"""Models shared by the scripts: build one from a ModelConfig, and the parts every model shares."""

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
