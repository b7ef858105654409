"""Bad input, typed as a user types it, into every script.

The README promises: one line `error: ...` on stderr naming the problem and the fix, exit code 2,
no traceback, and nothing written or deleted. Each case of the table runs a script in a fresh
working directory (set up by the case), and checks exactly that: the exit code, that stderr is one
line starting with `error: ` (holding the case's key words), and that the file trees of the
working directory and of the shared inputs (a prepared adder set, a tiny trained run, a text data
set) are byte for byte what they were.

Most cases fail while the flags and the config are checked, before any model is built; the
shared inputs are made once per session, and the cases run side by side (see `outcomes`).
"""

import errno
import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO, TINY_MODEL, run_script
from gptlab import snapshots
from gptlab.tasks import arithmetic
from gptlab.tasks.text import prepare_text
from gptlab.tokenizer import Tokenizer
from models import ModelConfig, build_model, hf

# ----------------------------------------------------------------------------------------------
# Shared inputs, made once per session: {adder} (conftest's), {run} (a tiny trained adder run)
# and {text} (a character data set with another vocabulary than the adder's).

RUN_ARGS = [
    "--data.dir={adder}",
    *TINY_MODEL,
    "--max_steps=4",
    "--macro_batch_steps=2",
    "--batch_size=8",
    "--data.eval_samples=16",
    "--data.exact_match_samples=16",
]


@pytest.fixture(scope="session")
def inputs(adder_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_input")
    paths = {"adder": adder_dir, "run": root / "run"}
    run_script("train.py", *fill(RUN_ARGS, paths), f"--out_dir={paths['run']}", cwd=root)
    corpus = root / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 100)
    paths["text"] = prepare_text(str(corpus), "char", root / "text")
    return paths


def fill(args, paths: dict[str, Path]) -> list[str]:
    return [arg.format_map({k: str(v) for k, v in paths.items()}) for arg in args]


def file_tree(root: Path) -> dict[str, tuple]:
    """Every directory, file (with its bytes) and symbolic link (with its target) under root."""
    found = {}
    for directory, subdirectories, files in os.walk(root):
        for name in subdirectories + files:
            path = Path(directory, name)
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = ("link", os.readlink(path))
            elif path.is_dir():
                found[key] = ("dir",)
            else:
                found[key] = ("file", path.read_bytes())
    return found


# ----------------------------------------------------------------------------------------------
# A disk that refuses every write: we run as root, so a read-only directory would still be
# writable; this wrapper makes every write under READ_ONLY_ROOT fail as the kernel would (EROFS,
# or ENOSPC for a full disk), through Python's open, os.open and the os calls that change a tree.

READ_ONLY = r"""
import builtins, errno, io, os, runpy, sys

ROOT = os.path.realpath(os.environ["READ_ONLY_ROOT"])
ERRNO = getattr(errno, os.environ["READ_ONLY_ERRNO"])


def inside(path, dir_fd=None):
    if isinstance(path, int):
        return False
    path = os.fsdecode(path)
    if dir_fd is not None and not os.path.isabs(path):
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    full = os.path.realpath(path)
    return full == ROOT or full.startswith(ROOT + os.sep)


def refuse(path):
    raise OSError(ERRNO, os.strerror(ERRNO), os.fsdecode(path))


real_open = io.open
def checked_open(file, mode="r", *args, **kwargs):
    if set(mode) & set("wax+") and inside(file):
        refuse(file)
    return real_open(file, mode, *args, **kwargs)
io.open = builtins.open = checked_open

real_os_open = os.open
WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def checked_os_open(path, flags, mode=0o777, *, dir_fd=None):
    if flags & WRITES and inside(path, dir_fd):
        refuse(path)
    return real_os_open(path, flags, mode, dir_fd=dir_fd)
os.open = checked_os_open


def guard(name, positions):
    real = getattr(os, name)
    def checked(*args, **kwargs):
        dir_fd = kwargs.get("dir_fd", kwargs.get("src_dir_fd"))
        for i in positions:
            if i < len(args) and inside(args[i], dir_fd):
                refuse(args[i])
        return real(*args, **kwargs)
    setattr(os, name, checked)


for name in ("mkdir", "rmdir", "remove", "unlink", "truncate", "chmod"):
    guard(name, [0])
for name in ("rename", "replace", "link"):
    guard(name, [0, 1])
guard("symlink", [1])

script, *args = sys.argv[1:]
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
"""


# ----------------------------------------------------------------------------------------------
# What a case sets up in its working directory before the script runs.


def not_a_run(cwd: Path, paths) -> None:
    """A directory of the user's own, with a config.json that is not a run's."""
    (cwd / "mine").mkdir()
    (cwd / "mine" / "config.json").write_text('{"my": "settings"}\n')
    (cwd / "mine" / "notes.txt").write_text("do not delete\n")


