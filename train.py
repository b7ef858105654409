"""Train a GPT on one CPU, one GPU, or many GPUs on many machines.

    accelerate launch train.py --config configs/shakespeare.json [--key=value ...]
    python train.py --config configs/adder.json --max_steps=500
    python train.py --help                       # every config key with its documentation

A run is a sequence of optimizer steps grouped into macro-batches of `macro_batch_steps`. Each
optimizer step accumulates gradients over `grad_accum` micro-batches (a schedule, so the batch can
grow); every macro-batch ends with an evaluation of the val loss, a log event and a checkpoint.
"""

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.nn import functional as F
from tqdm import tqdm

import checkpoints
import snapshots
import tracking
from arithmetic import ArithmeticTask, count_exact_matches
from config import Config, UserError, help_text, load_config, run_cli
from data import IGNORE_INDEX, EpochSampler, Split, fixed_subset, open_split, read_meta
from mfu import Throughput
from models import build_model, count_parameters, optimizer_groups
from prepare_data import prepare_arithmetic
from scheduler import EarlyStopping, RunSchedules, StepSettings
from tokenizer import Tokenizer


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

    def mean_loss(self, accelerator: Accelerator) -> float:
        """Mean loss per real token over every process: the logged training loss."""
        targets = torch.tensor(self.targets, device=self.loss.device, dtype=self.loss.dtype)
        totals = accelerator.reduce(torch.stack([self.loss, targets]), "sum")
        return (totals[0] / totals[1]).item()


def mixed_precision_mode(config: Config) -> str:
    if config.mixed_precision != "auto":
        return config.mixed_precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def open_data(config: Config, accelerator: Accelerator) -> dict:
    """Read the data set's metadata, preparing a built-in synthetic set first if it is missing."""
    data_dir = config.data.path
    if not (data_dir / "meta.json").exists() and config.data.name in ("adder", "multiplier"):
        if accelerator.is_main_process:
            print(f"preparing the {config.data.name} data set in {data_dir}")
            prepare_arithmetic(config.data.name, data_dir)
        accelerator.wait_for_everyone()
    return read_meta(data_dir)


def apply_settings(optimizer: torch.optim.Optimizer, settings: StepSettings) -> None:
    """Set the scheduled learning rate everywhere and weight decay on the decayed group (the first)."""
    for group in optimizer.param_groups:
        group["lr"] = settings.lr
    optimizer.param_groups[0]["weight_decay"] = settings.weight_decay


