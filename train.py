"""Train a GPT on one CPU, one GPU, or many GPUs on many machines.

    accelerate launch train.py --config configs/shakespeare.json [--key=value ...]
    accelerate launch --config_file configs/accelerate/fsdp.yaml train.py --config ...   # sharded
    python train.py --config configs/adder.json --max_steps=500
    python train.py --help                       # every config key with its documentation
    python train.py --average RUN/latest RUN2/latest --out_dir DIR   # their mean (gptlab.averaging)

A run is a sequence of optimizer steps grouped into macro-batches of `macro_batch_steps`. Each
optimizer step accumulates gradients over `grad_accum` micro-batches (a schedule, so the batch can
grow); every macro-batch ends with an evaluation of the val loss, a log event and a checkpoint.
Read `main` for one optimizer step; `start_run` sets up what it uses.
"""

import json
import math
import sys
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from gptlab import averaging, checkpoints, errors, nodes, sharding, snapshots, tracking
from gptlab.config import Config, help_text, load_config
from gptlab.errors import UserError, run_cli
from gptlab.evaluation import Evaluator
from gptlab.mfu import Throughput
from gptlab.optimizers import check_optimizer_supported
from gptlab.scheduler import EarlyStopping, RunSchedules
from gptlab.tasks import chat as chat_data
from gptlab.training import (
    BatchReader,
    LogWindow,
    Progress,
    TrainingData,
    apply_settings,
    build_model,
    data_vocabulary,
    make_optimizer,
    mixed_precision_mode,
    on_main_process,
    open_training_data,
    train_step,
    use_cpu_cores,
    use_fast_matmuls,
)
from models import count_parameters


def main(argv: list[str]) -> None:
    if "--average" in argv:  # not training: one checkpoint from several (a "model soup")
        averaging.main([arg for arg in argv if arg != "--average"])
        return
    if {"-h", "--help"} & set(argv):
        print(__doc__ + "\nConfig keys (JSON file or --key=value):\n" + help_text())
        return
    config, _, overrides = load_config(argv)
    config.mixed_precision = mixed_precision_mode(config)  # recorded as used, not as "auto"
    use_fast_matmuls()
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        dynamo_backend="inductor" if config.compile else "no",
        **tracking.accelerator_options(config),
    )
    sharding.configure(accelerator, config)  # FSDP as asked, or a one-line refusal
    nodes.check_shared_run_dir(accelerator, Path(config.out_dir))
    run = start_run(config, overrides, accelerator)
    progress, window = run.progress, LogWindow(torch.zeros((), device=accelerator.device))
    bar = tqdm(
        total=run.total_tokens,
        initial=progress.tokens,
        unit="tok",
        unit_scale=True,
        disable=not accelerator.is_main_process or not sys.stderr.isatty(),
    )
    # On Ctrl-C the bar is closed first, so the line saying how to continue gets a line of its own.
    rerun_hint = errors.interrupt_hint
    errors.interrupt_hint = lambda: bar.close() or rerun_hint()
    while progress.tokens < run.total_tokens and run.stop_reason is None:
        # One optimizer step: the schedules' settings, this process's micro-batches, the update.
        settings = run.schedules.at(progress.tokens)
        apply_settings(run.optimizer, settings)
        batches = run.reader(progress.samples, settings.grad_accum)  # the next step's read ahead
        loss_sum, targets, grad_norm = train_step(
            run.model,
            run.optimizer,
            accelerator,
            batches.micro_batches,
            config.optim.grad_clip,
            skip_nonfinite=config.nonfinite_loss == "skip",
            step_targets=batches.targets,
        )
        step_tokens = settings.grad_accum * run.micro_tokens
        progress.step += 1
        progress.samples += settings.grad_accum * config.batch_size * accelerator.num_processes
        progress.tokens += step_tokens
        if loss_sum is None:
            run.log.say(f"skipped step {progress.step}: non-finite loss or gradient", progress.step)
        else:
            window.loss += loss_sum
            window.targets += targets
        window.tokens += step_tokens
        window.steps += 1
        bar.update(step_tokens)

        # A log event every log_interval steps; evaluation, checkpoint, snapshot per macro-batch.
        finished = progress.tokens >= run.total_tokens
        macro_batch_end = progress.step % config.macro_batch_steps == 0 or finished
        if progress.step % config.log_interval == 0 or macro_batch_end:
            event = {
                "step": progress.step,
                "tokens": progress.tokens,
                "train_loss": window.mean_loss(accelerator),
                "lr": settings.lr,
                "weight_decay": settings.weight_decay,
                "grad_accum": settings.grad_accum,
                "batch_tokens": step_tokens,
                "grad_norm": grad_norm.item(),
                "epochs": progress.samples / run.data.train_split.num_samples,
                **run.data.consumed(progress.samples),  # tokens/<source> of a mixture
                **run.throughput.figures(window.tokens, window.steps, window.seconds()),
            }
            run.log.write(event)
            bar.set_postfix(
                step=progress.step,
                loss=f"{event['train_loss']:.4f}",
                lr=f"{settings.lr:.2e}",
                wd=f"{settings.weight_decay:.3g}",
                batch=f"{settings.grad_accum}x{run.micro_tokens}",
            )
            check_finite(event["train_loss"], progress.step, run)
            window = LogWindow(torch.zeros_like(window.loss))
            train_event = event
        if macro_batch_end:
            end_macro_batch(run, train_event, finished)
            window.restart()  # evaluation time is not training throughput

    bar.close()
    run.reader.close()
    if run.stop_reason:
        run.log.say(run.stop_reason, progress.step)
    elapsed = timedelta(seconds=round(run.snapshots.elapsed()))
    run.log.say(
        f"done: {progress.step} steps, {progress.tokens:,} tokens in {elapsed}; best model in "
        f"{config.out_dir}/best",
        progress.step,
    )
    accelerator.wait_for_everyone()  # all processes leave the process group together
    accelerator.end_training()


