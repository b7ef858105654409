"""One optimizer step and what it needs: precision, the model and its optimizer, the batches.

train.py reads as the run; the pieces it calls live here so that the benchmark and the tests run
exactly the same step.
"""

import math
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import psutil
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

import models
from gptlab import checkpoints, optimizers, tasks
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
from gptlab.sharding import local
from gptlab.tasks import arithmetic
from gptlab.tokenizer import Tokenizer
from models import IGNORE_INDEX

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


def on_every_process(accelerator: Accelerator, work: Callable[[], T]) -> T:
    """Run work() on every process, and if it fails on any, fail on all with its message (the
    first, naming the process), so that no process waits for one that has died."""
    result, failure = None, None
    try:
        result = work()
    except UserError as error:
        failure = str(error)
    except OSError as error:
        failure = f"{error.filename or 'a file'}: {error.strerror}; fix that, then rerun"
    if accelerator.num_processes > 1:
        failures = gather_object([failure])
        failure = next(
            (f"process {rank}: {text}" for rank, text in enumerate(failures) if text), None
        )
    if failure is not None:
        raise UserError(failure)
    return result


def open_data(config: Config, accelerator: Accelerator) -> dict:
    """Read the data set's metadata, preparing a built-in synthetic set first if it is missing."""
    data_dir = config.data.path
    digits = config.data.digits or None
    on_main_process(accelerator, lambda: prepare_built_in(config.data.name, data_dir, digits))
    # Every process reads the data: a machine without it stops the run on all of them.
    meta = on_every_process(accelerator, lambda: read_meta(data_dir))
    prepared = meta.get("task", {}).get("digits")
    if digits and prepared != digits:
        raise UserError(
            f"{data_dir} holds {prepared or 'no'}-digit arithmetic but data.digits is {digits}; "
            "point data.dir at another directory (train.py prepares it) or change data.digits"
        )
    return meta


def prepare_built_in(name: str, data_dir: Path, digits: int | None) -> None:
    """Prepare a built-in synthetic data set if it is missing (main process)."""
    if not (data_dir / "meta.json").exists() and name in arithmetic.COMMANDS:
        print(f"preparing the {name} data set in {data_dir}")
        arithmetic.prepare_arithmetic(name, data_dir, digits)


LAUNCHER_MARKERS = ("ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID")
"""Variables that `accelerate launch` and torchrun put into the environment of each process."""


