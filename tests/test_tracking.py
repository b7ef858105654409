"""Trackers: what wandb (offline) and TensorBoard receive from a tiny run, read back from their files."""

import json
import struct
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from conftest import REPO, TINY_MODEL, read_metrics, run_script

pytestmark = pytest.mark.slow

TRAIN_KEYS = {
    "step",
    "tokens",
    "train_loss",
    "lr",
    "weight_decay",
    "grad_accum",
    "batch_tokens",
    "grad_norm",
    "epochs",
    "tokens_per_sec",
    "step_time",
}


def tiny_run_args(adder_dir, out_dir, *extra: str) -> list[str]:
    return [
        "--config",
        str(REPO / "configs/adder.json"),
        *TINY_MODEL,
        f"--data.dir={adder_dir}",
        "--data.eval_samples=200",
        "--data.exact_match_samples=50",
        f"--out_dir={out_dir}",
        "--max_steps=12",
        "--macro_batch_steps=6",
        "--log_interval=2",
        "--keep_best=1",
        *extra,
    ]


def wandb_records(path: Path):
    """The records of a .wandb file (LevelDB log format of protobuf records).

    wandb 0.31 no longer ships a Python reader for its transaction log, so this is the format's
    few lines: a 7-byte file header, then 32 KiB blocks of chunks with 7-byte headers
    (checksum, length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    position, pending = 7, b""
    while position + 7 <= len(data):
        room = 32768 - position % 32768
        if room < 7:  # a block's tail too short for a header is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:
            break
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_wandb_run(path: Path) -> dict:
    """Run id, name, tags, config and history ({step: {key: value}}) of an offline run file."""
    run = {"history": {}, "config": {}}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(id=record.run.run_id, name=record.run.display_name)
            run.update(tags=list(record.run.tags), project=record.run.project)
        elif kind == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            run["history"].setdefault(record.history.step.num, {}).update(row)
    return run


def tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def tracked_run(adder_dir, tmp_path_factory):
    """A tiny 1-process run with both trackers, wandb offline."""
    work = tmp_path_factory.mktemp("tracked")
    result = run_script(
        "train.py",
        *tiny_run_args(adder_dir, work / "out", "--batch_size=32"),
        "--tracking.trackers=wandb,tensorboard",
        "--tracking.run_name=tiny adder",
        "--tracking.tags=test,tiny",
        cwd=work,
        env={"WANDB_MODE": "offline", "WANDB_DIR": str(work / "wandb_dir")},
    )
    return work, result


def test_metrics_jsonl_has_every_training_figure(tracked_run):
    work, result = tracked_run
    train = [e for e in read_metrics(work / "out") if "train_loss" in e]
    assert [e["step"] for e in train] == [2, 4, 6, 8, 10, 12]
    for event in train:
        assert set(event) == TRAIN_KEYS  # no mfu on a CPU
        # tokens/s times seconds per step is the tokens of one step
        assert event["tokens_per_sec"] * event["step_time"] == pytest.approx(event["batch_tokens"])
    assert "no MFU on cpu" in [e.get("message") for e in read_metrics(work / "out")]
    assert "tok/s" not in result.stderr  # the progress bar stays quiet off a terminal


def test_tensorboard_gets_what_metrics_jsonl_has(tracked_run):
    work, _ = tracked_run
    events = read_metrics(work / "out")
    scalars = tensorboard_scalars(work / "out/tensorboard/gptlab")
    for key in [*(TRAIN_KEYS - {"step"}), "val_loss", "val_exact_match"]:
        logged = {e["step"]: e[key] for e in events if key in e}
        assert scalars[key] == pytest.approx(logged, rel=1e-6), key
    assert sorted(scalars["val_loss"]) == [6, 12]
    (hparams,) = (work / "out/tensorboard/gptlab").glob("*/hparams.yml")
    config = yaml.safe_load(hparams.read_text())
    assert config["model.n_embd"] == 64 and config["batch_size"] == 32
    assert config["tracking.trackers"] == '["wandb", "tensorboard"]'


def test_wandb_offline_run_gets_the_figures_config_name_and_tags(tracked_run):
    work, _ = tracked_run
    run_id = json.loads((work / "out/trackers.json").read_text())["wandb_run_id"]
    (run_file,) = (work / "wandb_dir/wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    run = read_wandb_run(run_file)
    assert run["id"] == run_id and run["name"] == "tiny adder" and run["tags"] == ["test", "tiny"]
    assert run["project"] == "gptlab"
    assert run["config"]["model.n_embd"] == 64 and run["config"]["max_steps"] == 12
    for event in read_metrics(work / "out"):
        logged = {k: v for k, v in event.items() if k not in ("step", "message")}
        if logged:
            row = run["history"][event["step"]]
            assert {k: row[k] for k in logged} == pytest.approx(logged, rel=1e-9)
    assert not (work / "wandb").exists()  # WANDB_DIR is respected


RESTART_SCRIPT = """
import sys
from accelerate import Accelerator
from gptlab import tracking
from gptlab.config import load_config

