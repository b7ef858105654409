"""Model checkpoints: self-contained safetensors directories, written atomically, rotated by val
loss (classifiers: by val accuracy).

A checkpoint directory holds everything needed to use the model without the run or the corpus,
and is a Hugging Face model directory too (see models/hf.py):

    model.safetensors   weights under transformers' names (tensors only: nothing is unpickled)
    config.json         transformers' config (GPT2LMHeadModel or LlamaForCausalLM; classifiers:
                        *ForSequenceClassification with id2label, label2id, pad_token_id), with
                        our exact ModelConfig under "gptlab" and the step and val scores
    data.json           what the model was trained on (data format, arithmetic task, ...)
    tokenizer.json      the tokenizer or character vocabulary (+ tokenizer_config.json, which
                        holds the chat template of a model trained on chat data)
    generation_config.json  chat models only: generation stops at the end-of-turn token
    manifest.json       sha256 of every file, written last

load_checkpoint also takes any Hugging Face GPT-2 or Llama model directory or hub name.

Writes go to a temporary sibling directory that is renamed into place once complete and flushed,
so a crash leaves either the old state or the new one, never a half-written checkpoint.
"""

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from gptlab import storage
from gptlab.chat_format import END_OF_TURN
from gptlab.errors import UserError
from gptlab.tokenizer import Tokenizer
from models import ModelConfig, build_model, hf

MODEL_FILE = "model.safetensors"