def user_chose_threads() -> bool:
    """Whether the user chose this process's thread count with OMP_NUM_THREADS (or accelerate
    launch's --num_cpu_threads_per_process).

    `accelerate launch` (without --cpu) and torchrun set OMP_NUM_THREADS=1 for their processes
    when the user did not, so under a launcher the variable only counts if the launcher's own
    environment had it (read from /proc; where that cannot be read, it is taken as the user's)."""
    if "OMP_NUM_THREADS" not in os.environ:
        return False
    if not any(name in os.environ for name in LAUNCHER_MARKERS):
        return True
    try:
        launcher = Path(f"/proc/{os.getppid()}")
        environment = (launcher / "environ").read_bytes().split(b"\0")
        arguments = (launcher / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return True
    return any(v.startswith(b"OMP_NUM_THREADS=") for v in environment) or any(
        a.startswith(b"--num_cpu_threads_per_process") for a in arguments
    )


def use_cpu_cores(accelerator: Accelerator) -> str:
    """On a CPU, give this process its share of the cores (all of them for one process) unless
    the user chose a thread count; return how many threads it uses, and why, for the log."""
    if accelerator.device.type != "cpu":
        return f"{torch.get_num_threads()} CPU threads"
    if user_chose_threads():
        return f"{torch.get_num_threads()} CPU threads per process (OMP_NUM_THREADS)"
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        cores = min(cores, len(os.sched_getaffinity(0)))
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(max(1, cores // local_processes))
    return (
        f"{torch.get_num_threads()} CPU threads per process ({cores} cores shared by "
        f"{local_processes} process(es) here; set OMP_NUM_THREADS to choose)"
    )


def use_fast_matmuls() -> None:
    """TF32 for float32 matmuls on GPUs that have it (mixed precision covers most matmuls; this
    covers the rest); mfu.py counts the TF32 peak once this is set."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")


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
        final_indices=final_subset(val, config),
    )
    module = tasks.for_data_set(meta)
    kept = ("format", "example_length", "task", "labels", "pooling", "keep", "bos")
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


def final_subset(val: Split, config: Config) -> np.ndarray | None:
    """The val samples the run's last evaluation scores: data.final_eval_samples of them (0: the
    whole split), or None to score the same subset as every evaluation."""
    count = config.data.final_eval_samples
    if count is None:
        return None
    return fixed_subset(val.num_samples, count or val.num_samples)


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
                final_indices=final_subset(val, config),
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
    config: Config,
    meta: dict,
    tokenizer: Tokenizer,
    model_overrides: dict,
    notes: list[str] | None = None,
) -> torch.nn.Module:
    """A fresh model for the data set, or the weights of config.init_from. Fine-tuning sets
    config.model to the checkpoint's, with the command line's model.* overrides
    (`model_overrides`, names without the prefix) that fine-tuning allows, and the embedding
    grown for tokens the data set's tokenizer appends (chat markers); `notes` gets what was done.
    A classification data set gets a classifier (its labels and pad token); finetune.freeze is
    applied here."""
    labels = meta["labels"] if meta["format"] == "classify" else []
    pad = meta["pad_token_id"] if labels else -1
    if config.model.labels and config.model.labels != labels:
        raise UserError(
            f"model.labels {config.model.labels} differs from the data set's {labels}; drop "
            "model.labels, the data set sets it"
        )
    if config.init_from:
        start = checkpoints.load_checkpoint(config.init_from)
        model, note = checkpoints.grow_vocabulary(
            start.model, start.tokenizer, tokenizer, config.init_from
        )
        if note and notes is not None:
            notes.append(note)
        model = checkpoints.adapt_for_finetuning(model, model_overrides, config.init_from)
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
        config.model.vocab_size = padded_vocab_size(config.model)
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


def padded_vocab_size(model_config: models.ModelConfig) -> int:
    """The vocabulary rounded up to a multiple of model.vocab_multiple."""
    multiple = model_config.vocab_multiple
    return -(-model_config.vocab_size // multiple) * multiple


def make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """AdamW, or Muon with AdamW (optim.name), at the schedules' first values."""
    return optimizers.build_optimizer(
        model, config.optim, config.lr.first, config.weight_decay.first
    )


def apply_settings(optimizer: torch.optim.Optimizer, settings: StepSettings) -> None:
    """Set the scheduled learning rate and weight decay, scaled for each parameter group."""
    optimizers.apply_schedule(optimizer, settings.lr, settings.weight_decay)


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


def step_target_count(
    sampler: EpochSampler | MixtureSampler,
    split: Split | MixtureSplit,
    position: int,
    grad_accum: int,
    batch_size: int,
    num_processes: int,
) -> int:
    """Real target tokens of the whole optimizer step that starts at `position`, all processes
    together: the sampler says which samples every process gets, so no process needs to ask."""
    _, indices = sampler.positions(position, grad_accum * batch_size * num_processes)
    return split.target_count(indices)


@dataclass
class StepBatches:
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]]
    """This process's micro-batches (inputs, targets) of one optimizer step."""
    targets: int
    """Real target tokens of the step on all processes together."""


