"""Snapshots and resume, end to end: killed runs continue bit-identically; bad resumes are refused."""

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import REPO, TINY_MODEL, mixture_option, read_metrics, run_script
from gptlab.checkpoints import load_checkpoint
from gptlab.storage import MANIFEST_FILE, sha256_of

pytestmark = pytest.mark.slow


# One thread per process, as torchrun sets: a tiny model runs faster without thread contention.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SHARDED = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


def short_run_args(adder_dir, out_dir, *extra: str) -> list[str]:
    """A tiny adder run of 40 steps with a snapshot every 5 (about 5 s of training on a CPU)."""
    return [
        "--config",
        str(REPO / "configs/adder.json"),
        *TINY_MODEL,
        f"--data.dir={adder_dir}",
        "--data.eval_samples=64",
        "--data.exact_match_samples=16",
        f"--out_dir={out_dir}",
        "--batch_size=16",
        "--max_steps=40",
        "--macro_batch_steps=5",
        "--log_interval=1",
        "--keep_best=2",
        "--model.dropout=0.1",  # so that RNG states matter
        *extra,
    ]


def logged_numbers(run_dir: Path) -> list[dict]:
    """Every data event of metrics.jsonl, without messages and wall-clock throughput."""
    wall_clock = ("tokens_per_sec", "step_time", "mfu", "elapsed")
    return [
        {k: v for k, v in event.items() if k not in wall_clock}
        for event in read_metrics(run_dir)
        if "message" not in event
    ]


def final_weights(run_dir: Path) -> dict:
    newest = sorted((run_dir / "snapshots").glob("step-*"))[-1]
    if (newest / "model.safetensors").exists():
        return load_file(newest / "model.safetensors")
    with tempfile.TemporaryDirectory() as scratch:  # a sharded snapshot, read without processes
        dcp_to_torch_save(newest / "pytorch_model_fsdp_0", Path(scratch) / "whole.pt")
        return torch.load(Path(scratch) / "whole.pt", weights_only=True)["model"]


def assert_same_weights(weights: dict, expected: dict) -> None:
    assert weights.keys() == expected.keys()
    for name in weights:
        assert weights[name].equal(expected[name]), name


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert logged_numbers(run_dir) == logged_numbers(reference)
    assert_same_weights(final_weights(run_dir), final_weights(reference))
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (reference / "checkpoints").iterdir())
    best = load_file(run_dir / "best" / "model.safetensors")
    assert_same_weights(best, load_file(reference / "best" / "model.safetensors"))


