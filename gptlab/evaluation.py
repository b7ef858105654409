"""Scoring during training and in evaluate.py: the val loss over a fixed subset, shared out over
processes, and the per-evaluation event (val loss plus the task's own score)."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator

from gptlab.data import Split
from models import IGNORE_INDEX

LOGITS_BUDGET = 1 << 28
"""Most logits one evaluation forward pass may hold (1 GiB in fp32): a GPT-2 vocabulary at a
context of 1024 allows 5 windows at a time, whatever --batch_size asks for."""


def windows_per_forward(model: torch.nn.Module, batch_size: int) -> int:
    """Windows per forward pass: batch_size, or fewer where their logits would exceed the budget."""
    per_window = model.config.block_size * model.config.vocab_size
    return max(1, min(batch_size, LOGITS_BUDGET // per_window))


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module, split: Split, indices, accelerator: Accelerator, batch_size: int
) -> float:
    """Mean token loss over the fixed subset `indices`, shared out over and summed across processes."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    shard = indices[accelerator.process_index :: accelerator.num_processes]
    step = windows_per_forward(model, batch_size)
    for start in range(0, len(shard), step):
        inputs, targets = split.fetch(shard[start : start + step])
        targets = targets.to(accelerator.device)
        totals[0] += model(inputs.to(accelerator.device), targets).double()
        totals[1] += (targets != IGNORE_INDEX).sum()
    totals = accelerator.reduce(totals, "sum")
    model.train(was_training)
    return (totals[0] / totals[1]).item()


@dataclass
class ValSet:
    """A val split scored at every evaluation: a fixed subset of its samples."""

    split: Split
    indices: np.ndarray
    name: str = ""
    """A mixture's source name (keys val_loss/<name>); empty for a run's only data set."""
    weight: float = 1.0
    """Its weight in the overall val loss (a mixture's normalised weights)."""
    bpb_per_loss: float | None = None
    """val_bpb / val_loss: the split's tokens per byte over ln 2 (None: no byte counts)."""


@dataclass
class Evaluator:
    """What every macro-batch is scored on: the val loss (and bits per byte) of fixed val
    subsets, plus the data set's own metrics (for example exact match for arithmetic, from its
    task module). A mixture scores each source and weighs them into the overall val_loss."""

    val_sets: list[ValSet]
    batch_size: int
    task_metrics: Callable[[torch.nn.Module, Accelerator], dict] | None = None

    def __call__(self, model, raw_model, accelerator: Accelerator, step: int, tokens: int) -> dict:
        """The eval event after `step`, the same on every process.

        `model` is the compiled model without DDP (processes may get uneven shares, so no
        collective forward); task metrics use the plain `raw_model` (decoding uses its KV cache).
        """
        event = {"step": step, "tokens": tokens}
        scores, losses, bpbs = {}, [], []
        for val in self.val_sets:
            loss = evaluate_loss(model, val.split, val.indices, accelerator, self.batch_size)
            suffix = f"/{val.name}" if val.name else ""
            scores[f"val_loss{suffix}"] = loss
            losses.append(val.weight * loss)
            if val.bpb_per_loss is not None:
                scores[f"val_bpb{suffix}"] = loss * val.bpb_per_loss
                bpbs.append(val.weight * scores[f"val_bpb{suffix}"])
        if len(self.val_sets) > 1:  # a mixture's overall figures: weighted means of its sources
            event["val_loss"] = sum(losses)
            if len(bpbs) == len(self.val_sets):
                event["val_bpb"] = sum(bpbs)
        event.update(scores)
        if self.task_metrics is not None:
            was_training = raw_model.training
            raw_model.eval()
            event.update(self.task_metrics(raw_model, accelerator))
            raw_model.train(was_training)
        return event
