"""One optimizer step and what it needs: precision, the model and its optimizer, the batches.

train.py reads as the run; the pieces it calls live here so that the benchmark and the tests run
exactly the same step.
"""

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

import models
from gptlab import checkpoints, tasks
from gptlab.config import Config, MixtureSource
from gptlab.data import (
    EpochSampler,
    Split,
    bits_per_byte,
    fixed_subset,
    load_tokenizer,
    open_split,
    read_meta,
)
from gptlab.errors import UserError
from gptlab.evaluation import ValSet
from gptlab.mixture import MixtureSampler, MixtureSplit
from gptlab.scheduler import StepSettings
from gptlab.tasks import arithmetic
from gptlab.tokenizer import Tokenizer
from models import IGNORE_INDEX, optimizer_groups

T = TypeVar("T")


@dataclass
class Progress:
    step: int = 0
    """Optimizer steps taken."""
    tokens: int = 0
    """Input tokens trained on, all processes together (the schedules' clock)."""
    samples: int = 0
    """Global position of the data sampler: samples consumed by all processes together."""


@dataclass
class LogWindow:
    """Training since the last log event, summed on this process."""

    loss: torch.Tensor
    """Summed token loss."""
    targets: int = 0
    """Real (unmasked) target tokens."""
    tokens: int = 0
    """Input tokens of all processes (for throughput)."""
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def restart(self) -> None:
        """Restart the clock (after an evaluation, whose time is not training throughput)."""
        self.started = time.perf_counter()

    def mean_loss(self, accelerator: Accelerator) -> float:
        """Mean loss per real token over every process: the logged training loss."""
        targets = torch.tensor(self.targets, device=self.loss.device, dtype=self.loss.dtype)
        totals = accelerator.reduce(torch.stack([self.loss, targets]), "sum")
        return (totals[0] / totals[1]).item()


def on_main_process(accelerator: Accelerator, work: Callable[[], T]) -> T | None:
    """Run work() on the main process only, and fail on every process if it fails there, so
    that no process waits at the next barrier for one that has died (a full disk, say)."""
    result, failure = None, [None]
    if accelerator.is_main_process:
        try:
            result = work()
        except UserError as error:
            failure = [str(error)]
        except OSError as error:
            failure = [f"{error.filename or 'a file'}: {error.strerror}; fix that, then rerun"]
    if accelerator.num_processes > 1:
        broadcast_object_list(failure)
    if failure[0] is not None:
        raise UserError(failure[0])
    return result


def open_data(config: Config, accelerator: Accelerator) -> dict:
    """Read the data set's metadata, preparing a built-in synthetic set first if it is missing."""
    data_dir = config.data.path
    name = config.data.name
    if not (data_dir / "meta.json").exists() and name in arithmetic.COMMANDS:
        on_main_process(accelerator, lambda: prepare_built_in(name, data_dir))
    return read_meta(data_dir)


def prepare_built_in(name: str, data_dir: Path) -> None:
    print(f"preparing the {name} data set in {data_dir}")
    arithmetic.prepare_arithmetic(name, data_dir)


@dataclass
class TrainingData:
    """What a run trains and is scored on: one prepared data set, or several mixed by weight."""

    meta: dict
    """meta.json of the data set (of the first source of a mixture: they share the vocabulary)."""
    tokenizer: Tokenizer
    train_split: Split | MixtureSplit
    sampler: EpochSampler | MixtureSampler
    val_sets: list[ValSet]
    task_metrics: Callable | None
    """The data set's own metrics at each evaluation (arithmetic's exact match), if any."""
    info: dict
    """What checkpoints record about the data (data.json)."""
    source_names: list[str] = field(default_factory=list)
    """A mixture's sources, in order (empty for one data set)."""
    checkpoint_metric: str = "val_loss"
    """The val score that ranks the run's checkpoints (classifiers: val_accuracy)."""
    sample_length: int = field(init=False)
    """Input tokens of one training sample (a classifier's: its whole row, padding included)."""

    def __post_init__(self):
        self.sample_length = self.train_split.sample_length

    def consumed(self, samples: int) -> dict:
        """Tokens and epochs of each mixture source once `samples` positions are trained."""
        if not self.source_names:
            return {}
        figures = {}
        taken = self.sampler.taken(samples)
        for name, count, split in zip(self.source_names, taken, self.train_split.splits):
            figures[f"tokens/{name}"] = count * self.sample_length
            figures[f"epochs/{name}"] = count / split.num_samples
        return figures


def data_vocabulary(config: Config, accelerator: Accelerator) -> tuple[dict, Tokenizer]:
    """The meta.json and tokenizer that a model for the run's data is built for (of a mixture's
    first source: the sources must share them)."""
    if config.data.mixture:
        data_dir = Path(config.data.mixture[0].dir)
        meta = read_source_meta(data_dir)
    else:
        data_dir, meta = config.data.path, open_data(config, accelerator)
    return meta, load_tokenizer(data_dir, meta)