def model_state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights on the CPU, contiguous, with a tied output layer stored once."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    tokenizer: Tokenizer,
    data_info: dict,
    info: dict,
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a checkpoint directory of an unwrapped model (see the module docstring); `weights`
    replaces model.state_dict() (a sharded model's, gathered: see gptlab.sharding)."""
    state = hf.to_hf_state(model, weights)

    def fill(tmp_dir: Path) -> None:
        save_file(state, tmp_dir / MODEL_FILE, metadata={"format": "pt"})
        config = {
            **hf.to_hf_config(model.config, tokenizer.eos_token_id, tokenizer.bos_token_id),
            "gptlab": asdict(model.config),
            **info,
        }
        (tmp_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp_dir / "data.json").write_text(json.dumps(data_info, indent=2) + "\n")
        tokenizer.save(tmp_dir)
        end_of_turn = tokenizer.backend.token_to_id(END_OF_TURN)
        if tokenizer.chat_template is not None and end_of_turn is not None:
            # transformers' generate() then stops where our chat does.
            stops = [end_of_turn] + [i for i in [tokenizer.eos_token_id] if i is not None]
            generation = {"eos_token_id": stops, "pad_token_id": end_of_turn}
            (tmp_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    storage.write_directory_atomically(Path(directory), fill)


def looks_like_hub_name(name: str) -> bool:
    """A hub name such as gpt2 or owner/model, rather than a local path that is missing."""
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1 and not name.endswith("/")


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory itself, a run directory (meaning its best checkpoint), a Hugging
    Face model directory, or a hub name (downloaded into the Hugging Face cache)."""
    name, path = str(path), Path(path)
    if (path / MODEL_FILE).is_file():
        return path
    if (path / "best" / MODEL_FILE).is_file():
        return (path / "best").resolve()
    if (path / "config.json").is_file() and not (path / "metrics.jsonl").is_file():
        return path  # a Hugging Face directory with sharded or PyTorch weights
    if not path.exists() and looks_like_hub_name(name):
        return hf.download(name)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; pass a run directory such as out/adder")
    raise UserError(
        f"{path} is not a checkpoint: it has no {MODEL_FILE} and no best/ checkpoint; "
        "pass a run directory (out/<run>) or one of its checkpoints"
    )


@dataclass
class Checkpoint:
    model: nn.Module
    tokenizer: Tokenizer
    data_info: dict
    info: dict
    directory: Path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint onto the CPU, in eval mode: one of ours (a checkpoint or run directory,
    verified against its manifest) or a Hugging Face GPT-2 / Llama model directory or hub name."""
    directory = resolve_checkpoint_dir(path)
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} has no config.json: it is not a model directory")
    try:
        hf_config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        if not isinstance(hf_config, dict):
            raise ValueError("not an object")
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError included
        raise UserError(
            f"{directory / 'config.json'} is corrupt ({str(error).splitlines()[0]}); "
            "use another checkpoint or restore the file"
        ) from None
    ours = "gptlab" in hf_config
    if ours:  # written by save_checkpoint: our exact config, checksums to verify
        storage.verify_manifest(directory)
        model_config = ModelConfig(**hf_config["gptlab"])
        state = hf.load_safetensors(directory / MODEL_FILE)
        info = {k: v for k, v in hf_config.items() if k in ("step", *SCORES)}
        data_info = json.loads((directory / "data.json").read_text())
    else:
        model_config = hf.from_hf_config(hf_config, str(directory))
        state = hf.read_hf_weights(directory)
        info = {"source": str(path)}
        data_info = {}
    model = build_model(model_config)
    # Our checkpoints written before the bridge hold our own names; everything else, transformers'
    # (with or without their base-model prefix: the hub's gpt2 also has a `wte.weight`).
    if not (ours and "wte.weight" in state):
        state = hf.from_hf_state(state, model_config, str(directory))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = model_config.tie_embeddings and not model_config.num_labels
    allowed_missing = {"lm_head.weight"} if tied else set()
    if set(missing) - allowed_missing or unexpected:
        raise UserError(
            f"{directory} does not match its config.json "
            f"(missing {sorted(set(missing) - allowed_missing)}, unexpected {sorted(unexpected)})"
        )
    return Checkpoint(model.eval(), Tokenizer.load(directory), data_info, info, directory)


SCORES = {"val_loss": "min", "val_accuracy": "max"}
"""The val scores a checkpoint can be ranked by, and which way is better."""


class CheckpointRotator:
    """Keep the best `keep_best` checkpoints of a run by `metric` (0 keeps all of them): val loss,
    or val accuracy for a classifier.

    Checkpoints live in out_dir/checkpoints/step-<step>-val-<loss> (or -acc-<accuracy>);
    out_dir/best and out_dir/latest are symbolic links to the best and the newest one kept.
    """

    def __init__(self, out_dir: Path, keep_best: int, metric: str = "val_loss"):
        self.out_dir = Path(out_dir)
        self.root = self.out_dir / "checkpoints"
        self.keep_best = keep_best
        self.metric = metric
        self.sign = 1.0 if SCORES[metric] == "min" else -1.0  # sorted ascending: best first

    def kept(self) -> list[tuple[float, int, Path]]:
        """(score, step, directory) of every complete checkpoint, best first."""
        found = []
        for directory in self.root.glob("step-*") if self.root.is_dir() else []:
            config_path = directory / "config.json"
            if (directory / storage.MANIFEST_FILE).is_file() and config_path.is_file():
                info = json.loads(config_path.read_text())
                found.append((info[self.metric], info["step"], directory))
        return sorted(found, key=lambda item: (self.sign * item[0], item[1]))

    def wants(self, score: float) -> bool:
        """Whether a checkpoint of this score would be among the best kept (ties: older stay)."""
        if not math.isfinite(score):
            return False
        kept = self.kept()
        return (
            self.keep_best == 0
            or len(kept) < self.keep_best
            or self.sign * score < self.sign * kept[-1][0]
        )

    def save(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        data_info: dict,
        step: int,
        scores: dict,
        weights: dict[str, torch.Tensor] | None = None,
    ) -> Path | None:
        """Save if among the best by scores[metric] (scores: the evaluation's val scores, all
        recorded in the checkpoint's config.json), drop those pushed out, repoint best/ and
        latest/. `weights` replaces model.state_dict() (a sharded model's, gathered).

        The dropping and repointing run after every evaluation, saved or not, so they also finish
        a rotation that a crash interrupted (a resumed run then ends with the same checkpoints).
        """
        directory = None
        score = scores[self.metric]
        if self.wants(score) and all(math.isfinite(v) for v in scores.values()):
            tag = "val" if self.metric == "val_loss" else "acc"
            directory = self.root / f"step-{step:08d}-{tag}-{score:.4f}"
            try:
                info = {"step": step, **{k: v for k, v in scores.items() if k in SCORES}}
                save_checkpoint(directory, model, tokenizer, data_info, info, weights)
            except (OSError, SafetensorError) as error:  # a full disk, say: tmp dir is gone
                reason = error.strerror if isinstance(error, OSError) else str(error)
                raise UserError(
                    f"could not write checkpoint {directory} ({reason}); if the disk is full, "
                    "free some space, then rerun the same command to resume (kept checkpoints "
                    "are intact)"
                ) from None
        kept = self.kept()
        if self.keep_best:
            storage.keep_first([directory for _, _, directory in kept], self.keep_best)
            kept = kept[: self.keep_best]
        if kept:
            self._point("best", kept[0][2])
            self._point("latest", max(kept, key=lambda item: item[1])[2])
        return directory

    def _point(self, name: str, target: Path) -> None:
        link = self.out_dir / name
        tmp = self.out_dir / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(target, self.out_dir), tmp)
        os.replace(tmp, link)