def write(name: str, content: str | bytes) -> Callable:
    def setup(cwd: Path, paths) -> None:
        path = cwd / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)

    return setup


def adder_copy(change: Callable[[Path], None]) -> Callable:
    """The prepared adder set copied to ./data, then damaged by change(data_dir)."""

    def setup(cwd: Path, paths) -> None:
        shutil.copytree(paths["adder"], cwd / "data")
        change(cwd / "data")

    return setup


def run_copy(change: Callable[[Path], None] = lambda run: None) -> Callable:
    """The tiny trained run copied to ./run, then changed by change(run_dir)."""

    def setup(cwd: Path, paths) -> None:
        shutil.copytree(paths["run"], cwd / "run", symlinks=True)
        change(cwd / "run")

    return setup


def cut(name: str, size: int | None = None, extra: bytes = b"") -> Callable[[Path], None]:
    """Truncate a file to `size` bytes (default: one byte short), or append `extra` bytes."""

    def change(directory: Path) -> None:
        path = directory / name
        if extra:
            path.write_bytes(path.read_bytes() + extra)
        else:
            os.truncate(path, path.stat().st_size - 1 if size is None else size)

    return change


def replace(name: str, content: str | bytes) -> Callable[[Path], None]:
    def change(directory: Path) -> None:
        path = directory / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return change


def drop_a_row(directory: Path) -> None:
    """One whole example less in train.bin and train_mask.bin: sizes agree, meta.json does not."""
    length = json.loads((directory / "meta.json").read_text())["example_length"]
    for name, width in (("train.bin", 2 * length), ("train_mask.bin", length)):
        path = directory / name
        os.truncate(path, path.stat().st_size - width)


def all_snapshot_manifests(content: str) -> Callable[[Path], None]:
    def change(run: Path) -> None:
        for snapshot in (run / "snapshots").iterdir():
            (snapshot / "manifest.json").write_text(content)

    return change


