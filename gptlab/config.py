"""The one config schema of a training run, its loading from JSON and command-line overrides.

A run is configured by a JSON file (`--config configs/x.json`) whose keys mirror the dataclasses
below; any key can then be overridden as `--key=value` (nested keys dotted: `--model.n_layer=4`).
Unknown keys and wrong types are refused with a one-line message that suggests the fix.
"""

import ast
import difflib
import functools
import inspect
import json
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from gptlab.cli import MAX_SEED
from gptlab.errors import UserError
from gptlab.scheduler import EarlyStopConfig, ScheduleConfig
from models.config import ModelConfig


@dataclass
class MixtureSource:
    dir: str = ""
    """Directory of a prepared language-modelling data set."""
    weight: float = 0.0
    """Its share of the training samples (the weights are normalised to sum to 1)."""
    name: str = ""
    """Name in the logs (val_loss/<name>, tokens/<name>); empty means the directory's name."""

    @property
    def label(self) -> str:
        return self.name or Path(self.dir).name


@dataclass
class DataConfig:
    name: str = "adder"
    """Data set: a built-in name (shakespeare_char, adder, multiplier) or any set made by prepare_data.py."""
    dir: str = ""
    """Directory with the prepared files; empty means data/<name>."""
    mixture: list[MixtureSource] = field(default_factory=list)
    """Train on several prepared sets sharing one tokenizer instead: [{"dir": ..., "weight": 0.8}, ...]."""
    eval_samples: int = 256
    """Size of the fixed val subset (windows or examples) scored at every evaluation."""
    final_eval_samples: int | None = None
    """Size of the fixed val subset the run's last evaluation scores: null means eval_samples, 0 the whole val split (cheap evaluations during the run, an exact figure at its end)."""
    exact_match_samples: int = 256
    """Arithmetic data: val examples scored by exact match at every evaluation (0 turns it off)."""
    digits: int = 0
    """Arithmetic data (adder, multiplier): operand digits, for train.py to prepare the set when it is missing and to check it; 0: the task's default (3 for adder, 2 for multiplier)."""

    @property
    def path(self) -> Path:
        return Path(self.dir or f"data/{self.name}")

    def problems(self) -> list[str]:
        found = []
        if self.eval_samples < 1:
            found.append("data.eval_samples must be at least 1")
        if self.exact_match_samples < 0:
            found.append("data.exact_match_samples must be 0 (off) or more")
        if not 0 <= self.digits <= 6:
            found.append(f"data.digits is {self.digits}; use 1 to 6, or 0 for the default")
        if self.final_eval_samples is not None and self.final_eval_samples < 0:
            found.append("data.final_eval_samples must be null (as eval_samples), 0 (all) or more")
        if self.mixture and (self.dir or self.name != DataConfig.name):
            found.append("data.mixture replaces data.name and data.dir; leave those out")
        for i, source in enumerate(self.mixture):
            if not source.dir:
                found.append(f"data.mixture[{i}] needs a dir: the prepared data set to read")
            if not (math.isfinite(source.weight) and source.weight > 0):
                found.append(f"data.mixture[{i}].weight is {source.weight}; give a positive share")
        labels = [source.label for source in self.mixture]
        for label in sorted({label for label in labels if labels.count(label) > 1}):
            found.append(f"data.mixture names {label!r} twice; give the sources distinct names")
        return found


@dataclass
class OptimConfig:
    name: str = "adamw"
    """adamw, or muon: Muon for the weight matrices of the blocks, AdamW for embeddings, head, norms and biases."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off (the norm is still logged)."""
    muon_lr_scale: float = 20.0
    """Muon: its learning rate is the lr schedule's value times this (the schedule's value is AdamW's)."""
    muon_momentum: float = 0.95
    """Muon: momentum (Nesterov) of its updates."""
    muon_ns_steps: int = 5
    """Muon: Newton-Schulz iterations that orthogonalise each update (fewer cost less, orthogonalise less exactly)."""

    def problems(self) -> list[str]:
        found = [
            f"optim.{name} is {value}; it must be at least 0 and below 1"
            for name, value in (("beta1", self.beta1), ("beta2", self.beta2))
            if not 0.0 <= value < 1.0
        ]
        if not self.eps > 0.0:
            found.append(f"optim.eps is {self.eps}; it must be positive (e.g. 1e-8)")
        if not self.grad_clip >= 0.0:
            found.append(
                f"optim.grad_clip is {self.grad_clip}; use a positive norm, or 0 for no clipping"
            )
        if self.name not in ("adamw", "muon"):
            found.append(f"optim.name is {self.name!r}; use adamw or muon")
        if not 0.0 < self.muon_lr_scale < float("inf"):
            found.append(f"optim.muon_lr_scale is {self.muon_lr_scale}; it must be positive")
        if not 0.0 <= self.muon_momentum < 1.0:
            found.append(f"optim.muon_momentum is {self.muon_momentum}; it must be in [0, 1)")
        if not 1 <= self.muon_ns_steps <= 20:
            found.append(f"optim.muon_ns_steps is {self.muon_ns_steps}; use 1 to 20 (default 5)")
        return found