class BatchReader:
    """The batches of each optimizer step. While one step runs, a background thread reads the
    next one (assuming the same grad_accum; a schedule that changes it costs one wait) and, on a
    GPU, pins it in memory so that its copy to the device does not hold up the host."""

    def __init__(
        self,
        sampler: EpochSampler | MixtureSampler,
        split: Split | MixtureSplit,
        batch_size: int,
        accelerator: Accelerator,
    ):
        self.sampler, self.split, self.batch_size = sampler, split, batch_size
        self.accelerator = accelerator
        self.pin = accelerator.device.type == "cuda"
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-reader")
        self.pending: tuple[tuple[int, int], Future] | None = None

    def read(self, position: int, grad_accum: int) -> StepBatches:
        micro_batches = fetch_micro_batches(
            self.sampler, self.split, position, grad_accum, self.batch_size, self.accelerator
        )
        if self.pin:
            micro_batches = [(x.pin_memory(), y.pin_memory()) for x, y in micro_batches]
        processes = self.accelerator.num_processes
        targets = step_target_count(
            self.sampler, self.split, position, grad_accum, self.batch_size, processes
        )
        return StepBatches(micro_batches, targets)

    def __call__(self, position: int, grad_accum: int) -> StepBatches:
        """The step that starts at sampler position `position`; the next one starts reading."""
        batches = None
        if self.pending is not None:
            key, future = self.pending
            ready = future.result()  # also when unused: one reader at a time
            batches = ready if key == (position, grad_accum) else None
        if batches is None:
            batches = self.read(position, grad_accum)
        following = position + grad_accum * self.batch_size * self.accelerator.num_processes
        key = (following, grad_accum)
        self.pending = (key, self.worker.submit(self.read, *key))
        return batches

    def close(self) -> None:
        """Let the read ahead finish and stop the thread, so nothing reads after the run ends.
        (The abort at exit once blamed on this thread was gloo's: see errors.run_cli.)"""
        self.worker.shutdown(wait=True)
        self.pending = None


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    grad_clip: float,
    skip_nonfinite: bool = False,
    step_targets: int | None = None,
) -> tuple[torch.Tensor | None, int, torch.Tensor]:
    """One optimizer step over this process's micro-batches.

    The loss is normalised by the number of real (unmasked) target tokens of the whole step on
    all processes (`step_targets`, known on the host from the sampler; None counts them with an
    all-reduce), so every token weighs the same whatever micro-batch or process it is in.
    DDP and FSDP average gradients over processes, hence the factor num_processes. Nothing here
    waits for the device, except the decision to skip a step (skip_nonfinite).
    Returns this process's summed token loss, its real-token count, and the gradient norm; with
    skip_nonfinite, a step whose loss or gradient is not finite on any process is not applied
    and its loss is returned as None.
    """
    local_tokens = sum(int((targets != IGNORE_INDEX).sum()) for _, targets in micro_batches)
    if step_targets is None:
        local = torch.tensor(local_tokens, device=accelerator.device, dtype=torch.float64)
        step_targets = int(accelerator.reduce(local, "sum").item())
    scale = accelerator.num_processes / max(step_targets, 1)
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
    grad_norm = clip_grad_norm(model, accelerator, grad_clip)
    if skip_nonfinite:
        bad = (~torch.isfinite(loss_sum)).float() + (~torch.isfinite(grad_norm)).float()
        if accelerator.reduce(bad, "sum").item() > 0:  # every process takes the same decision
            skip_step(optimizer, accelerator)
            return None, 0, grad_norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, local_tokens, grad_norm


def clip_grad_norm(
    model: torch.nn.Module, accelerator: Accelerator, grad_clip: float
) -> torch.Tensor:
    """Clip the gradient norm over all parameters, sharded ones included (the norm of a sharded
    model is a replicated DTensor, every process holding the whole value), and return it."""
    return local(accelerator.clip_grad_norm_(model.parameters(), grad_clip or math.inf))


def skip_step(optimizer: torch.optim.Optimizer, accelerator: Accelerator) -> None:
    """Leave out a step with a non-finite loss or gradient. With fp16 the gradient scaler must
    still close the step: clip_grad_norm_ has unscaled the gradients (the next unscale would
    raise), and the scale backs off as after any overflow."""
    scaler = accelerator.scaler
    if scaler is not None:
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())  # also clears the unscale
    optimizer.zero_grad(set_to_none=True)