@dataclass
class Run:
    """Everything the training loop uses, set up by start_run."""

    config: Config
    accelerator: Accelerator
    model: torch.nn.Module
    """Prepared by Accelerate: DDP-wrapped or FSDP-sharded, compiled, mixed precision."""
    raw_model: torch.nn.Module
    """The plain model inside it: saved, and used for decoding (under FSDP the sharded model
    itself, whose forward gathers the weights)."""
    eval_model: torch.nn.Module
    """The plain model, compiled when the run compiles: evaluation needs no DDP (under FSDP the
    prepared model)."""
    optimizer: torch.optim.Optimizer
    data: TrainingData
    reader: BatchReader
    """This process's micro-batches of each step, the next step's read in the background."""
    schedules: RunSchedules
    total_tokens: int
    micro_tokens: int
    """Input tokens of one micro-batch of all processes."""
    evaluate: Evaluator
    early_stopping: EarlyStopping
    rotator: checkpoints.CheckpointRotator
    snapshots: snapshots.Snapshots
    log: tracking.RunLog
    throughput: Throughput
    progress: Progress
    stop_reason: str | None


def start_run(config: Config, overrides: dict, accelerator: Accelerator) -> Run:
    """Data, model, optimizer, schedules and run directory; resumed if a snapshot says so."""
    threads = use_cpu_cores(accelerator)  # on a CPU, this process's share of the cores
    check_optimizer_supported(config, accelerator)
    out_dir = Path(config.out_dir)
    resume_from = snapshots.choose_snapshot(accelerator, config)
    errors.interrupt_hint = lambda: snapshots.rerun_hint(out_dir)

    # Every process builds the same initial weights from the same seed.
    set_seed(config.seed)
    model_overrides = {k[6:]: v for k, v in overrides.items() if k.startswith("model.")}
    meta, tokenizer = data_vocabulary(config, accelerator)
    notes: list[str] = []  # what fitting the starting model to the data did, for the log
    raw_model = build_model(config, meta, tokenizer, model_overrides, notes)
    data = open_training_data(config, accelerator)  # after fine-tuning set model.block_size
    # Dropout masks differ between processes (a resume restores each process's own RNG state).
    set_seed(config.seed, device_specific=True)

    # Accelerate wraps the model for DDP (or shards it, see gptlab/sharding.py), compiles it and
    # handles mixed precision. Evaluation runs the plain model, compiled on its own: unwrapping
    # the prepared one would strip DDP. A sharded model has no plain whole model inside: its own
    # forward gathers each block's weights, so it serves for everything.
    optimizer = make_optimizer(raw_model, config)
    model, optimizer = sharding.prepare(accelerator, raw_model, optimizer, config)
    if accelerator.is_fsdp2:
        raw_model = eval_model = model
    else:
        eval_model = torch.compile(raw_model) if config.compile else raw_model

    # The schedules run on tokens; a length in steps converts exactly since the batch is fixed then.
    micro_tokens = config.batch_size * data.sample_length * accelerator.num_processes
    peak_accum = round(config.grad_accum.peak)
    total_tokens = config.max_tokens or config.max_steps * micro_tokens * peak_accum
    run = Run(
        config=config,
        accelerator=accelerator,
        model=model,
        raw_model=raw_model,
        eval_model=eval_model,
        optimizer=optimizer,
        data=data,
        reader=BatchReader(data.sampler, data.train_split, config.batch_size, accelerator),
        schedules=RunSchedules(config.lr, config.weight_decay, config.grad_accum, total_tokens),
        total_tokens=total_tokens,
        micro_tokens=micro_tokens,
        evaluate=Evaluator(data.val_sets, config.batch_size, data.task_metrics),
        early_stopping=EarlyStopping(config.early_stop),
        rotator=checkpoints.CheckpointRotator(out_dir, config.keep_best, data.checkpoint_metric),
        snapshots=snapshots.Snapshots(accelerator, out_dir, config, raw_model),
        log=tracking.RunLog(accelerator, out_dir),
        throughput=Throughput.of_run(raw_model, data.sample_length, accelerator),
        progress=Progress(),
        stop_reason=None,
    )

    # The run directory: continue where the snapshot left off, or begin with a snapshot of step 0
    # so that a run that dies before its first save resumes too.
    if resume_from:  # the state at the snapshot, and metrics.jsonl cut back to it
        run.stop_reason = run.snapshots.restore(
            resume_from, run.progress, run.early_stopping, run.log
        )
    on_main_process(accelerator, lambda: write_run_dir(out_dir, config, run.snapshots))
    tracking.start_trackers(accelerator, config)
    if not resume_from:
        run.snapshots.save(run.progress, run.early_stopping, run.stop_reason)
    run.log.say(
        f"{count_parameters(raw_model) / 1e6:.2f}M parameters | {accelerator.num_processes} "
        f"process(es) on {accelerator.device} | {threads} | precision "
        f"{accelerator.mixed_precision} | optimizer {config.optim.name} | {total_tokens:,} tokens "
        "to train",
        run.progress.step,
    )
    run.log.say(sharding.describe(accelerator, config), run.progress.step)
    run.log.say(run.throughput.peak_source, run.progress.step)
    for note in notes:
        run.log.say(note, run.progress.step)
    if "chat" in meta:  # what preparing the conversations cut or skipped goes in the run's log too
        run.log.say(chat_data.describe(meta), run.progress.step)
    if config.finetune.freeze != "none":
        trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in raw_model.parameters())
        run.log.say(
            f"finetune.freeze={config.finetune.freeze}: {trainable:,} of {total:,} parameters "
            f"train (the head, the last {config.finetune.train_blocks} block(s), the final norm)",
            run.progress.step,
        )
    return run