def launch(args: list[str], cwd: Path, processes: int, log, env: dict) -> subprocess.Popen:
    """Start train.py as run_script does."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", **ONE_THREAD, **env}
    launcher = [sys.executable]
    if processes > 1:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env["ACCELERATE_USE_CPU"] = "true"
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
        launcher += [f"--master_port={port}"]
    command = [*launcher, str(REPO / "train.py"), *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=log)


def newest_step(run_dir: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (run_dir / "snapshots").glob("step-*")]
    return max(steps, default=-1)


def kill_when(process: subprocess.Popen, ready, timeout: float = 120) -> bool:
    """SIGKILL the run and its workers once ready() holds; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    kill_tree(process)
    return True


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun's workers run in sessions of their own)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid] + [p for child in children for p in process_tree(int(child))]


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a launcher and all its workers at once, like a machine that dies, and wait."""
    pids = process_tree(process.pid)
    for pid in reversed(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()
    for pid in pids[1:]:  # workers are reaped by someone else: wait until none runs any more
        status = Path(f"/proc/{pid}/status")
        while status.exists() and "\tZ" not in status.read_text():
            time.sleep(0.01)


def moment_reached(moment: str, run_dir: Path, chance: random.Random):
    """A test of whether a run has reached the moment to kill it."""
    if moment == "start-up":
        # Before the run writes anything: importing torch and the rest takes over a second even
        # on a fast machine, where the whole tiny run then trains in under one.
        deadline = time.monotonic() + chance.uniform(0.2, 1.0)
        return lambda: time.monotonic() > deadline
    if moment == "after a snapshot":
        last, delay = newest_step(run_dir), chance.uniform(0.0, 0.1)
        return lambda: newest_step(run_dir) > last and not time.sleep(delay)
    # During a save: the temporary directory of a new snapshot is being filled (those left by
    # a save killed earlier do not count: the next run removes them before saving).
    last, launched = newest_step(run_dir), time.time()

    def saving() -> bool:
        for tmp in (run_dir / "snapshots").glob(".tmp-step-*"):
            with contextlib.suppress(OSError):
                if int(tmp.name.split("-")[-1]) > last and tmp.stat().st_mtime > launched:
                    return True
        return False

    return saving


@pytest.mark.parametrize(
    "data, layout",
    [
        ("adder", "1 process"),
        ("adder", "2 processes"),
        ("adder", "FSDP over 2 processes"),
        ("mixture", "FSDP over 2 processes"),
    ],
)
def test_a_run_killed_many_times_ends_bit_identical_to_an_uninterrupted_one(
    adder_dir, mixture_dirs, tmp_path, data, layout
):
    processes = 1 if layout == "1 process" else 2
    env = {**ONE_THREAD, **(SHARDED if layout.startswith("FSDP") else {})}
    # Long enough (12 snapshots) that the run is still going at every kill on a fast machine.
    longer = ["--max_steps=120", "--macro_batch_steps=10", "--batch_size=32"]
    if layout.startswith("FSDP"):  # sharded and checkpointed: both must resume exactly
        longer.append("--activation_checkpointing=true")
    if data == "mixture":  # two text sets at 0.8 / 0.2 instead of the adder's examples
        longer += [mixture_option(*mixture_dirs), "--data.eval_samples=16"]

    def run_args(out_dir: Path) -> list[str]:
        args = short_run_args(adder_dir, out_dir, *longer)
        return [a for a in args if not (data == "mixture" and a.startswith("--data.dir="))]

    whole = run_args(tmp_path / "whole")
    run_script("train.py", *whole, cwd=tmp_path, processes=processes, env=env)
    killed = tmp_path / "killed"
    args = run_args(killed)
    chance = random.Random(f"{data} {layout}")
    snapshots = killed / "snapshots"
    kills = []
    with open(tmp_path / "killed.log", "w") as log:
        # Killed during start-up, at random moments after a snapshot, and in the middle of a save.
        moments = ["start-up", "after a snapshot", "during a save", "after a snapshot"]
        moments += ["during a save"]
        for moment in moments:
            process = launch(args, tmp_path, processes, log, env)
            ready = moment_reached(moment, killed, chance)
            if kill_when(process, ready):
                kills.append((moment, newest_step(killed)))
    result = run_script("train.py", *args, cwd=tmp_path, processes=processes, env=env)
    assert len(kills) >= 4, kills
    assert "resumed from" in result.stdout + result.stderr
    assert_same_run(killed, tmp_path / "whole")
    assert not list(snapshots.glob(".tmp-*")) and len(list(snapshots.iterdir())) == 2
    if data == "mixture":  # the compared events hold each source's tokens and val loss
        names = [d.name for d in mixture_dirs]
        assert all(f"tokens/{n}" in logged_numbers(killed)[-2] for n in names)
        assert all(f"val_loss/{n}" in logged_numbers(killed)[-1] for n in names)


@pytest.fixture(scope="module")
def finished_run(adder_dir, tmp_path_factory):
    """A short run that ended normally, and the arguments that made it."""
    work = tmp_path_factory.mktemp("finished")
    args = short_run_args(adder_dir, work / "run", "--max_steps=10")
    run_script("train.py", *args, cwd=work, env=ONE_THREAD)
    return work / "run", args


def tree(directory: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in sorted(directory.rglob("*"))}


def test_a_resume_that_changes_the_run_is_refused_and_changes_nothing(finished_run, tmp_path):
    run_dir, args = finished_run
    before = tree(run_dir)
    result = run_script(
        "train.py",
        *args,
        "--model.n_embd=32",
        "--seed=7",
        cwd=tmp_path,
        env=ONE_THREAD,
        check=False,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "cannot resume" in lines[0]
    assert "model.n_embd 64 -> 32" in lines[0] and "seed 1337 -> 7" in lines[0]
    never = run_script(
        "train.py", *args, "--resume=never", cwd=tmp_path, env=ONE_THREAD, check=False
    )
    assert never.returncode == 2 and "already holds a run" in never.stderr
    assert tree(run_dir) == before


def test_a_harmless_change_is_logged_and_the_run_goes_on(finished_run, tmp_path):
    run_dir, args = finished_run
    copy = tmp_path / "run"
    subprocess.run(["cp", "-a", str(run_dir), str(copy)], check=True)
    more = [a for a in args if not a.startswith("--out_dir")] + [f"--out_dir={copy}"]
    run_script(
        "train.py", *more, "--max_steps=15", "--log_interval=5", cwd=tmp_path, env=ONE_THREAD
    )
    messages = [e["message"] for e in read_metrics(copy) if "message" in e]
    assert any("config changes:" in m and "max_steps 10 -> 15" in m for m in messages), messages
    steps = [e["step"] for e in read_metrics(copy) if "train_loss" in e]
    assert steps == list(range(1, 11)) + [15]


def test_a_corrupt_snapshot_is_skipped_for_the_older_one(finished_run, tmp_path):
    run_dir, args = finished_run
    copy = tmp_path / "run"
    subprocess.run(["cp", "-a", str(run_dir), str(copy)], check=True)
    newest = copy / "snapshots" / "step-00000010"
    with open(newest / "model.safetensors", "r+b") as file:
        file.seek(-8, os.SEEK_END)
        file.write(b"\xff" * 8)  # a torn write
    args = [a for a in args if not a.startswith("--out_dir")] + [f"--out_dir={copy}"]
    result = run_script("train.py", *args, cwd=tmp_path, env=ONE_THREAD)
    assert f"warning: skipping snapshot {newest}" in result.stderr
    assert "resumed from" in result.stdout and "step-00000005 at step 5" in result.stdout
    assert logged_numbers(copy) == logged_numbers(run_dir)  # steps 6-10 redone, same numbers
    assert_same_weights(final_weights(copy), final_weights(run_dir))


def test_a_run_without_a_valid_snapshot_is_never_overwritten(finished_run, tmp_path):
    run_dir, args = finished_run
    copy = tmp_path / "run"
    subprocess.run(["cp", "-a", str(run_dir), str(copy)], check=True)
    for snapshot in (copy / "snapshots").iterdir():
        (snapshot / "state.json").unlink()  # every snapshot unusable
    before = tree(copy)
    args = [a for a in args if not a.startswith("--out_dir")] + [f"--out_dir={copy}"]
    result = run_script("train.py", *args, cwd=tmp_path, env=ONE_THREAD, check=False)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()  # one line, naming the newest snapshot's problem
    assert "holds a run but no valid snapshot to resume from (newest, step-00000010" in line
    assert tree(copy) == before


class CreatesAFile:
    """A pickle that would create a file when unpickled, if it ever were."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_planted_malicious_pickle_is_refused(finished_run, tmp_path):
    run_dir, args = finished_run
    copy = tmp_path / "run"
    subprocess.run(["cp", "-a", str(run_dir), str(copy)], check=True)
    marker = tmp_path / "pwned"
    proof = tmp_path / "proof.pkl"  # the planted file does what it says when unpickled unsafely
    torch.save({"random_state": CreatesAFile(tmp_path / "unsafe")}, proof)
    torch.load(proof, weights_only=False)
    assert (tmp_path / "unsafe").exists()
    newest = copy / "snapshots" / "step-00000010"
    torch.save({"random_state": CreatesAFile(marker)}, newest / "random_states_0.pkl")
    manifest = json.loads((newest / MANIFEST_FILE).read_text())  # even with a matching manifest
    manifest["files"]["random_states_0.pkl"] = sha256_of(newest / "random_states_0.pkl")
    (newest / MANIFEST_FILE).write_text(json.dumps(manifest))
    args = [a for a in args if not a.startswith("--out_dir")] + [f"--out_dir={copy}"]
    named = run_script(
        "train.py", *args, f"--resume={newest}", cwd=tmp_path, env=ONE_THREAD, check=False
    )
    assert named.returncode == 2 and not marker.exists()
    assert f"refusing to unpickle {newest / 'random_states_0.pkl'}" in named.stderr
    assert "Unsupported global: GLOBAL io.open" in named.stderr
    auto = run_script("train.py", *args, cwd=tmp_path, env=ONE_THREAD)
    assert "refusing to unpickle" in auto.stderr and "step-00000005 at step 5" in auto.stdout
    assert not marker.exists()


