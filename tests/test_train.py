"""End-to-end: train.py, generate.py and evaluate.py run as a user runs them."""

import json

import pytest

from conftest import REPO, TINY_MODEL, read_metrics, run_script

pytestmark = pytest.mark.slow


def tiny_adder_args(adder_dir, out_dir, *extra: str) -> list[str]:
    return [
        "--config",
        str(REPO / "configs/adder.json"),
        *TINY_MODEL,
        f"--data.dir={adder_dir}",
        "--data.eval_samples=500",
        "--data.exact_match_samples=200",
        f"--out_dir={out_dir}",
        "--batch_size=64",
        "--lr.peak=0.003",
        "--lr.begin=0.001",
        "--max_steps=400",
        "--macro_batch_steps=100",
        "--log_interval=20",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained_adder(adder_dir, tmp_path_factory):
    """One tiny adder run shared by the tests that use a trained model."""
    work = tmp_path_factory.mktemp("adder_run")
    run_script("train.py", *tiny_adder_args(adder_dir, work / "out"), cwd=work)
    return work / "out"


def test_loss_falls_and_every_macro_batch_is_evaluated_and_logged(trained_adder):
    events = read_metrics(trained_adder)
    evals = [e for e in events if "val_loss" in e]
    assert [e["step"] for e in evals] == [100, 200, 300, 400]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.2
    train = [e for e in events if "train_loss" in e]
    assert train[-1]["train_loss"] < 0.7 * train[0]["train_loss"]
    for key in ("step", "tokens", "train_loss", "lr", "tokens_per_sec", "grad_norm"):
        assert key in train[0]
    assert all(0.0 <= e["val_exact_match"] <= 1.0 for e in evals)
    config = json.loads((trained_adder / "config.json").read_text())
    assert config["max_steps"] == 400 and config["model"]["vocab_size"] == 13 + 1  # and end-of-text


def test_best_checkpoints_are_kept_and_linked(trained_adder):
    kept = sorted(p.name for p in (trained_adder / "checkpoints").iterdir())
    assert len(kept) == 3
    best = (trained_adder / "best").resolve()
    assert (best / "model.safetensors").is_file() and (best / "tokenizer.json").is_file()
    losses = [
        json.loads((trained_adder / "checkpoints" / k / "config.json").read_text())["val_loss"]
        for k in kept
    ]
    assert json.loads((best / "config.json").read_text())["val_loss"] == min(losses)


def test_evaluate_scores_the_whole_test_split(trained_adder, tmp_path):
    output = tmp_path / "result.json"
    result = run_script(
        "evaluate.py",
        "--task",
        "adder",
        "--checkpoint",
        str(trained_adder),
        "--split",
        "test",
        "--output",
        str(output),
        cwd=tmp_path,
    )
    metrics = json.loads(output.read_text())
    assert metrics["total"] == 500 and 0.0 <= metrics["exact_match"] <= 1.0
    assert f"{metrics['correct']:,} of 500" in result.stdout
    shared = run_script(
        "evaluate.py",
        "--task",
        "adder",
        "--checkpoint",
        str(trained_adder),
        "--split",
        "test",
        "--output",
        str(tmp_path / "two.json"),
        cwd=tmp_path,
        processes=2,
    )
    assert json.loads((tmp_path / "two.json").read_text()) == metrics  # same answer, split in two
    assert shared.stdout.count("exact match") == 1  # printed by the main process only
    loss = run_script(
        "evaluate.py",
        "--task",
        "loss",
        "--checkpoint",
        str(trained_adder),
        "--split",
        "val",
        cwd=tmp_path,
    )
    assert "perplexity" in loss.stdout


def test_greedy_generation_is_deterministic_and_answers_in_digits(trained_adder, tmp_path):
    args = ["--checkpoint", str(trained_adder), "--prompt", "12+34=", "--max_new_tokens", "3"]
    first = run_script("generate.py", *args, "--temperature", "0", cwd=tmp_path).stdout
    again = run_script(
        "generate.py", *args, "--temperature", "0", "--no_cache", cwd=tmp_path
    ).stdout
    assert first == again and first.startswith("12+34=") and len(first.strip()) == 9
    sampled = run_script("generate.py", *args, "--num_samples", "3", "--seed", "1", cwd=tmp_path)
    assert sampled.stdout.count("--- sample") == 3


def test_two_processes_give_the_loss_curve_of_one_at_the_same_global_batch(adder_dir, tmp_path):
    common = [
        "--max_steps=12",
        "--macro_batch_steps=6",
        "--log_interval=1",
        "--data.exact_match_samples=0",
        "--keep_best=1",
    ]
    run_script(
        "train.py",
        *tiny_adder_args(adder_dir, tmp_path / "one", *common, "--batch_size=32"),
        cwd=tmp_path,
    )
    run_script(
        "train.py",
        *tiny_adder_args(
            adder_dir, tmp_path / "accum", *common, "--batch_size=16", "--grad_accum.peak=2"
        ),
        cwd=tmp_path,
    )
    run_script(
        "train.py",
        *tiny_adder_args(adder_dir, tmp_path / "two", *common, "--batch_size=16"),
        cwd=tmp_path,
        processes=2,
    )

    def curve(name, key):
        return [e[key] for e in read_metrics(tmp_path / name) if key in e]

    assert "2 process(es)" in curve("two", "message")[0]
    one = curve("one", "train_loss")
    assert len(one) == 12 and one[-1] < one[0]
    for other in ("accum", "two"):
        assert curve(other, "train_loss") == pytest.approx(one, rel=1e-4)
        assert curve(other, "val_loss") == pytest.approx(curve("one", "val_loss"), rel=1e-4)
        assert curve(other, "tokens") == curve("one", "tokens")


@pytest.mark.parametrize(
    "script, args, message",
    [
        (
            "train.py",
            ["--data.name=nope", "--max_steps=10"],
            "no prepared data set in data/nope; run `python prepare_data.py nope`",
        ),
        ("train.py", ["--config", "missing.json"], "config file missing.json not found"),
        ("train.py", ["--batch_size=big"], "--batch_size=big: expected int"),
        (
            "train.py",
            ["--max_steps=10", "--grad_accum.peak=0"],
            "grad_accum.peak is 0.0; it must be at least 1",
        ),
        ("evaluate.py", ["--task", "adder", "--checkpoint", "."], "is not a checkpoint"),
        ("generate.py", ["--checkpoint", "nowhere"], "checkpoint nowhere does not exist"),
    ],
)
def test_bad_input_gets_one_line_exit_2_and_writes_nothing(tmp_path, script, args, message):
    result = run_script(script, *args, cwd=tmp_path, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_input_against_a_trained_model(trained_adder, tmp_path):
    cases = [
        (
            "generate.py",
            ["--checkpoint", str(trained_adder), "--prompt", "1+x="],
            "outside the vocabulary: 'x'",
        ),
        (
            "evaluate.py",
            ["--checkpoint", str(trained_adder), "--task", "division"],
            "unknown task 'division'",
        ),
        (
            "evaluate.py",
            ["--checkpoint", str(trained_adder), "--task", "multiplier"],
            "holds adder, not multiplier",
        ),
    ]
    for script, args, message in cases:
        result = run_script(script, *args, cwd=tmp_path, check=False)
        assert result.returncode == 2 and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    before = sorted(p.name for p in trained_adder.rglob("*"))
    again = run_script(
        "train.py",
        *tiny_adder_args("unused", trained_adder, "--resume=never"),
        cwd=tmp_path,
        check=False,
    )
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert sorted(p.name for p in trained_adder.rglob("*")) == before


def test_train_prepares_the_builtin_adder_when_missing(tmp_path):
    run_script(
        "train.py",
        "--config",
        str(REPO / "configs/adder.json"),
        *TINY_MODEL,
        "--max_steps=2",
        "--macro_batch_steps=2",
        "--data.exact_match_samples=10",
        "--data.eval_samples=10",
        cwd=tmp_path,
    )
    meta = json.loads((tmp_path / "data/adder/meta.json").read_text())
    assert meta["task"] == {"name": "adder", "digits": 3}
    assert (tmp_path / "out/adder/best/model.safetensors").is_file()