@dataclass
class FinetuneConfig:
    freeze: str = "none"
    """none: every weight trains; backbone: only the head, the last `train_blocks` blocks and the final norm train (needs init_from)."""
    train_blocks: int = 0
    """With freeze=backbone: how many of the last transformer blocks train too."""

    def problems(self) -> list[str]:
        found = []
        if self.freeze not in ("none", "backbone"):
            found.append(f"finetune.freeze is {self.freeze!r}; use none or backbone")
        if self.train_blocks < 0:
            found.append("finetune.train_blocks must be 0 or more")
        if self.train_blocks and self.freeze == "none":
            found.append("finetune.train_blocks needs finetune.freeze=backbone")
        return found


@dataclass
class TrackingConfig:
    trackers: list[str] = field(default_factory=list)
    """Experiment trackers fed through Accelerate: "wandb", "tensorboard", both, or none ([])."""
    project: str = "gptlab"
    """wandb project; TensorBoard writes to out_dir/tensorboard/<project>."""
    run_name: str = ""
    """wandb run name; empty means the name of out_dir."""
    tags: list[str] = field(default_factory=list)
    """wandb tags of the run."""

    def problems(self) -> list[str]:
        found = [
            f'tracking.trackers has {name!r}; use "wandb", "tensorboard" or both'
            for name in self.trackers
            if name not in ("wandb", "tensorboard")
        ]
        if len(set(self.trackers)) < len(self.trackers):
            found.append("tracking.trackers names a tracker twice")
        if not self.project:
            found.append("tracking.project must not be empty")
        return found


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lr: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(peak=1e-3))
    """Learning-rate schedule."""
    weight_decay: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(peak=0.1))
    """Weight-decay schedule (applied to weight matrices and embeddings only)."""
    grad_accum: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(peak=1))
    """Gradient-accumulation steps per optimizer step (rounded): schedule it to grow the batch."""
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment trackers (metrics.jsonl in out_dir is written either way)."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """What trains when fine-tuning from init_from."""
    batch_size: int = 12
    """Micro-batch size per process; global batch = batch_size * grad_accum * processes."""
    max_steps: int = 0
    """Length of the run in optimizer steps (set this or max_tokens)."""
    max_tokens: int = 0
    """Length of the run in tokens trained (set this or max_steps)."""
    macro_batch_steps: int = 100
    """Optimizer steps per macro-batch: the unit of evaluation, logging and saving."""
    log_interval: int = 10
    """Optimizer steps between training-loss log events (macro-batch ends are always logged)."""
    seed: int = 1337
    """Seed for initialisation, data order and dropout."""
    out_dir: str = ""
    """Run directory; empty means out/<config file name>."""
    mixed_precision: str = "auto"
    """auto (bf16 where supported, else fp16 on GPU, none on CPU), bf16, fp16 or no."""
    compile: bool = False
    """Compile the model with torch.compile (through Accelerate)."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass instead of keeping them (less memory, about a third more compute); DDP and FSDP alike."""
    fsdp_reduce_dtype: str = "fp32"
    """FSDP with mixed precision: precision the gradients are reduced in across processes: fp32, or bf16/fp16 (half the traffic, rounded sums)."""
    keep_best: int = 3
    """Checkpoints kept, the best by val loss (classifiers: by val accuracy); 0 keeps every one."""
    init_from: str = ""
    """Start from these weights (fresh optimizer and schedule): our checkpoint or run directory, or a Hugging Face GPT-2/Llama directory or hub name."""
    resume: str = "auto"
    """auto: continue from the newest valid snapshot in out_dir if there is one; never: refuse an out_dir that holds a run; or the path of a snapshot to continue from."""
    snapshot_every: int = 1
    """Macro-batches between snapshots (the run's whole state, for resume); the run's end is always saved."""
    keep_snapshots: int = 2
    """Snapshots kept, the newest ones (at least 1)."""
    nonfinite_loss: str = "stop"
    """On a non-finite loss or gradient: stop (the run ends with an error) or skip (the step is not applied)."""

    def problems(self) -> list[str]:
        found = self.model.problems()
        found += self.optim.problems()
        found += self.tracking.problems()
        found += self.finetune.problems()
        if self.finetune.freeze == "backbone" and not self.init_from:
            found.append("finetune.freeze=backbone needs init_from (a trained backbone to keep)")
        found += self.lr.problems("lr")
        found += self.weight_decay.problems("weight_decay")
        found += self.grad_accum.problems("grad_accum", minimum=1)
        for name in ("max_steps", "max_tokens"):
            if getattr(self, name) < 0:
                found.append(f"{name} is {getattr(self, name)}; it must not be negative")
        if (self.max_steps > 0) == (self.max_tokens > 0):
            found.append("set exactly one of max_steps and max_tokens to a positive number")
        if not 0 <= self.seed <= MAX_SEED:
            found.append(f"seed is {self.seed}; use a whole number from 0 to {MAX_SEED}")
        varying = {self.grad_accum.first, self.grad_accum.peak, self.grad_accum.last}
        if self.max_steps > 0 and len(varying) > 1:
            found.append("a grad_accum schedule needs the run length in tokens: set max_tokens")
        for name in ("batch_size", "macro_batch_steps", "log_interval"):
            if getattr(self, name) < 1:
                found.append(f"{name} must be at least 1")
        if self.early_stop.patience < 0 or not self.early_stop.min_delta >= 0:
            found.append("early_stop.patience and early_stop.min_delta must not be negative")
        if self.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            found.append(f"mixed_precision is {self.mixed_precision!r}; use auto, bf16, fp16 or no")
        if self.fsdp_reduce_dtype not in ("fp32", "bf16", "fp16"):
            found.append(f"fsdp_reduce_dtype is {self.fsdp_reduce_dtype!r}; use fp32, bf16 or fp16")
        if self.keep_best < 0:
            found.append("keep_best must be 0 (keep all) or more")
        if self.snapshot_every < 1 or self.keep_snapshots < 1:
            found.append("snapshot_every and keep_snapshots must be at least 1")
        if self.nonfinite_loss not in ("stop", "skip"):
            found.append(f"nonfinite_loss is {self.nonfinite_loss!r}; use stop or skip")
        if not self.resume:
            found.append("resume is empty; use auto, never or the path of a snapshot")
        found += self.data.problems()
        return found