FULL_DISK = """
import errno, sys
import accelerate.checkpointing as checkpointing
saves = []
real_save = checkpointing.save

def save(obj, f, *args, **kwargs):  # the disk fills up during the optimizer file of the 3rd snapshot
    saves.append(f)
    if len(saves) == 5:
        open(f, "wb").write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(obj, f, *args, **kwargs)

checkpointing.save = save
import train
from gptlab.errors import run_cli
sys.argv = ["train.py", *sys.argv[1:]]
run_cli(train.main)
"""


def test_a_full_disk_during_a_save_ends_the_run_clearly_and_keeps_the_last_snapshot(
    finished_run, adder_dir, tmp_path
):
    _, args = finished_run
    wrapper = tmp_path / "full_disk.py"
    wrapper.write_text(FULL_DISK)
    run_dir = tmp_path / "run"
    args = [a for a in args if not a.startswith("--out_dir")] + [f"--out_dir={run_dir}"]
    # Accelerate writes the weights and the optimizer state of a snapshot through `save`:
    # step 0 and step 5 succeed, step 10 fails.
    result = run_script(str(wrapper), *args, cwd=tmp_path, env=ONE_THREAD, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert lines[-1].startswith("error: could not write a snapshot")
    assert "No space left on device" in lines[-1] and "step-00000005" in lines[-1]
    snapshots = sorted(p.name for p in (run_dir / "snapshots").iterdir())
    assert snapshots == ["step-00000000", "step-00000005"]  # no half-written one left
    again = run_script("train.py", *args, cwd=tmp_path, env=ONE_THREAD)
    assert "step-00000005 at step 5" in again.stdout
    assert logged_numbers(run_dir) == logged_numbers(finished_run[0])


def test_fine_tuning_starts_from_the_checkpoint_with_a_fresh_run(finished_run, tmp_path):
    run_dir, args = finished_run
    tuned = tmp_path / "tuned"
    args = [a for a in args if not a.startswith("--out_dir")] + [f"--out_dir={tuned}"]
    run_script(
        "train.py", *args, f"--init_from={run_dir}", "--max_steps=5", cwd=tmp_path, env=ONE_THREAD
    )
    start = load_file(tuned / "snapshots" / "step-00000000" / "model.safetensors")
    best = load_checkpoint(run_dir).model.state_dict()
    assert_same_weights(start, {k: v for k, v in best.items() if k in start})
    assert [e["step"] for e in read_metrics(tuned) if "train_loss" in e] == [1, 2, 3, 4, 5]
    assert (run_dir / "best").resolve() != (tuned / "best").resolve()