def read_source_meta(data_dir: Path) -> dict:
    """The meta.json of a mixture's source, checked to be a language-modelling set."""
    if not (data_dir / "meta.json").is_file():
        raise UserError(
            f"data.mixture source {data_dir} is not a prepared data set (no meta.json); "
            "prepare it with prepare_data.py or correct its dir"
        )
    meta = read_meta(data_dir)
    if meta["format"] != "stream":
        raise UserError(
            f"data.mixture source {data_dir} holds fixed-length examples; a mixture mixes "
            "language-modelling (text) data sets only"
        )
    return meta


def open_training_data(config: Config, accelerator: Accelerator) -> TrainingData:
    """The run's data set (a built-in synthetic one is prepared if missing) or mixture."""
    if config.data.mixture:
        return open_mixture(config)
    meta = open_data(config, accelerator)
    data_dir, block_size, seed = config.data.path, config.model.block_size, config.seed
    tokenizer = Tokenizer.load(data_dir)
    train = open_split(data_dir, meta, "train", block_size, seed)
    val = open_split(data_dir, meta, "val", block_size, seed)
    val_set = ValSet(
        val,
        fixed_subset(val.num_samples, config.data.eval_samples),
        bpb_per_loss=bits_per_byte(1.0, meta, "val"),
    )
    module = tasks.for_data_set(meta)
    kept = ("format", "example_length", "task", "labels", "pooling", "keep")
    info = {k: v for k, v in meta.items() if k in kept}
    return TrainingData(
        meta=meta,
        tokenizer=tokenizer,
        train_split=train,
        sampler=EpochSampler(train.num_samples, seed),
        val_sets=[val_set],
        task_metrics=module.val_metrics(meta, tokenizer, val, config.data.exact_match_samples),
        info={**info, "dir": str(data_dir)},
        checkpoint_metric=module.CHECKPOINT_METRIC,
    )


def open_mixture(config: Config) -> TrainingData:
    """Several prepared language-modelling sets with one tokenizer, mixed by weight."""
    sources: list[MixtureSource] = config.data.mixture
    total = math.fsum(source.weight for source in sources)
    first, tokenizer = None, None
    trains, val_sets = [], []
    for source in sources:
        data_dir = Path(source.dir)
        meta = read_source_meta(data_dir)
        own = Tokenizer.load(data_dir)
        if tokenizer is None:
            first, tokenizer, first_meta = source, own, meta
        elif (own.backend.get_vocab(), own.eos_token) != (
            tokenizer.backend.get_vocab(),
            tokenizer.eos_token,
        ):
            raise UserError(
                f"data.mixture sources {first.dir} and {source.dir} have different tokenizers; "
                "prepare them with the same --tokenizer"
            )
        block_size, seed = config.model.block_size, config.seed
        trains.append(open_split(data_dir, meta, "train", block_size, seed))
        val = open_split(data_dir, meta, "val", block_size, seed)
        val_sets.append(
            ValSet(
                val,
                fixed_subset(val.num_samples, config.data.eval_samples),
                name=source.label,
                weight=source.weight / total,
                bpb_per_loss=bits_per_byte(1.0, meta, "val"),
            )
        )
    weights = [source.weight for source in sources]
    mixture = [{"name": s.label, "dir": s.dir, "weight": s.weight / total} for s in sources]
    return TrainingData(
        meta=first_meta,
        tokenizer=tokenizer,
        train_split=MixtureSplit(trains),
        sampler=MixtureSampler([t.num_samples for t in trains], weights, config.seed),
        val_sets=val_sets,
        task_metrics=None,
        info={"format": "stream", "mixture": mixture},
        source_names=[source.label for source in sources],
    )


def mixed_precision_mode(config: Config) -> str:
    """The precision the run computes in: `auto` resolved for this machine (bf16 only where the
    GPU has it natively; emulated bf16 on a V100 or T4 is slow, so fp16 there; none on CPU)."""
    if config.mixed_precision != "auto":
        return config.mixed_precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "no"


def build_model(
    config: Config, meta: dict, tokenizer: Tokenizer, model_overrides: dict
) -> torch.nn.Module:
    """A fresh model for the data set, or the weights of config.init_from. Fine-tuning sets
    config.model to the checkpoint's, with the command line's model.* overrides
    (`model_overrides`, names without the prefix) that fine-tuning allows. A classification
    data set gets a classifier (its labels and pad token); finetune.freeze is applied here."""
    labels = meta["labels"] if meta["format"] == "classify" else []
    pad = meta["pad_token_id"] if labels else -1
    if config.model.labels and config.model.labels != labels:
        raise UserError(
            f"model.labels {config.model.labels} differs from the data set's {labels}; drop "
            "model.labels, the data set sets it"
        )
    if config.init_from:
        start = checkpoints.load_checkpoint(config.init_from)
        if start.tokenizer.backend.get_vocab() != tokenizer.backend.get_vocab():
            raise UserError(
                f"init_from {config.init_from} has a different tokenizer than data set "
                f"{config.data.path}; prepare the data with the checkpoint's tokenizer "
                "(prepare_data.py ... --tokenizer CHECKPOINT)"
            )
        model = checkpoints.adapt_for_finetuning(start.model, model_overrides, config.init_from)
        model = fit_head(model, labels, pad, config.init_from).train()
        config.model = model.config
    else:
        if config.model.vocab_size == 0:
            config.model.vocab_size = meta["vocab_size"]
        if config.model.vocab_size < meta["vocab_size"]:
            raise UserError(
                f"model.vocab_size {config.model.vocab_size} is below the data set's vocabulary "
                f"{meta['vocab_size']}; set it to 0 to take the data set's"
            )
        config.model.labels, config.model.pad_token_id = list(labels), pad
        model = models.build_model(config.model)
    if config.finetune.freeze == "backbone":
        if config.finetune.train_blocks > config.model.n_layer:
            raise UserError(
                f"finetune.train_blocks {config.finetune.train_blocks} exceeds the model's "
                f"{config.model.n_layer} blocks; use at most {config.model.n_layer}"
            )
        models.freeze_backbone(model, config.finetune.train_blocks)
    return model