def write_run_dir(out_dir: Path, config: Config, snapshot_store: snapshots.Snapshots) -> None:
    """Create the run directory (or tidy a resumed one) and write the resolved config into it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    snapshot_store.clean_leftovers()
    (out_dir / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")


def check_finite(train_loss: float, step: int, run: Run) -> None:
    """End the run on a non-finite training loss, unless such steps are skipped."""
    if math.isfinite(train_loss) or run.config.nonfinite_loss != "stop":
        return
    run.log.say(f"stopping: training loss is {train_loss}", step)
    raise UserError(
        f"training loss became {train_loss} at step {step}; lower lr.peak or raise "
        "optim.grad_clip (checkpoints saved so far are untouched)"
    )


def end_macro_batch(run: Run, train_event: dict, finished: bool) -> None:
    """Evaluate, log, decide on early stopping, keep the checkpoint if among the best, snapshot."""
    progress, accelerator = run.progress, run.accelerator
    event = run.evaluate(
        run.eval_model, run.raw_model, accelerator, progress.step, progress.tokens, final=finished
    )
    event["elapsed"] = run.snapshots.elapsed()  # seconds since the run began (resumes included)
    run.log.write(event)
    summary = " | ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in event.items()
    )
    rate = f"{train_event['tokens_per_sec']:,.0f} tok/s"
    run.log.say(f"{summary} | train_loss {train_event['train_loss']:.4f} | {rate}", progress.step)
    val_loss = event["val_loss"]
    run.stop_reason = run.early_stopping.update(val_loss)
    # A sharded model's weights are gathered onto the main process first (every process helps).
    scores = {k: v for k, v in event.items() if k in checkpoints.SCORES}
    wanted = scores[run.rotator.metric]
    weights = sharding.gathered_weights(accelerator, run.model, lambda: run.rotator.wants(wanted))
    saved = on_main_process(
        accelerator,
        lambda: run.rotator.save(
            run.raw_model, run.data.tokenizer, run.data.info, progress.step, scores, weights
        ),
    )
    if saved:
        run.log.say(f"saved {saved}", progress.step)
    if run.snapshots.due(progress.step, final=finished or run.stop_reason is not None):
        run.snapshots.save(progress, run.early_stopping, run.stop_reason, val_loss)


if __name__ == "__main__":
    run_cli(main)