def fetch_micro_batches(
    sampler: EpochSampler,
    split: Split,
    position: int,
    grad_accum: int,
    config: Config,
    accelerator: Accelerator,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This process's micro-batches of the optimizer step that starts at sampler position `position`.

    Micro-batch i of the step is the global batch at position + i * global_micro; each process
    takes its own share, so 1 process accumulating 2 micro-batches trains on exactly the samples
    that 2 processes with 1 micro-batch each do.
    """
    global_micro = config.batch_size * accelerator.num_processes
    return [
        sampler.batch_for_process(
            split, position + i * global_micro, config.batch_size, accelerator.process_index
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
            logits = model(inputs)
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            accelerator.backward(loss * scale)
        loss_sum += loss.detach()
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    if skip_nonfinite:
        bad = (~torch.isfinite(loss_sum)).float() + (~torch.isfinite(grad_norm)).float()
        if accelerator.reduce(bad, "sum").item() > 0:  # every process takes the same decision
            optimizer.zero_grad(set_to_none=True)
            return None, 0, grad_norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, local_tokens, grad_norm


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module, split: Split, indices, accelerator: Accelerator, batch_size: int
) -> float:
    """Mean token loss over the fixed subset `indices`, shared out over and summed across processes."""
    model.eval()
    totals = torch.zeros(2, device=accelerator.device)
    shard = indices[accelerator.process_index :: accelerator.num_processes]
    for start in range(0, len(shard), batch_size):
        inputs, targets = split.fetch(shard[start : start + batch_size])
        logits = model(inputs.to(accelerator.device))
        targets = targets.to(accelerator.device)
        totals[0] += F.cross_entropy(
            logits.float().view(-1, logits.size(-1)),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        totals[1] += (targets != IGNORE_INDEX).sum()
    totals = accelerator.reduce(totals, "sum")
    model.train()
    return (totals[0] / totals[1]).item()


@torch.no_grad()
def evaluate_exact_match(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    task: ArithmeticTask,
    split,
    indices,
    accelerator: Accelerator,
) -> float:
    """Share of the fixed val subset whose whole answer the model gets right, greedy."""
    model.eval()
    shard = indices[accelerator.process_index :: accelerator.num_processes]
    correct = count_exact_matches(model, tokenizer, task, split.rows(shard)) if len(shard) else 0
    totals = accelerator.reduce(
        torch.tensor([correct, len(shard)], device=accelerator.device, dtype=torch.float64), "sum"
    )
    model.train()
    return (totals[0] / totals[1]).item()


@dataclass
class Evaluator:
    """What every macro-batch is scored on: a fixed val subset, and exact match for arithmetic."""

    val_split: Split
    val_indices: np.ndarray
    batch_size: int
    tokenizer: Tokenizer
    task: ArithmeticTask | None
    exact_match_indices: np.ndarray

    def __call__(self, model, raw_model, accelerator: Accelerator, progress: Progress) -> dict:
        """The eval event: val loss (and exact match) after `progress`, the same on every process.

        `model` is unwrapped from DDP (processes may get uneven shares, so no collective forward)
        but may be compiled; exact match decodes with the plain `raw_model` and its KV cache.
        """
        event = {"step": progress.step, "tokens": progress.tokens}
        event["val_loss"] = evaluate_loss(
            model, self.val_split, self.val_indices, accelerator, self.batch_size
        )
        if self.task is not None and len(self.exact_match_indices):
            event["val_exact_match"] = evaluate_exact_match(
                raw_model,
                self.tokenizer,
                self.task,
                self.val_split,
                self.exact_match_indices,
                accelerator,
            )
        return event


class RunLog:
    """Log events: appended to out_dir/metrics.jsonl and sent to Accelerate's trackers."""

    def __init__(self, accelerator: Accelerator, out_dir: Path):
        self.accelerator = accelerator
        self.path = out_dir / "metrics.jsonl"

    def write(self, event: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as file:
                file.write(json.dumps(event) + "\n")
        self.accelerator.log({k: v for k, v in event.items() if k != "step"}, step=event["step"])

    def say(self, message: str, step: int) -> None:
        """Print a message and keep it in metrics.jsonl, so the log tells the whole story."""
        if self.accelerator.is_main_process:
            tqdm.write(message)
            self.write({"step": step, "message": message})


def build_model_and_tokenizer(config: Config, meta: dict) -> tuple[torch.nn.Module, Tokenizer]:
    tokenizer = Tokenizer.load(config.data.path)
    if config.init_from:
        start = checkpoints.load_checkpoint(config.init_from, dropout=config.model.dropout)
        if start.tokenizer.backend.get_vocab() != tokenizer.backend.get_vocab():
            raise UserError(
                f"init_from {config.init_from} has a different tokenizer than data set "
                f"{config.data.path}; prepare the data with the checkpoint's tokenizer"
            )
        config.model = start.model.config
        return start.model.train(), tokenizer
    if config.model.vocab_size == 0:
        config.model.vocab_size = meta["vocab_size"]
    if config.model.vocab_size < meta["vocab_size"]:
        raise UserError(
            f"model.vocab_size {config.model.vocab_size} is below the data set's vocabulary "
            f"{meta['vocab_size']}; set it to 0 to take the data set's"
        )
    return build_model(config.model), tokenizer


def main(argv: list[str]) -> None:
    if {"-h", "--help"} & set(argv):
        print(__doc__ + "\nConfig keys (JSON file or --key=value):\n" + help_text())
        return
    config, _ = load_config(argv)
    out_dir = Path(config.out_dir)
    accelerator = Accelerator(
        mixed_precision=mixed_precision_mode(config),
        dynamo_backend="inductor" if config.compile else "no",
        **tracking.accelerator_options(config),
    )
    resume_from = snapshots.choose_snapshot(accelerator, out_dir, config.resume)
    set_seed(config.seed)  # same initial weights on every process
    meta = open_data(config, accelerator)
    model, tokenizer = build_model_and_tokenizer(config, meta)
    train_split = open_split(config.data.path, meta, "train", config.model.block_size, config.seed)
    val_split = open_split(config.data.path, meta, "val", config.model.block_size, config.seed)

    optimizer = torch.optim.AdamW(
        optimizer_groups(model, config.weight_decay.first),
        lr=config.lr.first,
        betas=(config.optim.beta1, config.optim.beta2),
        eps=config.optim.eps,
        fused=torch.cuda.is_available(),
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)
    snapshot_store = snapshots.Snapshots(accelerator, out_dir, config, raw_model)

    # The schedules run on tokens; a length in steps converts exactly since the batch is fixed then.
    sample_length = train_split.fetch([0])[0].size(1)
    micro_tokens = config.batch_size * sample_length * accelerator.num_processes
    total_tokens = config.max_tokens or config.max_steps * micro_tokens * round(
        config.grad_accum.peak
    )
    schedules = RunSchedules(config.lr, config.weight_decay, config.grad_accum, total_tokens)
    early_stopping = EarlyStopping(config.early_stop)
    sampler = EpochSampler(train_split.num_samples, config.seed)
    evaluate = Evaluator(
        val_split,
        fixed_subset(val_split.num_samples, config.data.eval_samples),
        config.batch_size,
        tokenizer,
        ArithmeticTask(**meta["task"]) if "task" in meta else None,
        fixed_subset(val_split.num_samples, config.data.exact_match_samples),
    )
    rotator = checkpoints.CheckpointRotator(out_dir, config.keep_best)
    data_info = {k: v for k, v in meta.items() if k in ("format", "example_length", "task")}
    data_info["dir"] = str(config.data.path)

    log = RunLog(accelerator, out_dir)
    progress, stop_reason = Progress(), None
    if resume_from:  # the state at the snapshot, and metrics.jsonl cut back to it
        stop_reason = snapshot_store.restore(resume_from, progress, early_stopping, log)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        snapshot_store.clean_leftovers()
        (out_dir / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    tracking.start_trackers(accelerator, config)
    if not resume_from:  # a snapshot of the start, so a run that dies before its first save resumes
        snapshot_store.save(progress, early_stopping, stop_reason)
    log.say(
        f"{count_parameters(raw_model) / 1e6:.2f}M parameters | {accelerator.num_processes} "
        f"process(es) on {accelerator.device} | precision {accelerator.mixed_precision} | "
        f"{total_tokens:,} tokens to train",
        progress.step,
    )
    throughput = Throughput.of_run(raw_model, sample_length, accelerator)
    log.say(throughput.peak_source, progress.step)

    window = LogWindow(torch.zeros((), device=accelerator.device))
    bar = tqdm(
        total=total_tokens,
        initial=progress.tokens,
        unit="tok",
        unit_scale=True,
        disable=not accelerator.is_main_process or not sys.stderr.isatty(),
    )
    while progress.tokens < total_tokens and stop_reason is None:
        settings = schedules.at(progress.tokens)
        apply_settings(optimizer, settings)
        micro_batches = fetch_micro_batches(
            sampler, train_split, progress.samples, settings.grad_accum, config, accelerator
        )
        loss_sum, targets, grad_norm = train_step(
            model,
            optimizer,
            accelerator,
            micro_batches,
            config.optim.grad_clip,
            skip_nonfinite=config.nonfinite_loss == "skip",
        )
        progress.step += 1
        progress.samples += settings.grad_accum * config.batch_size * accelerator.num_processes
        progress.tokens += settings.grad_accum * micro_tokens
        if loss_sum is None:
            log.say(f"skipped step {progress.step}: non-finite loss or gradient", progress.step)
        else:
            window.loss += loss_sum
            window.targets += targets
        window.tokens += settings.grad_accum * micro_tokens
        window.steps += 1
        bar.update(settings.grad_accum * micro_tokens)

        finished = progress.tokens >= total_tokens
        macro_batch_end = progress.step % config.macro_batch_steps == 0 or finished
        if progress.step % config.log_interval == 0 or macro_batch_end:
            train_loss = window.mean_loss(accelerator)
            elapsed = time.perf_counter() - window.started
            event = {
                "step": progress.step,
                "tokens": progress.tokens,
                "train_loss": train_loss,
                "lr": settings.lr,
                "weight_decay": settings.weight_decay,
                "grad_accum": settings.grad_accum,
                "batch_tokens": settings.grad_accum * micro_tokens,
                "grad_norm": grad_norm.item(),
                "epochs": progress.samples / train_split.num_samples,
                **throughput.figures(window.tokens, window.steps, elapsed),
            }
            event_rate = event["tokens_per_sec"]
            log.write(event)
            bar.set_postfix(
                step=progress.step,
                loss=f"{train_loss:.4f}",
                lr=f"{settings.lr:.2e}",
                wd=f"{settings.weight_decay:.3g}",
                batch=f"{settings.grad_accum}x{micro_tokens}",
            )
            if not math.isfinite(train_loss) and config.nonfinite_loss == "stop":
                log.say(f"stopping: training loss is {train_loss}", progress.step)
                raise UserError(
                    f"training loss became {train_loss} at step {progress.step}; lower lr.peak "
                    "or raise optim.grad_clip (checkpoints saved so far are untouched)"
                )
            window = LogWindow(torch.zeros_like(window.loss))

        if macro_batch_end:
            event = evaluate(accelerator.unwrap_model(model), raw_model, accelerator, progress)
            val_loss = event["val_loss"]
            log.write(event)
            summary = " | ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in event.items()
            )
            rate = f"{event_rate:,.0f} tok/s"
            log.say(f"{summary} | train_loss {train_loss:.4f} | {rate}", progress.step)
            stop_reason = early_stopping.update(val_loss)
            if accelerator.is_main_process:
                saved = rotator.save(raw_model, tokenizer, data_info, progress.step, val_loss)
                if saved:
                    log.say(f"saved {saved}", progress.step)
            accelerator.wait_for_everyone()
            if snapshot_store.due(progress.step, final=finished or stop_reason is not None):
                snapshot_store.save(progress, early_stopping, stop_reason, val_loss)
            window.started = time.perf_counter()  # evaluation time is not training throughput

    bar.close()
    if stop_reason:
        log.say(stop_reason, progress.step)
    log.say(
        f"done: {progress.step} steps, {progress.tokens:,} tokens in "
        f"{timedelta(seconds=round(snapshot_store.elapsed()))}; best model in {out_dir}/best",
        progress.step,
    )
    accelerator.wait_for_everyone()  # all processes leave the process group together
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
