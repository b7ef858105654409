"""Snapshots: the whole state of a run, so that rerunning the same command continues it exactly.

    out_dir/snapshots/step-00000300/
        model.safetensors          weights (Accelerate's save_state, unwrapped: no DDP or compile prefixes)
        optimizer.bin              optimizer state (and scaler.pt with fp16)
        random_states_<rank>.pkl   every process's RNG states
        state.json                 progress (step, tokens, data position), early stopping, elapsed
                                   time, length of metrics.jsonl, trackers.json, the resolved
                                   config, the number of processes and whether they sharded
        manifest.json              sha256 of every file, written last

Under FSDP the weights and the optimizer state are sharded instead: pytorch_model_fsdp_0/ and
optimizer_0/ in torch.distributed.checkpoint's format, every process writing its own shards.

Every process writes its files into out_dir/snapshots/.tmp-step-N; the main process then adds
state.json and the manifest, flushes and renames the directory, so a crash at any moment leaves
the older snapshots intact. Pickled files are only ever loaded with weights_only=True; a sharded
snapshot's .metadata and the plain values among its shards are checked to be safe the same way.

A snapshot resumes with another number of processes (DDP or FSDP alike) when the global batch,
batch_size x grad_accum x processes, stays the same at every step: the run then trains on the same
samples in the same optimizer steps, from the same weights, optimizer state and schedule, with
losses equal up to the order of floating-point sums. Only the dropout masks cannot carry over, as
every process has its own RNG streams: they are reseeded from (seed, step, process), so the
resumed run is reproducible but draws other masks than the original would have.
"""

import io
import json
import os
import pickle
import shutil
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from accelerate.utils import load as load_weights_only
from safetensors import SafetensorError

from gptlab import sharding, storage
from gptlab.checkpoints import model_state_for_saving
from gptlab.config import Config, dotted
from gptlab.errors import UserError
from gptlab.scheduler import ScheduleConfig
from gptlab.training import on_main_process
from models.hf import unpickling_cause

SNAPSHOTS = "snapshots"
STATE_FILE = "state.json"
PICKLED = (".bin", ".pkl", ".pt")
# What a failed write raises: OSError from Python, SafetensorError from safetensors and
# RuntimeError from torch.save (a full disk reads "PytorchStreamWriter failed ..." or similar).
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)

# Config keys (dotted prefixes) that a resumed run must share with its snapshot: changing them
# would make it another run (other weights, data or batches, or an optimizer state that does not
# fit). Anything else (length, logging, keep_best, compile, the schedules...) may change on
# resume; the change is logged.
BREAKING_KEYS = (
    "model.",
    "data.name",
    "data.dir",
    "data.mixture",
    "seed",
    "mixed_precision",
    "optim.name",
    "finetune.",
)
# These may change together with the number of processes as long as the global batch stays.
BATCH_KEYS = ("batch_size", "grad_accum.")


def snapshot_dirs(out_dir: Path) -> list[Path]:
    """The run's snapshot directories, newest first (temporary and dropped ones left out)."""
    root = Path(out_dir) / SNAPSHOTS
    found = root.glob("step-*") if root.is_dir() else []
    return sorted((p for p in found if p.is_dir()), key=lambda p: p.name, reverse=True)


def holds_run(out_dir: Path) -> bool:
    """Whether out_dir holds something of a run worth keeping (a crash during the very first
    snapshot, before anything else was written, leaves only temporary files: not a run)."""
    out_dir = Path(out_dir)
    logged = any((out_dir / name).exists() for name in ("metrics.jsonl", "checkpoints"))
    return logged or bool(snapshot_dirs(out_dir))