# ----------------------------------------------------------------------------------------------
# Building dataclasses from JSON with validation


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", str(annotation)).replace("NoneType", "null")


def _check_value(key: str, value, annotation):
    """Return value as the annotated type, or raise UserError naming the key and expected type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        annotation = next(a for a in options if a is not type(None))
        origin = typing.get_origin(annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"config key '{key}' must be a finite number, got {value}")
    if origin is list:
        (item,) = typing.get_args(annotation)
        if is_dataclass(item) and isinstance(value, list):  # a list of objects, each checked
            return [build(item, v, f"{key}[{i}].") for i, v in enumerate(value)]
        if isinstance(value, list) and all(isinstance(v, item) for v in value):
            return value
    elif isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
        return value
    raise UserError(f"config key '{key}' must be {_type_name(annotation)}, got {json.dumps(value)}")


def build(cls, values: dict, prefix: str = ""):
    """Instantiate dataclass cls from a dict, refusing unknown keys (with a suggestion) and wrong types."""
    if not isinstance(values, dict):
        raise UserError(f"config key '{prefix.rstrip('.')}' must be an object of keys")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise UserError(f"unknown config key '{prefix}{key}'{_suggestion(prefix, key, cls)}")
        annotation = hints[key]
        if is_dataclass(annotation):
            kwargs[key] = build(annotation, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_value(prefix + key, value, annotation)
    return cls(**kwargs)


def _all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        keys += _all_keys(hint, f"{prefix}{f.name}.") if is_dataclass(hint) else [prefix + f.name]
    return keys


def _suggestion(prefix: str, key: str, cls) -> str:
    # Inside a list item (data.mixture[0].) only the item's own keys can be meant.
    candidates = [] if "[" in prefix else _all_keys(Config)
    close = difflib.get_close_matches(prefix + key, candidates, n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(key, [f.name for f in fields(cls)], n=1, cutoff=0.5)
        close = [prefix + c for c in close]
    return f"; did you mean '{close[0]}'?" if close else ""


# ----------------------------------------------------------------------------------------------
# Command-line overrides


def _parse_cli_value(key: str, text: str, annotation):
    """Turn a command-line string into the annotated type ('null' for None, JSON for lists)."""
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    options = typing.get_args(annotation) if is_union else (annotation,)
    if text.lower() in ("null", "none") and type(None) in options:
        return None
    base = next(a for a in options if a is not type(None))
    try:
        if base is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if base is int and "e" in text.lower():  # 1e6: a whole number, written as a float
            number = float(text)
            if not number.is_integer():
                raise ValueError
            return int(number)
        if base in (int, float):
            return base(text)
        if typing.get_origin(base) is list:
            return json.loads(text) if text.startswith("[") else [t for t in text.split(",") if t]
        return text
    except (ValueError, OverflowError):  # OverflowError: int("1e400") is int(inf)
        raise UserError(f"--{key}={text}: expected {_type_name(base)}") from None


def _annotation_of(dotted_key: str):
    cls, parts = Config, dotted_key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls) if is_dataclass(cls) else {}
        if part not in hints:
            prefix = ".".join(parts[:i]) + ("." if i else "")
            raise UserError(f"unknown option --{dotted_key}{_suggestion(prefix, part, cls)}")
        cls = hints[part]
    if is_dataclass(cls):
        raise UserError(f"--{dotted_key} is a group; set one of its keys, e.g. --{dotted_key}.KEY")
    return cls


def parse_overrides(args: list[str]) -> dict:
    """Turn ['--a.b=1', '--c', 'x'] into {'a.b': 1, 'c': 'x'}, typed by the schema."""
    overrides, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise UserError(f"unexpected argument {arg!r}; options look like --key=value")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, text, i = arg[2:], args[i + 1], i + 1
        else:
            key = arg[2:]
            text = "true" if _annotation_of(key) is bool else None
            if text is None:
                raise UserError(f"--{key} needs a value: --{key}=VALUE")
        overrides[key] = _parse_cli_value(key, text, _annotation_of(key))
        i += 1
    return overrides


def _set_dotted(values: dict, dotted_key: str, value) -> None:
    *parents, leaf = dotted_key.split(".")
    for part in parents:
        values = values.setdefault(part, {})
    values[leaf] = value


def load_config(argv: list[str]) -> tuple[Config, str, dict]:
    """Read --config FILE (optional) and --key=value overrides; return the validated config, its
    name, and the command line's overrides as {dotted key: value}."""
    args = list(argv)
    config_path = None
    for i, arg in enumerate(args):
        if arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                config_path = arg.split("=", 1)[1]
                del args[i]
            elif i + 1 < len(args):
                config_path = args[i + 1]
                del args[i : i + 2]
            else:
                raise UserError("--config needs a file: --config configs/adder.json")
            break
    values: dict = {}
    name = "default"
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise UserError(f"config file {config_path} not found; see configs/ for examples")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise UserError(
                f"config file {config_path} is not UTF-8 text (byte {error.start}: "
                f"{error.reason}); save it as UTF-8"
            ) from None
        except json.JSONDecodeError as error:
            raise UserError(f"config file {config_path} is not valid JSON: {error}") from None
        if not isinstance(values, dict):
            raise UserError(
                f"config file {config_path} must hold a JSON object of keys, such as "
                '{"max_steps": 100}; see configs/ for examples'
            )
        name = path.stem
    overrides = parse_overrides(args)
    for key, value in overrides.items():
        _set_dotted(values, key, value)
    config = build(Config, values)
    if not config.out_dir:
        config.out_dir = f"out/{name}"
    problems = config.problems()
    if problems:
        raise UserError("; ".join(problems))
    return config, name, overrides


def dotted(values: dict, prefix: str = "") -> dict:
    """A nested config dict as {dotted key: value}, the names --key=value overrides use."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


# ----------------------------------------------------------------------------------------------
# --help: every key with the documentation written under its field


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """The string literal written under each field of a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def help_text(cls=Config, prefix: str = "", instance=None) -> str:
    instance = instance if instance is not None else cls()
    lines = []
    for f in fields(cls):
        value = getattr(instance, f.name)
        doc = field_docs(cls).get(f.name, "")
        if is_dataclass(value):
            if doc:
                lines.append(f"  {prefix}{f.name}.*: {doc}")
            lines.append(help_text(type(value), f"{prefix}{f.name}.", value))
        else:
            lines.append(f"  --{prefix}{f.name}={json.dumps(value)}  {doc}")
    return "\n".join(lines)