FINETUNE_CHANGES = ("dropout", "block_size")
"""Model keys a fine-tuning run may change on the command line; every other one is the checkpoint's."""


def grow_vocabulary(model: nn.Module, old: Tokenizer, new: Tokenizer, source: str) -> tuple:
    """The model for tokenizer `new`, which is `old` with tokens appended (the chat tokens, say):
    the token embedding (and with it a tied output layer; an untied one too) grows to the new
    vocabulary, and the rows of the added tokens start at the mean row of the old tokens, so
    they begin as an average token rather than noise. Returns the model and what was done
    (None if the vocabularies are the same); any other difference in vocabulary is refused."""
    old_vocab, new_vocab = old.backend.get_vocab(), new.backend.get_vocab()
    if old_vocab == new_vocab:
        return model, None
    added = sorted((i, t) for t, i in new_vocab.items() if t not in old_vocab)
    if any(new_vocab.get(t) != i for t, i in old_vocab.items()) or (
        added and added[0][0] < len(old_vocab)
    ):
        raise UserError(
            f"init_from {source} has a different tokenizer than the data set; prepare the data "
            f"with the checkpoint's tokenizer (`--tokenizer {source}`)"
        )
    config = ModelConfig(**asdict(model.config))
    config.vocab_size = max(config.vocab_size, len(new_vocab))
    state = model.state_dict()
    known = torch.tensor(sorted(old_vocab.values()))
    new_ids = torch.tensor([i for i, _ in added])
    for name in ("wte.weight", "lm_head.weight"):
        if name not in state or (name == "lm_head.weight" and config.tie_embeddings):
            continue
        table = state[name]
        grown = torch.cat([table, table.new_zeros(config.vocab_size - len(table), table.size(1))])
        grown[new_ids] = table[known].mean(dim=0)
        state[name] = grown
    if config.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    grown_model = build_model(config)
    grown_model.load_state_dict(state)
    tokens = " ".join(t for _, t in added)
    output = "the tied output layer with it" if config.tie_embeddings else "and the output layer"
    if config.vocab_size > model.config.vocab_size:
        change = f"grew the token embedding ({output}) from {model.config.vocab_size} to {config.vocab_size} rows"
    else:  # they fall in the unused rows of a padded vocabulary
        change = f"gave them unused rows of its padded embedding ({output})"
    note = (
        f"{source} lacks {len(added)} tokens of the data set ({tokens}): {change}; the new "
        "tokens start at the mean embedding"
    )
    return grown_model, note


def adapt_for_finetuning(model: nn.Module, changes: dict, source: str) -> nn.Module:
    """The checkpoint's model with the command line's model.* changes that fine-tuning allows:
    another dropout, or a shorter context (the GPT's position table cropped, as nanoGPT's
    crop_block_size). Any other change would not match the weights and is refused."""
    config = ModelConfig(**asdict(model.config))
    for key, value in changes.items():
        if value == getattr(config, key):
            continue
        if key not in FINETUNE_CHANGES:
            raise UserError(
                f"--model.{key} cannot change when fine-tuning from {source} (it is "
                f"{getattr(config, key)!r} there); drop the option, or train from scratch"
            )
        if key == "block_size" and value > config.block_size:
            raise UserError(
                f"--model.block_size={value} is longer than the {config.block_size} positions "
                f"{source} was trained with; use at most {config.block_size}"
            )
        setattr(config, key, value)
    if config == model.config:
        return model
    state = model.state_dict()
    if "wpe.weight" in state:
        state["wpe.weight"] = state["wpe.weight"][: config.block_size]
    adapted = build_model(config)
    adapted.load_state_dict(state)
    return adapted