def _refuse_to_unpickle(path: Path, error: Exception) -> UserError:
    return UserError(
        f"refusing to unpickle {path}: it holds more than tensors and plain data "
        f"({unpickling_cause(error)})"
    )


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles the .metadata of a distributed checkpoint (which torch reads with plain pickle)
    only if it holds nothing but DCP's own records, sizes, dtypes, layouts and paths."""

    RECORDS = "torch.distributed.checkpoint.metadata"  # its classes, imported only when needed
    ALLOWED = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str):
        record = False
        if module == self.RECORDS:
            import torch.distributed.checkpoint.metadata as dcp_metadata

            value = getattr(dcp_metadata, name, None)
            record = isinstance(value, type) and value.__module__ == self.RECORDS
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if record or dtype or (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


def verify_distributed_checkpoint(directory: Path) -> None:
    """Refuse a sharded (DCP) directory whose .metadata or plain values (optimizer settings,
    which torch unpickles with weights_only=False) hold more than data; tensors are read by torch
    with weights_only=True anyway."""
    import torch.distributed.checkpoint.metadata as dcp_metadata  # slow: only when sharded

    metadata_path = directory / ".metadata"
    if not metadata_path.is_file():
        raise UserError(f"{directory} has no .metadata: the sharded snapshot is incomplete")
    try:
        with open(metadata_path, "rb") as file:
            metadata = _MetadataUnpickler(file).load()
    except Exception as error:
        raise _refuse_to_unpickle(metadata_path, error) from None
    for index, info in metadata.storage_data.items():
        if isinstance(
            metadata.state_dict_metadata.get(index.fqn), dcp_metadata.BytesStorageMetadata
        ):
            path = directory / info.relative_path
            try:
                with open(path, "rb") as file:
                    file.seek(info.offset)
                    value = io.BytesIO(file.read(info.length))
                torch.load(value, weights_only=True)
            except Exception as error:
                raise _refuse_to_unpickle(path, error) from None


def verify_snapshot(directory: Path) -> dict:
    """Check a snapshot is complete, uncorrupted and safe to unpickle; return its state.json."""
    directory = Path(directory)
    if not (directory / STATE_FILE).is_file():
        raise UserError(f"{directory} is not a snapshot: it has no {STATE_FILE}")
    storage.verify_manifest(directory)
    for path in sorted(directory.iterdir()):
        if path.suffix in PICKLED:
            try:  # Accelerate's loader: weights_only=True, numpy arrays allowed for RNG states
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # about pickle protocols
                    load_weights_only(path, map_location="cpu")
            except Exception as error:
                raise _refuse_to_unpickle(path, error) from None
        elif path.is_dir():
            verify_distributed_checkpoint(path)
    state = json.loads((directory / STATE_FILE).read_text())
    # Accelerate skips missing RNG states silently; a resumed run would then not be exact.
    for rank in range(state["num_processes"]):
        if not (directory / f"random_states_{rank}.pkl").is_file():
            raise UserError(f"{directory} lacks the RNG states of process {rank}")
    return state


def _problem_of(directory: Path) -> str | None:
    """Why a snapshot cannot be resumed from, or None if it can."""
    try:
        verify_snapshot(directory)
    except (UserError, OSError, ValueError) as error:
        return str(error)
    return None


def _choose(out_dir: Path, resume: str) -> Path | None:
    """The snapshot to resume from (None: start fresh), warning about each one skipped."""
    if resume == "never":
        if holds_run(out_dir):
            raise UserError(
                f"{out_dir} already holds a run and resume is never; choose another --out_dir, "
                "move the old run away, or resume it with --resume=auto"
            )
        return None
    if resume != "auto":  # the path of one snapshot
        snapshot = Path(resume)
        if not snapshot.is_dir():
            raise UserError(f"snapshot {resume} does not exist; pass out/<run>/snapshots/step-N")
        problem = _problem_of(snapshot)
        if problem:
            raise UserError(f"cannot resume from {snapshot}: {problem}")
        if snapshot.resolve().parent.parent != out_dir.resolve() and holds_run(out_dir):
            raise UserError(f"{out_dir} already holds another run; choose another --out_dir")
        return snapshot
    candidates = snapshot_dirs(out_dir)
    problems = []
    for directory in candidates:
        problem = _problem_of(directory)
        if not problem:
            for skipped, why in problems:
                print(f"warning: skipping snapshot {skipped}: {why}", file=sys.stderr)
            return directory
        problems.append((directory, problem))
    if holds_run(out_dir) or candidates:
        newest = f" (newest, {problems[0][0].name}: {problems[0][1]})" if problems else ""
        raise UserError(
            f"{out_dir} holds a run but no valid snapshot to resume from{newest}; move it away "
            "or choose another --out_dir (nothing was changed)"
        )
    return None


def is_run_dir(directory: Path) -> bool:
    """Whether a directory is a training run of ours (its resolved config.json, or a run's files)."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
        ours = isinstance(config, dict) and {"model", "data", "optim", "lr"} <= set(config)
    except (OSError, ValueError):
        ours = False
    return ours or holds_run(directory)


def _reads_from(config: Config) -> list[Path]:
    """What a run reads and so must never write into: its data set and its starting checkpoint."""
    sources = [config.data.path]
    if config.init_from and Path(config.init_from).exists():
        sources.append(Path(config.init_from).resolve())
    return sources


def choose_snapshot(accelerator: Accelerator, config: Config) -> Path | None:
    """Check the run directory may be written, and pick the snapshot to resume from, on the main
    process; every process gets the same answer (or the same error)."""
    out_dir = Path(config.out_dir)
    choice: list = [None]
    if accelerator.is_main_process:
        try:
            storage.check_output_dir(out_dir, "training run", is_run_dir, _reads_from(config))
            directory = _choose(out_dir, config.resume)
            choice = [("ok", str(directory) if directory else None)]
        except UserError as error:
            choice = [("error", str(error))]
    if accelerator.num_processes > 1:
        broadcast_object_list(choice)
    status, value = choice[0]
    if status == "error":
        raise UserError(value)
    return Path(value) if value else None


def rerun_hint(out_dir: Path) -> str:
    """What rerunning the same command does after an interruption."""
    valid = [d for d in snapshot_dirs(out_dir) if _problem_of(d) is None]
    if valid:
        return f"rerun the same command to continue from {valid[0]}"
    return "rerun the same command to start again"


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in prefixes)


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(breaking, harmless) differences between a snapshot's config and this run's, as text,
    leaving out the batch keys (see batch_changes)."""
    old, new = dotted(old), dotted(new)
    breaking, harmless = [], []
    for key in sorted(set(old) | set(new)):
        if key in ("out_dir", "resume") or old.get(key) == new.get(key):
            continue
        if _matches(key, BATCH_KEYS):
            continue
        change = f"{key} {json.dumps(old.get(key))} -> {json.dumps(new.get(key))}"
        (breaking if _matches(key, BREAKING_KEYS) else harmless).append(change)
    return breaking, harmless


def global_batch(config: dict, processes: int) -> tuple[int, str]:
    """Samples per optimizer step when grad_accum is constant (else 0), and how it is made up."""
    accum = ScheduleConfig(**config["grad_accum"])
    constant = accum.first == accum.peak == accum.last
    steps = round(accum.peak) if constant else 0
    text = (
        f"{config['batch_size']} x {round(accum.peak) if constant else 'scheduled'} x {processes}"
    )
    return config["batch_size"] * steps * processes, text


def batch_changes(
    old: dict, new: dict, old_processes: int, new_processes: int
) -> tuple[list[str], list[str]]:
    """(breaking, harmless) changes of batch_size, grad_accum and the number of processes.

    They may change together as long as every optimizer step keeps its global batch (batch_size x
    grad_accum x processes): with the same grad_accum schedule when batch_size x processes stays,
    or with any constant grad_accum whose product stays. The run then trains on the same samples
    in the same steps (the sampler hands out global positions)."""
    changes = [
        f"{key} {json.dumps(value)} -> {json.dumps(dotted(new).get(key))}"
        for key, value in dotted(old).items()
        if _matches(key, BATCH_KEYS) and value != dotted(new).get(key)
    ]
    if old_processes != new_processes:
        changes.append(f"processes {old_processes} -> {new_processes}")
    if not changes:
        return [], []
    if old["grad_accum"] == new["grad_accum"]:
        kept = old["batch_size"] * old_processes == new["batch_size"] * new_processes
    else:
        before, after = global_batch(old, old_processes)[0], global_batch(new, new_processes)[0]
        kept = before > 0 and before == after
    if kept:
        return [], changes
    made_up = f"{global_batch(old, old_processes)[1]} -> {global_batch(new, new_processes)[1]}"
    return [
        f"global batch {made_up} (batch_size x grad_accum x processes must stay the same)",
        *changes,
    ], []


class Snapshots:
    """Save the run's state every `snapshot_every` macro-batches and restore it on resume."""

    def __init__(self, accelerator: Accelerator, out_dir: Path, config: Config, model):
        self.accelerator = accelerator
        self.out_dir = Path(out_dir)
        self.root = self.out_dir / SNAPSHOTS
        self.config = config
        self.model = model  # unwrapped: checked to be finite before saving
        self.started = time.monotonic()
        self.elapsed_before = 0.0
        # Snapshots hold the plain model's weights whatever wraps it (DDP, torch.compile), so
        # a run can resume with compile switched on or off.
        accelerator.register_save_state_pre_hook(self._unwrapped_weights)
        accelerator.register_load_state_pre_hook(self._unwrapped_models)

    def _unwrapped_weights(self, models, weights, output_dir) -> None:
        if not weights:  # FSDP: Accelerate has saved the shards itself
            return
        for i, model in enumerate(models):
            unwrapped = self.accelerator.unwrap_model(model, keep_torch_compile=False)
            weights[i] = model_state_for_saving(unwrapped)  # a tied output layer stored once

    def _unwrapped_models(self, models, input_dir) -> None:
        for i, model in enumerate(models):
            models[i] = self.accelerator.unwrap_model(model, keep_torch_compile=False)

    def elapsed(self) -> float:
        """Seconds this run has trained, over all its resumed parts."""
        return self.elapsed_before + time.monotonic() - self.started

    def due(self, step: int, final: bool) -> bool:
        """Whether the macro-batch that ends at `step` ends with a snapshot."""
        macro_batches = step // self.config.macro_batch_steps
        return final or macro_batches % self.config.snapshot_every == 0

    def save(
        self, progress, early_stopping, stop_reason: str | None, val_loss: float | None = None
    ) -> Path:
        """Save the run's state after progress.step; every process calls this."""
        step = progress.step
        state = {
            "progress": asdict(progress),
            "early_stopping": early_stopping.state_dict(),
            "stop_reason": stop_reason,
        }
        self._refuse_non_finite(step, val_loss)
        target = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-{target.name}"
        error = None
        try:
            if self.accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during a save
                tmp.mkdir(parents=True)
            self.accelerator.wait_for_everyone()
            self.accelerator.save_state(str(tmp), safe_serialization=True)
        except WRITE_ERRORS as failure:
            error = failure
        self._all_succeeded(error, tmp)
        try:
            if self.accelerator.is_main_process:
                metrics = self.out_dir / "metrics.jsonl"
                trackers = self.out_dir / "trackers.json"
                if metrics.exists():  # on disk before the snapshot that records its length
                    with open(metrics, "rb+") as file:
                        os.fsync(file.fileno())
                full_state = {
                    **state,
                    "elapsed_s": self.elapsed(),
                    "metrics_bytes": metrics.stat().st_size if metrics.exists() else 0,
                    "num_processes": self.accelerator.num_processes,
                    "sharding": "fsdp" if self.accelerator.is_fsdp2 else "none",
                    "trackers": json.loads(trackers.read_text()) if trackers.exists() else None,
                    "config": asdict(self.config),
                }
                (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=2) + "\n")
                storage.finalize_directory(tmp, target)
                self._drop_old()
        except WRITE_ERRORS as failure:
            error = failure
        self._all_succeeded(error, tmp)
        return target

    def _refuse_non_finite(self, step: int, val_loss: float | None) -> None:
        finite = sharding.all_finite(self.accelerator, self.model)
        if not finite or (val_loss is not None and not torch.isfinite(torch.tensor(val_loss))):
            newest = snapshot_dirs(self.out_dir)
            raise UserError(
                f"the model is not finite at step {step} (val loss {val_loss}): not saving it; "
                f"the last good snapshot is {newest[0] if newest else 'none'}"
            )

    def _all_succeeded(self, error: Exception | None, tmp: Path) -> None:
        """End the run on every process if a write failed on any (a full disk, say)."""
        failed = torch.tensor(float(error is not None), device=self.accelerator.device)
        if self.accelerator.reduce(failed, "sum").item() == 0:
            return
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        newest = snapshot_dirs(self.out_dir)
        reason = str(error).strip().splitlines()[0] if error else "failed on another process"
        if isinstance(error, OSError):
            reason = error.strerror or reason
        free = shutil.disk_usage(tmp.parent).free / 1e6
        raise UserError(
            f"could not write a snapshot to {tmp.parent} ({reason}; {free:.1f} MB free there); "
            "if the disk is full, free some space, then rerun the same command to resume from "
            f"{newest[0] if newest else 'the start'}"
        )

    def _drop_old(self) -> None:
        """Keep the newest keep_snapshots; rename before deleting so a crash leaves no half."""
        storage.keep_first(snapshot_dirs(self.out_dir), self.config.keep_snapshots)

    def _rewind_run_dir(self, directory: Path, state: dict) -> None:
        """Cut metrics.jsonl back to its length at the snapshot and put trackers.json back."""
        metrics = self.out_dir / "metrics.jsonl"
        own_run = Path(directory).resolve().parent.parent == self.out_dir.resolve()
        if own_run and metrics.exists() and metrics.stat().st_size > state["metrics_bytes"]:
            os.truncate(metrics, state["metrics_bytes"])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trackers = self.out_dir / "trackers.json"
        if state["trackers"] is not None and not trackers.exists():
            trackers.write_text(json.dumps(state["trackers"], indent=2) + "\n")

    def clean_leftovers(self) -> None:
        """Remove temporary directories that a crash during a save left (main process)."""
        for parent in (self.root, self.out_dir / "checkpoints"):
            storage.remove_leftovers(parent)

    def restore(self, directory: Path, progress, early_stopping, log) -> str | None:
        """Load a snapshot into the prepared model, optimizer, progress and early stopping.

        Returns the reason the run stopped if it had (a snapshot of its end). Refuses a snapshot
        whose config differs in a way that makes it another run, and cuts metrics.jsonl back to
        where it was at the snapshot, so the log goes on as if the run had never stopped.
        """
        state = json.loads((Path(directory) / STATE_FILE).read_text())
        breaking, harmless = config_changes(state["config"], asdict(self.config))
        processes = self.accelerator.num_processes
        batch_breaking, batch_harmless = batch_changes(
            state["config"], asdict(self.config), state["num_processes"], processes
        )
        breaking, harmless = breaking + batch_breaking, harmless + batch_harmless
        sharded = "fsdp" if self.accelerator.is_fsdp2 else "none"
        if state.get("sharding", "none") != sharded:
            breaking.append(
                f"sharding {state.get('sharding', 'none')} -> {sharded}: a snapshot saved with "
                "FSDP resumes with FSDP only, one saved without it resumes without it"
            )
        if breaking:
            raise UserError(
                f"cannot resume from {directory}: the config changes the run "
                f"({', '.join(breaking)}); rerun with the snapshot's values or choose another "
                "--out_dir"
            )
        self.accelerator.load_state(str(directory))
        if state["num_processes"] != processes:  # the saved RNG streams belong to other processes
            step = state["progress"]["step"]
            seed = np.random.SeedSequence([self.config.seed, step]).generate_state(1)[0]
            set_seed(int(seed), device_specific=True)
        self.elapsed_before = state["elapsed_s"]
        # A write that fails (a full or read-only disk) ends the run on every process at once.
        on_main_process(self.accelerator, lambda: self._rewind_run_dir(directory, state))
        self.accelerator.wait_for_everyone()
        for key, value in state["progress"].items():
            setattr(progress, key, value)
        early_stopping.load_state_dict(state["early_stopping"])
        changes = f"; config changes: {', '.join(harmless)}" if harmless else ""
        log.say(f"resumed from {directory} at step {progress.step}{changes}", progress.step)
        return state["stop_reason"]