config, _, _ = load_config(sys.argv[1:])
accelerator = Accelerator(**tracking.accelerator_options(config))
tracking.start_trackers(accelerator, config)
accelerator.log({"probe": 0.5}, step=config.seed)  # a later start logs later steps
accelerator.end_training()
"""


def test_a_second_start_in_the_run_directory_continues_the_wandb_run(tmp_path):
    """What a resume does: start the trackers again with the same out_dir."""
    script = tmp_path / "start.py"
    script.write_text(RESTART_SCRIPT)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    for step in (1, 2):
        args = ["--max_steps=2", f"--out_dir={out_dir}", "--tracking.trackers=wandb"]
        run_script(str(script), *args, f"--seed={step}", cwd=tmp_path, env=env)
    run_id = json.loads((out_dir / "trackers.json").read_text())["wandb_run_id"]
    run_files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 2
    runs = [read_wandb_run(path) for path in run_files]
    assert [run["id"] for run in runs] == [run_id, run_id]
    assert [sorted(run["history"]) for run in runs] == [[1], [2]]
    assert runs[1]["config"]["seed"] == 2  # the second start's config wins


def test_two_processes_log_the_mean_over_processes(adder_dir, tracked_run, tmp_path):
    """Same global batch as tracked_run (2 x 16 = 32): the logged losses must be the same."""
    run_script(
        "train.py",
        *tiny_run_args(adder_dir, tmp_path / "two", "--batch_size=16"),
        "--tracking.trackers=tensorboard",
        cwd=tmp_path,
        processes=2,
    )
    one = tensorboard_scalars(tracked_run[0] / "out/tensorboard/gptlab")
    two = tensorboard_scalars(tmp_path / "two/tensorboard/gptlab")
    assert len(one["train_loss"]) == 6
    for key in ("train_loss", "val_loss", "grad_norm", "val_exact_match"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key
    assert two["tokens"] == one["tokens"]
    # Only the main process writes: one event file, no wandb id without wandb.
    assert len(list((tmp_path / "two/tensorboard/gptlab").glob("events.out.tfevents.*"))) == 1
    assert not (tmp_path / "two/trackers.json").exists()


def test_a_resumed_training_continues_the_same_wandb_run(adder_dir, tmp_path):
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    out_dir = tmp_path / "out"
    for steps in (6, 12):  # the second command resumes at step 6 and trains on to 12
        run_script(
            "train.py",
            *tiny_run_args(adder_dir, out_dir, f"--max_steps={steps}"),
            "--tracking.trackers=wandb",
            cwd=tmp_path,
            env=env,
        )
    assert any("resumed from" in e.get("message", "") for e in read_metrics(out_dir))
    run_id = json.loads((out_dir / "trackers.json").read_text())["wandb_run_id"]
    runs = [
        read_wandb_run(p) for p in sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    ]
    assert [run["id"] for run in runs] == [run_id, run_id]
    trained = [
        sorted(s for s, row in run["history"].items() if "train_loss" in row) for run in runs
    ]
    assert trained == [[2, 4, 6], [8, 10, 12]]