class Payload:
    """What a malicious pickle runs when it is loaded without weights_only: it leaves a file."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def hf_dir(change: str) -> Callable:
    """A transformers GPT-2 directory in ./hf (adder vocabulary), then damaged."""

    def setup(cwd: Path, paths) -> None:
        directory = cwd / "hf"
        directory.mkdir()
        config = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=13)
        torch.manual_seed(0)
        state = hf.to_hf_state(build_model(config))
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        hf_config = hf.to_hf_config(config, None)
        Tokenizer.from_chars(arithmetic.VOCABULARY).save(directory)
        if change == "missing key":
            del hf_config["n_layer"]
        elif change == "truncated":
            cut("model.safetensors", size=1000)(directory)
        elif change == "malicious":
            (directory / "model.safetensors").unlink()
            torch.save({"transformer.wte.weight": Payload()}, directory / "pytorch_model.bin")
        elif change == "not utf-8":
            (directory / "config.json").write_bytes(b'{"model_type": "gpt2\xff"}')
            return
        elif change == "bad tokenizer":
            (directory / "tokenizer.json").write_text('{"version": "1.0", "model": ')
        (directory / "config.json").write_text(json.dumps(hf_config))

    return setup


def chat_records(messages: list[dict] | None = None) -> str:
    """A chat file (OpenAI messages) of four conversations: these messages, or a good exchange."""
    exchange = messages or [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "A test."},
    ]
    return json.dumps([{"messages": exchange}] * 4)


def metrics(*lines: str | bytes) -> Callable:
    """A run directory ./r whose metrics.jsonl holds these lines."""
    good = json.dumps({"step": 1, "tokens": 64, "train_loss": 2.5, "lr": 1e-3, "grad_norm": 1.0})
    content = b"".join(
        (line if isinstance(line, bytes) else line.replace("GOOD", good).encode()) + b"\n"
        for line in lines
    )
    return write("r/metrics.jsonl", content)


# ----------------------------------------------------------------------------------------------
# The table


@dataclass
class Case:
    script: str
    args: list[str]
    message: str
    """Words the error line must hold (the problem, or the fix)."""
    setup: Callable | None = None
    disk: str | None = None
    """EROFS (read-only) or ENOSPC (full): every write under the working directory fails."""
    absent: str | None = None
    """Words the error line must not hold."""
    env: dict[str, str] | None = None
    """Environment the script runs with (a launcher's variables, say)."""


FSDP = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
TRAIN = ["--data.dir={adder}", *TINY_MODEL, "--max_steps=2", "--out_dir=out"]
EVAL = ["--checkpoint={run}", "--task=adder", "--max_samples=8"]
CLASSIFY = ["classify", "--input=in.csv"]
labelled = write("in.csv", "review,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(20)))
GENERATE = ["--checkpoint={run}", "--prompt=12+34=", "--max_new_tokens=3", "--temperature=0"]
BENCH = ["--data.dir={adder}", *TINY_MODEL, "--max_steps=1", "--steps=1", "--rounds=1"]

CASES: dict[str, Case] = {
    # train.py: where it writes
    "train-into-a-directory-that-is-not-a-run": Case(
        "train.py", [*TRAIN, "--out_dir=mine"], "does not hold a training run", not_a_run
    ),
    "train-init-from-its-own-out-dir": Case(
        "train.py", [*TRAIN, "--init_from={run}", "--out_dir={run}"], "overlaps"
    ),
    "train-out-dir-inside-the-data": Case(
        "train.py", [*TRAIN, "--out_dir={adder}/run"], "overlaps"
    ),
    "train-read-only-disk": Case("train.py", TRAIN, "Read-only file system", disk="EROFS"),
    "train-full-disk": Case("train.py", TRAIN, "No space left on device", disk="ENOSPC"),
    "train-rerun-on-a-read-only-disk-fails-at-metrics.jsonl": Case(
        "train.py",
        [*RUN_ARGS, "--out_dir=run"],
        "metrics.jsonl",
        run_copy(),
        disk="EROFS",
    ),
    # train.py: numbers
    "train-negative-grad-clip": Case(
        "train.py", [*TRAIN, "--optim.grad_clip=-1"], "optim.grad_clip"
    ),
    "train-max-steps-inf": Case("train.py", [*TRAIN, "--max_steps=inf"], "max_steps"),
    "train-max-steps-zero": Case("train.py", [*TRAIN, "--max_steps=0"], "max_steps"),
    "train-max-tokens-overflows": Case(
        "train.py", [*TRAIN, "--max_steps=0", "--max_tokens=1e400"], "max_tokens"
    ),
    "train-seed-negative": Case("train.py", [*TRAIN, "--seed=-1"], "seed"),
    "train-beta1-nan": Case("train.py", [*TRAIN, "--optim.beta1=nan"], "optim.beta1"),
    "train-beta1-one": Case("train.py", [*TRAIN, "--optim.beta1=1"], "optim.beta1"),
    "train-beta2-negative": Case("train.py", [*TRAIN, "--optim.beta2=-0.5"], "optim.beta2"),
    "train-eps-zero": Case("train.py", [*TRAIN, "--optim.eps=0"], "optim.eps"),
    "train-lr-inf": Case("train.py", [*TRAIN, "--lr.peak=inf"], "lr.peak"),
    "train-exponent-inf": Case(
        "train.py", [*TRAIN, "--lr.style=power", "--lr.exponent=inf"], "lr.exponent"
    ),
    "train-batch-size-zero": Case("train.py", [*TRAIN, "--batch_size=0"], "batch_size"),
    "train-rope-theta-zero": Case(
        "train.py", [*TRAIN, "--model.arch=llama", "--model.rope_theta=0"], "model.rope_theta"
    ),
    "train-norm-eps-inf": Case("train.py", [*TRAIN, "--model.norm_eps=inf"], "model.norm_eps"),
    "train-unknown-activation": Case(
        "train.py", [*TRAIN, "--model.activation=relu"], "model.activation is 'relu'"
    ),
    "train-min-delta-nan": Case(
        "train.py", [*TRAIN, "--early_stop.min_delta=nan"], "early_stop.min_delta"
    ),
    "train-exact-match-samples-negative": Case(
        "train.py", [*TRAIN, "--data.exact_match_samples=-1"], "data.exact_match_samples"
    ),
    "train-block-size-too-small": Case(
        "train.py", [*TRAIN, "--model.block_size=4"], "model.block_size"
    ),
    # train.py: sharding (gptlab/sharding.py)
    "train-activation-checkpointing-not-a-bool": Case(
        "train.py", [*TRAIN, "--activation_checkpointing=maybe"], "--activation_checkpointing"
    ),
    "train-fsdp-reduce-dtype-unknown": Case(
        "train.py", [*TRAIN, "--fsdp_reduce_dtype=fp8"], "fsdp_reduce_dtype"
    ),
    "train-fsdp-reduce-dtype-without-fsdp": Case(
        "train.py", [*TRAIN, "--fsdp_reduce_dtype=bf16"], "applies to FSDP runs only"
    ),
    "train-fsdp-in-one-process-without-a-launcher": Case(
        "train.py", TRAIN, "without a process group", env=FSDP
    ),
    "train-fsdp-flag-misspelt": Case(
        "train.py", TRAIN, "neither true nor false", env={**FSDP, "ACCELERATE_USE_FSDP": "ture"}
    ),
    # train.py: config files
    "train-config-not-utf8": Case(
        "train.py",
        ["--config=cfg.json", *TRAIN],
        "UTF-8",
        write("cfg.json", b'{"seed": 1, "out_dir": "caf\xe9"}'),
    ),
    "train-config-not-json": Case(
        "train.py",
        ["--config=cfg.json", *TRAIN],
        "not valid JSON",
        write("cfg.json", '{"seed": 1,'),
    ),
    "train-config-infinity": Case(
        "train.py",
        ["--config=cfg.json", *TRAIN],
        "optim.grad_clip",
        write("cfg.json", '{"optim": {"grad_clip": Infinity}}'),
    ),
    "train-config-nan": Case(
        "train.py",
        ["--config=cfg.json", *TRAIN],
        "optim.beta1",
        write("cfg.json", '{"optim": {"beta1": NaN}}'),
    ),
    "train-config-not-an-object": Case(
        "train.py", ["--config=cfg.json", *TRAIN], "object", write("cfg.json", "[1, 2]")
    ),
    # train.py: data sets and checkpoints
    "train-token-file-truncated": Case(
        "train.py", [*TRAIN, "--data.dir=data"], "truncated", adder_copy(cut("train.bin"))
    ),
    "train-mask-file-odd-size": Case(
        "train.py",
        [*TRAIN, "--data.dir=data"],
        "val_mask.bin",
        adder_copy(cut("val_mask.bin", extra=b"\x01")),
    ),
    "train-token-files-shorter-than-meta": Case(
        "train.py", [*TRAIN, "--data.dir=data"], "meta.json", adder_copy(drop_a_row)
    ),
    "train-meta-corrupt": Case(
        "train.py",
        [*TRAIN, "--data.dir=data"],
        "meta.json is corrupt",
        adder_copy(replace("meta.json", '{"format": "examples"')),
    ),
    "train-tokenizer-corrupt": Case(
        "train.py",
        [*TRAIN, "--data.dir=data"],
        "tokenizer.json",
        adder_copy(replace("tokenizer.json", '{"version": "1.0", "model": ')),
    ),
    "train-tokenizer-of-another-vocabulary-than-meta": Case(
        "train.py",
        [*TRAIN, "--data.dir=data"],
        "vocab",
        adder_copy(lambda d: Tokenizer.from_chars("abc").save(d)),
    ),
    "train-data-missing": Case(
        "train.py", [*TRAIN, "--data.name=corpus", "--data.dir=nope"], "no prepared data set"
    ),
    "train-resume-every-snapshot-corrupt": Case(
        "train.py",
        [*RUN_ARGS, "--out_dir=run"],
        "no valid snapshot",
        run_copy(all_snapshot_manifests('{"files": ')),
    ),
    "train-finetune-freeze-unknown": Case(
        "train.py", [*TRAIN, "--finetune.freeze=all", "--init_from={run}"], "finetune.freeze"
    ),
    "train-finetune-train-blocks-negative": Case(
        "train.py",
        [*TRAIN, "--finetune.freeze=backbone", "--finetune.train_blocks=-1", "--init_from={run}"],
        "finetune.train_blocks",
    ),
    "train-finetune-freeze-without-init-from": Case(
        "train.py", [*TRAIN, "--finetune.freeze=backbone"], "init_from"
    ),
    "train-model-labels-on-a-language-model-set": Case(
        "train.py", [*TRAIN, '--model.labels=["a", "b"]'], "model.labels"
    ),
    "train-init-from-another-vocabulary": Case(
        "train.py", [*TRAIN, "--data.dir={text}", "--init_from={run}"], "tokenizer"
    ),
    # evaluate.py
    "evaluate-batch-size-negative": Case(
        "evaluate.py", [*EVAL, "--batch_size", "-1"], "--batch_size"
    ),
    "evaluate-batch-size-inf": Case("evaluate.py", [*EVAL, "--batch_size=inf"], "--batch_size"),
    "evaluate-max-samples-negative": Case(
        "evaluate.py", [*EVAL, "--max_samples", "-1"], "--max_samples"
    ),
    "evaluate-unknown-task": Case("evaluate.py", [*EVAL, "--task=addr"], "unknown task"),
    "evaluate-unknown-split": Case("evaluate.py", [*EVAL, "--split=bogus"], "bogus"),
    "evaluate-classify-on-a-language-model": Case(
        "evaluate.py", [*EVAL, "--task=classify"], "fine-tuning it"
    ),
    "evaluate-data-of-another-vocabulary": Case(
        "evaluate.py", [*EVAL, "--task=loss", "--data_dir={text}"], "another vocabulary"
    ),
    "evaluate-task-other-than-the-data": Case("evaluate.py", [*EVAL, "--task=multiplier"], "adder"),
    "evaluate-output-in-a-missing-directory": Case(
        "evaluate.py", [*EVAL, "--output=nodir/x.json"], "does not exist"
    ),
    "evaluate-output-is-a-directory": Case(
        "evaluate.py", [*EVAL, "--output=d"], "directory", write("d/keep", "x")
    ),
    "evaluate-output-on-a-read-only-disk": Case(
        "evaluate.py", [*EVAL, "--output=x.json"], "Read-only file system", disk="EROFS"
    ),
    "evaluate-checkpoint-missing": Case(
        "evaluate.py", [*EVAL, "--checkpoint=./nope"], "does not exist"
    ),
    "evaluate-checkpoint-manifest-corrupt": Case(
        "evaluate.py",
        [*EVAL, "--checkpoint=run"],
        "manifest.json",
        run_copy(lambda run: replace("manifest.json", "[")(run / "best")),
    ),
    "evaluate-checkpoint-weights-truncated": Case(
        "evaluate.py",
        [*EVAL, "--checkpoint=run"],
        "model.safetensors",
        run_copy(lambda run: cut("model.safetensors", size=100)(run / "best")),
    ),
    "evaluate-hf-config-missing-a-key": Case(
        "evaluate.py",
        [*EVAL, "--checkpoint=hf", "--data_dir={adder}"],
        "n_layer",
        hf_dir("missing key"),
    ),
    "evaluate-hf-weights-truncated": Case(
        "evaluate.py",
        [*EVAL, "--checkpoint=hf", "--data_dir={adder}"],
        "model.safetensors",
        hf_dir("truncated"),
    ),
    "evaluate-hf-malicious-pickle": Case(
        "evaluate.py",
        [*EVAL, "--checkpoint=hf", "--data_dir={adder}"],
        "pytorch_model.bin",
        hf_dir("malicious"),
        absent="weights_only",
    ),
    "evaluate-hf-config-not-utf8": Case(
        "evaluate.py",
        [*EVAL, "--checkpoint=hf", "--data_dir={adder}"],
        "config.json",
        hf_dir("not utf-8"),
    ),
    "evaluate-data-truncated": Case(
        "evaluate.py", [*EVAL, "--data_dir=data"], "truncated", adder_copy(cut("test.bin"))
    ),
    # generate.py
    "generate-temperature-nan": Case(
        "generate.py", [*GENERATE, "--temperature=nan"], "--temperature"
    ),
    "generate-temperature-inf": Case(
        "generate.py", [*GENERATE, "--temperature=inf"], "--temperature"
    ),
    "generate-num-samples-zero": Case(
        "generate.py", [*GENERATE, "--num_samples=0"], "--num_samples"
    ),
    "generate-num-samples-not-whole": Case(
        "generate.py", [*GENERATE, "--num_samples=1e3"], "--num_samples"
    ),
    "generate-max-new-tokens-negative": Case(
        "generate.py", [*GENERATE, "--max_new_tokens=-1"], "--max_new_tokens"
    ),
    "generate-top-p-zero": Case("generate.py", [*GENERATE, "--top_p=0"], "--top_p"),
    "generate-seed-negative": Case("generate.py", [*GENERATE, "--seed=-1"], "--seed"),
    "generate-device-unknown": Case("generate.py", [*GENERATE, "--device=banana"], "--device"),
    "generate-device-absent": Case("generate.py", [*GENERATE, "--device=cuda:99"], "--device"),
    "generate-unknown-flag": Case("generate.py", [*GENERATE, "--tempreature=0"], "--tempreature"),
    "generate-prompt-outside-the-vocabulary": Case(
        "generate.py", [*GENERATE, "--prompt=hello"], "outside the vocabulary"
    ),
    "generate-hf-config-missing-a-key": Case(
        "generate.py", [*GENERATE, "--checkpoint=hf"], "n_layer", hf_dir("missing key")
    ),
    "generate-hf-malicious-pickle": Case(
        "generate.py",
        [*GENERATE, "--checkpoint=hf"],
        "pytorch_model.bin",
        hf_dir("malicious"),
        absent="weights_only",
    ),
    "generate-hf-tokenizer-corrupt": Case(
        "generate.py", [*GENERATE, "--checkpoint=hf"], "tokenizer.json", hf_dir("bad tokenizer")
    ),
    # prepare_data.py
    "prepare-digits-zero": Case("prepare_data.py", ["adder", "--digits", "0"], "--digits"),
    "prepare-digits-seven": Case("prepare_data.py", ["adder", "--digits", "7"], "--digits"),
    "prepare-seed-negative": Case("prepare_data.py", ["adder", "--seed", "-1"], "--seed"),
    "prepare-fractions-leave-no-train": Case(
        "prepare_data.py", ["adder", "--val_fraction=0.6", "--test_fraction=0.5"], "--test_fraction"
    ),
    "prepare-overwrite-a-directory-that-is-not-a-data-set": Case(
        "prepare_data.py",
        ["adder", "--digits=1", "--out_dir=mine", "--overwrite"],
        "does not hold a data set",
        not_a_run,
    ),
    "prepare-over-a-data-set-without-overwrite": Case(
        "prepare_data.py", ["adder", "--digits=2", "--out_dir={adder}"], "--overwrite"
    ),
    "prepare-out-dir-is-a-file": Case(
        "prepare_data.py", ["adder", "--out_dir=notes.txt"], "is a file", write("notes.txt", "x")
    ),
    "prepare-read-only-disk": Case(
        "prepare_data.py", ["adder", "--digits=1"], "Read-only file system", disk="EROFS"
    ),
    "prepare-full-disk": Case(
        "prepare_data.py", ["adder", "--digits=1"], "No space left on device", disk="ENOSPC"
    ),
    "prepare-text-missing-input": Case(
        "prepare_data.py", ["text", "--input=nope.txt"], "not found"
    ),
    "prepare-text-not-utf8": Case(
        "prepare_data.py",
        ["text", "--input=in.txt"],
        "UTF-8",
        write("in.txt", b"caf\xe9 au lait\n"),
    ),
    "prepare-text-empty": Case(
        "prepare_data.py", ["text", "--input=in.txt"], "empty", write("in.txt", "")
    ),
    "prepare-text-tokenizer-corrupt": Case(
        "prepare_data.py",
        ["text", "--input=in.txt", "--tokenizer=tok"],
        "tokenizer.json",
        lambda cwd, paths: (
            write("in.txt", "hello\n")(cwd, paths),
            write("tok/tokenizer.json", '{"version": "1.0", "model": ')(cwd, paths),
        ),
    ),
    "prepare-text-into-the-directory-it-reads": Case(
        "prepare_data.py",
        ["text", "--input=in.txt", "--out_dir=."],
        "overlaps",
        write("in.txt", "hello world\n" * 10),
    ),
    "prepare-text-val-fraction-nan": Case(
        "prepare_data.py",
        ["text", "--input=in.txt", "--val_fraction=nan"],
        "--val_fraction",
        write("in.txt", "hello\n"),
    ),
    "prepare-unknown-command": Case("prepare_data.py", ["addr"], "invalid choice"),
    # prepare_data.py chat (issue 11's bad input) and generate.py --chat
    "prepare-chat-file-in-no-format": Case(
        "prepare_data.py",
        ["chat", "--input=c.json"],
        "which match none",
        write("c.json", json.dumps([{"question": "a", "answer": "b"}])),
    ),
    "prepare-chat-role-outside-the-three": Case(
        "prepare_data.py",
        ["chat", "--input=c.json"],
        "role 'bot'",
        write(
            "c.json",
            chat_records([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]),
        ),
    ),
    "prepare-chat-no-assistant-turn-left": Case(
        "prepare_data.py",
        ["chat", "--input=c.json"],
        "none of the 4 conversations",
        write("c.json", chat_records([{"role": "user", "content": "a"}])),
    ),
    "prepare-chat-val-fraction-zero": Case(
        "prepare_data.py",
        ["chat", "--input=c.json", "--val_fraction=0"],
        "--val_fraction",
        write("c.json", chat_records()),
    ),
    "prepare-chat-test-fraction-one": Case(
        "prepare_data.py",
        ["chat", "--input=c.json", "--test_fraction=1"],
        "--test_fraction",
        write("c.json", chat_records()),
    ),
    "prepare-chat-seed-inf": Case(
        "prepare_data.py", ["chat", "--input=c.json", "--seed=inf"], "--seed", write("c.json", "[]")
    ),
    "prepare-chat-block-size-zero": Case(
        "prepare_data.py",
        ["chat", "--input=c.json", "--block_size=0"],
        "--block_size",
        write("c.json", "[]"),
    ),
    "prepare-chat-into-the-directory-it-reads": Case(
        "prepare_data.py",
        ["chat", "--input=c.json", "--out_dir=."],
        "overlaps",
        write("c.json", chat_records()),
    ),
    "generate-chat-checkpoint-without-a-chat-template": Case(
        "generate.py", ["--checkpoint={run}", "--chat"], "prepare_data.py chat"
    ),
    "generate-chat-with-a-prompt": Case("generate.py", [*GENERATE, "--chat"], "--prompt"),
    "generate-system-without-chat": Case(
        "generate.py", [*GENERATE, "--system=Be brief."], "add --chat"
    ),
    # prepare_data.py classify (issue 12's bad input)
    "prepare-classify-one-class": Case(
        "prepare_data.py", [*CLASSIFY], "at least 2", write("in.csv", "review,label\na,1\nb,1\n")
    ),
    "prepare-classify-text-column-not-text": Case(
        "prepare_data.py", [*CLASSIFY], "not text", write("in.csv", "review,label\n1,0\n2,1\n")
    ),
    "prepare-classify-no-such-column": Case(
        "prepare_data.py", [*CLASSIFY, "--label_column=stars"], "--label_column", labelled
    ),
    "prepare-classify-seed-negative": Case(
        "prepare_data.py", [*CLASSIFY, "--seed=-1"], "--seed", labelled
    ),
    "prepare-classify-test-fraction-inf": Case(
        "prepare_data.py", [*CLASSIFY, "--test_fraction=inf"], "--test_fraction", labelled
    ),
    "prepare-classify-context-zero": Case(
        "prepare_data.py", [*CLASSIFY, "--context=0"], "--context", labelled
    ),
    "prepare-classify-pooling-unknown": Case(
        "prepare_data.py", [*CLASSIFY, "--pooling=mean"], "--pooling", labelled
    ),
    "prepare-classify-min-char-count-zero": Case(
        "prepare_data.py", [*CLASSIFY, "--min_char_count=0"], "--min_char_count", labelled
    ),
    # benchmark.py
    "benchmark-memory-and-generate": Case(
        "benchmark.py", [*BENCH, "--memory", "--generate=4"], "give one"
    ),
    "benchmark-steps-zero": Case("benchmark.py", [*BENCH, "--steps=0"], "--steps"),
    "benchmark-steps-inf": Case("benchmark.py", [*BENCH, "--steps=inf"], "--steps"),
    "benchmark-rounds-zero": Case("benchmark.py", [*BENCH, "--rounds=0"], "--rounds"),
    "benchmark-generate-zero": Case("benchmark.py", [*BENCH, "--generate=0"], "--generate"),
    "benchmark-generate-past-the-context": Case(
        "benchmark.py", [*BENCH, "--generate=100"], "model.block_size"
    ),
    "benchmark-output-in-a-missing-directory": Case(
        "benchmark.py", [*BENCH, "--output=nodir/b.json"], "does not exist"
    ),
    "benchmark-bad-config-value": Case(
        "benchmark.py", [*BENCH, "--optim.beta1=nan"], "optim.beta1"
    ),
    "benchmark-data-missing": Case(
        "benchmark.py", [*BENCH, "--data.name=corpus", "--data.dir=nope"], "no data set in nope"
    ),
    # plot.py
    "plot-no-training-events": Case(
        "plot.py", ["r"], "no training events", metrics('{"step": 0, "message": "starting"}')
    ),
    "plot-output-not-png": Case("plot.py", ["r", "--output=r.pdf"], ".png", metrics("GOOD")),
    "plot-output-in-a-missing-directory": Case(
        "plot.py", ["r", "--output=nodir/r.png"], "does not exist", metrics("GOOD")
    ),
    "plot-output-is-a-directory": Case(
        "plot.py",
        ["r", "--output=d.png"],
        "directory",
        lambda cwd, paths: (metrics("GOOD")(cwd, paths), write("d.png/keep", "x")(cwd, paths)),
    ),
    "plot-read-only-disk": Case(
        "plot.py", ["r"], "Read-only file system", metrics("GOOD"), disk="EROFS"
    ),
    "plot-corrupt-line-inside": Case(
        "plot.py", ["r"], "line 2", metrics("GOOD", '{"step": 2, "tok', "GOOD")
    ),
    "plot-metrics-not-utf8": Case(
        "plot.py", ["r"], "UTF-8", metrics("GOOD", b'{"note": "\xff"}', "GOOD")
    ),
    "plot-event-not-an-object": Case("plot.py", ["r"], "line 1", metrics("[1, 2]", "GOOD")),
    "plot-no-runs": Case("plot.py", [], "runs"),
    "plot-unknown-flag": Case("plot.py", ["r", "--ouput=x.png"], "--ouput", metrics("GOOD")),
}


@pytest.fixture(scope="session")
def read_only_wrapper(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("wrapper") / "read_only.py"
    path.write_text(READ_ONLY)
    return path


@dataclass
class Outcome:
    result: subprocess.CompletedProcess
    cwd_changed: bool


def run_case(case: Case, cwd: Path, inputs: dict[str, Path], read_only_wrapper: Path) -> Outcome:
    """Set up the working directory, run the script there as a user would, compare the tree."""
    cwd.mkdir()
    if case.setup:
        case.setup(cwd, inputs)
    before = file_tree(cwd)
    args = fill(case.args, inputs)
    env = {"OMP_NUM_THREADS": "1", **(case.env or {})}  # the cases run side by side
    if case.disk:
        env.update(READ_ONLY_ROOT=str(cwd), READ_ONLY_ERRNO=case.disk)
        script, args = str(read_only_wrapper), [str(REPO / case.script), *args]
    else:
        script = case.script
    result = run_script(script, *args, cwd=cwd, check=False, env=env)
    return Outcome(result, file_tree(cwd) != before)


@pytest.fixture(scope="session")
def outcomes(request, inputs, read_only_wrapper, tmp_path_factory) -> tuple[dict, list[str]]:
    """Every selected case, run a few at a time: a case is mostly Python starting and importing
    torch, so running them side by side takes the table from minutes to half that on 2 cores.
    Returns {case: Outcome} and the shared inputs that any case changed (compared before and
    after all of them)."""
    selected = [
        item.callspec.params["name"]
        for item in request.session.items
        if item.originalname == "test_bad_input_gets_one_line_exit_2_and_changes_nothing"
    ]
    root = tmp_path_factory.mktemp("cases")
    shared_before = {key: file_tree(path) for key, path in inputs.items()}
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        futures = {
            name: pool.submit(run_case, CASES[name], root / name, inputs, read_only_wrapper)
            for name in selected
        }
        found = {name: future.result() for name, future in futures.items()}
    changed = [key for key, path in inputs.items() if file_tree(path) != shared_before[key]]
    return found, changed


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_line_exit_2_and_changes_nothing(name, outcomes):
    found, shared_inputs_changed = outcomes
    case, outcome = CASES[name], found[name]
    result = outcome.result
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert case.message in lines[0]
    if case.absent:
        assert case.absent not in lines[0]
    assert not outcome.cwd_changed, "the working directory changed"
    assert shared_inputs_changed == [], "a case of the table changed a shared input"


# ----------------------------------------------------------------------------------------------
# plot.py and a run being written: a half-written last line is skipped with a warning


def test_plot_skips_a_half_written_last_line_with_a_warning(tmp_path):
    metrics("GOOD", '{"step": 2, "tokens": 128, "train_lo')(tmp_path, {})
    result = run_script("plot.py", "r", "--output=r.png", cwd=tmp_path)
    assert result.stderr.splitlines() == [
        "warning: skipping the unfinished last line of r/metrics.jsonl (a run still writing it?)"
    ]
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------------------
# Ctrl-C in train.py: one line naming the snapshot a rerun continues from, exit code 130


LONG_RUN = [*RUN_ARGS, "--max_steps=100000", "--macro_batch_steps=3", "--log_interval=1"]


def default_ctrl_c() -> None:
    """In the child: Ctrl-C as in a terminal. A suite started in the background by a shell
    (`cmd &`) inherits SIGINT ignored, and Python would then never raise KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_when(process: subprocess.Popen, output, seen: Callable[[str], bool]) -> str:
    """Read the process's output until seen(text) holds, then send SIGINT; return everything."""
    text, deadline, interrupted = "", time.monotonic() + 300, False
    while True:
        chunk = output(timeout=max(0.0, deadline - time.monotonic()))
        if chunk is None:  # end of output
            return text
        text += chunk
        if not interrupted and seen(text):
            process.send_signal(signal.SIGINT)
            interrupted = True
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"train.py did not finish:\n{text[-3000:]}")


def newest_valid_snapshot(run_dir: Path) -> Path:
    return next(d for d in snapshots.snapshot_dirs(run_dir) if snapshots._problem_of(d) is None)


def test_ctrl_c_under_the_progress_bar_says_which_snapshot_a_rerun_continues_from(inputs, tmp_path):
    """In a terminal (a pty), with the progress bar drawn on stderr."""
    run_dir = tmp_path / "run"
    args = [*fill(LONG_RUN, inputs), f"--out_dir={run_dir}"]
    controller, terminal = pty.openpty()
    # A terminal 120 columns wide: a new pty has 0 columns, and tqdm would draw an empty bar.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    environment = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=tmp_path,
        env=environment,
        preexec_fn=default_ctrl_c,
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)

    def output(timeout: float) -> str | None:
        ready, _, _ = select.select([controller], [], [], timeout)
        if not ready:
            return ""
        try:
            data = os.read(controller, 65536)
        except OSError as error:  # EIO: the terminal's other end is closed
            assert error.errno == errno.EIO
            return None
        return data.decode(errors="replace") or None

    # Interrupt once a checkpoint has been saved and the bar (with its postfix) redrawn after it.
    under_the_bar = re.compile(r"saved .*\n.*tok/s, batch=")
    text = interrupt_when(process, output, lambda t: under_the_bar.search(t) is not None)
    os.close(controller)
    assert process.wait(timeout=60) == 130, text[-3000:]
    assert "Traceback" not in text
    lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    expected = (
        f"interrupted; rerun the same command to continue from {newest_valid_snapshot(run_dir)}"
    )
    assert expected in lines, text[-3000:]


def test_ctrl_c_without_a_terminal_is_one_line_on_stderr_and_the_rerun_continues(inputs, tmp_path):
    run_dir = tmp_path / "run"
    args = [*fill(LONG_RUN, inputs), f"--out_dir={run_dir}"]
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "WANDB_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",  # so that the test sees each message as it is printed
    }
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=tmp_path,
        env=environment,
        preexec_fn=default_ctrl_c,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def output(timeout: float) -> str | None:
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        if not ready:
            return ""
        return process.stdout.readline() or None

    interrupt_when(process, output, lambda t: t.count("saved ") >= 2)
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 130, stderr[-3000:]
    snapshot = newest_valid_snapshot(run_dir)
    assert stderr.splitlines() == [
        f"interrupted; rerun the same command to continue from {snapshot}"
    ]
    step = int(snapshot.name.removeprefix("step-"))
    again = run_script("train.py", *args, f"--max_steps={step}", cwd=tmp_path)
    assert f"resumed from {snapshot} at step {step}" in again.stdout