def fit_head(model: torch.nn.Module, labels: list[str], pad: int, source: str) -> torch.nn.Module:
    """The starting model with the head the data needs: a language model gets a new
    classification head for classification data; a classifier continues only on its labels."""
    have = model.config.labels
    if not labels and have:
        raise UserError(
            f"init_from {source} is a classifier ({have}); train it on a classification data set, "
            "or start a language model from a language-model checkpoint"
        )
    if not labels or (have == labels and model.config.pad_token_id == pad):
        return model
    if have:
        raise UserError(
            f"init_from {source} classifies into {have}, but the data set's labels are {labels}; "
            "start from the language model it was made from, or prepare data with its labels"
        )
    return models.with_classification_head(model, labels, pad)


def make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        optimizer_groups(model, config.weight_decay.first),
        lr=config.lr.first,
        betas=(config.optim.beta1, config.optim.beta2),
        eps=config.optim.eps,
        fused=torch.cuda.is_available(),
    )


def apply_settings(optimizer: torch.optim.Optimizer, settings: StepSettings) -> None:
    """Set the scheduled learning rate everywhere and weight decay on the decayed group (the first)."""
    for group in optimizer.param_groups:
        group["lr"] = settings.lr
    optimizer.param_groups[0]["weight_decay"] = settings.weight_decay


def fetch_micro_batches(
    sampler: EpochSampler | MixtureSampler,
    split: Split | MixtureSplit,
    position: int,
    grad_accum: int,
    batch_size: int,
    accelerator: Accelerator,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This process's micro-batches of the optimizer step that starts at sampler position `position`.

    Micro-batch i of the step is the global batch at position + i * global_micro; each process
    takes its own share, so 1 process accumulating 2 micro-batches trains on exactly the samples
    that 2 processes with 1 micro-batch each do.
    """
    global_micro = batch_size * accelerator.num_processes
    return [
        sampler.batch_for_process(
            split, position + i * global_micro, batch_size, accelerator.process_index
        )
        for i in range(grad_accum)
    ]


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    grad_clip: float,
    skip_nonfinite: bool = False,
) -> tuple[torch.Tensor | None, int, torch.Tensor]:
    """One optimizer step over this process's micro-batches.

    The loss is normalised by the number of real (unmasked) target tokens of the whole step on
    all processes, so every token weighs the same whatever micro-batch or process it is in.
    DDP averages gradients over processes, hence the factor num_processes.
    Returns this process's summed token loss, its real-token count, and the gradient norm; with
    skip_nonfinite, a step whose loss or gradient is not finite on any process is not applied
    and its loss is returned as None.
    """
    local_tokens = sum(int((targets != IGNORE_INDEX).sum()) for _, targets in micro_batches)
    step_tokens = accelerator.reduce(
        torch.tensor(local_tokens, device=accelerator.device, dtype=torch.float32), "sum"
    )
    scale = accelerator.num_processes / step_tokens.clamp(min=1)
    loss_sum = torch.zeros((), device=accelerator.device)
    for i, (inputs, targets) in enumerate(micro_batches):
        inputs = inputs.to(accelerator.device, non_blocking=True)
        targets = targets.to(accelerator.device, non_blocking=True)
        # Gradients are synchronised between processes only on the last micro-batch.
        last = i == len(micro_batches) - 1
        with nullcontext() if last else accelerator.no_sync(model):
            loss = model(inputs, targets)
            accelerator.backward(loss * scale)
        loss_sum += loss.detach()
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    if skip_nonfinite:
        bad = (~torch.isfinite(loss_sum)).float() + (~torch.isfinite(grad_norm)).float()
        if accelerator.reduce(bad, "sum").item() > 0:  # every process takes the same decision
            skip_step(optimizer, accelerator)
            return None, 0, grad_norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, local_tokens, grad_norm


def skip_step(optimizer: torch.optim.Optimizer, accelerator: Accelerator) -> None:
    """Leave out a step with a non-finite loss or gradient. With fp16 the gradient scaler must
    still close the step: clip_grad_norm_ has unscaled the gradients (the next unscale would
    raise), and the scale backs off as after any overflow."""
    scaler = accelerator.scaler
    if scaler is not None:
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())  # also clears the unscale
    optimizer.zero_grad(set_to_none=True)
