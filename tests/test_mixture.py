"""Weighted mixtures of data sets: the blended order (shares, determinism, disjoint processes,
resume), per-source scores in a run, and the mistakes a mixture refuses."""

import json
import math
import re

import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TINY_MODEL, mixture_option, read_metrics, run_script
from gptlab.data import EpochSampler
from gptlab.mixture import BlendedOrder, MixtureSampler


def test_each_source_gets_its_share_at_every_position():
    for weights in ([0.8, 0.2], [3, 1, 1], [0.7, 0.2, 0.1, 0.001]):
        order = BlendedOrder(weights)
        sources, _ = order.sources(0, 20_000)
        shares = np.asarray(weights) / sum(weights)
        for n in range(1, 20_000, 97):
            counts = np.bincount(sources[:n], minlength=len(weights))
            assert np.abs(counts - shares * n).max() < 1  # never a whole sample behind
            assert order.taken(n) == counts.tolist()
        counts = np.bincount(sources, minlength=len(weights))
        assert np.allclose(counts / 20_000, shares, atol=0.01 * shares.max())


def test_the_order_is_a_pure_function_of_the_position():
    order = BlendedOrder([0.8, 0.2])
    sources, numbers = order.sources(0, 5000)
    # Within a source its samples come in order 0, 1, 2, ...: each source's own sampler reads on.
    for k in (0, 1):
        assert numbers[sources == k].tolist() == list(range(int((sources == k).sum())))
    for start in (0, 1, 7, 1234, 4900):  # a resumed run picks up exactly where it stopped
        again = BlendedOrder([0.8, 0.2]).sources(start, 100)
        assert again[0].tolist() == sources[start : start + 100].tolist()
        assert again[1].tolist() == numbers[start : start + 100].tolist()


def test_processes_get_disjoint_shares_and_a_small_source_repeats_freshly():
    sampler = MixtureSampler([100, 1000], [0.8, 0.2], seed=3)
    world, batch = 4, 8
    shares = [sampler.positions(64 + rank * batch, batch)[1] for rank in range(world)]
    assert len({int(i) for share in shares for i in share}) == world * batch
    assert np.concatenate(shares).tolist() == sampler.positions(64, world * batch)[1].tolist()
    sampler = MixtureSampler([10, 1000], [0.5, 0.5], seed=3)
    # The 10-sample source: every epoch all 10 once, in a new order, the other source unaffected.
    epochs, indices = sampler.positions(0, 60)
    small = indices < 10
    rounds = indices[small].reshape(3, 10)
    assert all(sorted(r.tolist()) == list(range(10)) for r in rounds)
    assert epochs[small].tolist() == [0] * 10 + [1] * 10 + [2] * 10
    assert rounds[0].tolist() != rounds[1].tolist()
    big_epochs, big = EpochSampler(1000, seed=3 + 1).positions(0, 30)
    assert (indices[~small] - 10).tolist() == big.tolist()


def mixture_args(first, second, out_dir, *extra) -> list[str]:
    return [
        *TINY_MODEL,
        mixture_option(first, second),
        f"--out_dir={out_dir}",
        "--data.eval_samples=32",
        "--batch_size=16",
        "--max_steps=40",
        "--macro_batch_steps=20",
        "--log_interval=10",
        *extra,
    ]


@pytest.mark.slow
def test_a_mixture_run_takes_its_shares_and_scores_each_source(mixture_dirs, tmp_path):
    first, second = mixture_dirs
    names = (first.name, second.name)
    run_script("train.py", *mixture_args(first, second, tmp_path / "run"), cwd=tmp_path)
    events = read_metrics(tmp_path / "run")
    last = [e for e in events if "train_loss" in e][-1]
    tokens = last[f"tokens/{names[0]}"] + last[f"tokens/{names[1]}"]
    assert tokens == last["tokens"]
    assert last[f"tokens/{names[0]}"] / tokens == pytest.approx(0.8, abs=0.01)
    for event in [e for e in events if "val_loss" in e]:
        losses = [event[f"val_loss/{name}"] for name in names]
        assert event["val_loss"] == pytest.approx(0.8 * losses[0] + 0.2 * losses[1])
        bpbs = [event[f"val_bpb/{name}"] for name in names]
        assert event["val_bpb"] == pytest.approx(0.8 * bpbs[0] + 0.2 * bpbs[1])
        # ASCII characters: a byte a token (and one end-of-text): bits = nats / ln 2
        assert bpbs[0] == pytest.approx(losses[0] / math.log(2), rel=1e-4)
    # evaluate.py scores one source, with bits per byte; it must be told which.
    refused = run_script(
        "evaluate.py", "--task", "loss", "--checkpoint", "run", cwd=tmp_path, check=False
    )
    assert (
        refused.returncode == 2 and "mixture of" in refused.stderr and str(first) in refused.stderr
    )
    run_script(
        "evaluate.py",
        *("--task", "loss", "--checkpoint", "run", "--split", "val", "--data_dir", str(second)),
        *("--max_samples", "64", "--output", "scores.json"),
        cwd=tmp_path,
    )
    scores = json.loads((tmp_path / "scores.json").read_text())
    # The checkpoint is a transformers model whose tokenizer has an end-of-text token.
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "best")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "best")
    assert tokenizer.eos_token == "<|endoftext|>"
    assert model.config.eos_token_id == tokenizer.eos_token_id == 65
    assert scores["bits_per_byte"] == pytest.approx(scores["loss"] / math.log(2), rel=1e-4)
    assert scores["samples"] == 64


@pytest.mark.slow
def test_bad_mixtures_are_refused_with_one_line(mixture_dirs, tmp_path):
    from conftest import SHARED_DATA
    from gptlab.tasks.text import prepare_text

    first, second = mixture_dirs
    other = prepare_text(
        str(SHARED_DATA / "tinystories" / "tinystories_sample.txt"), "char", tmp_path / "other"
    )
    cases = [
        (mixture_option(first, other), "have different tokenizers"),
        (mixture_option(first, tmp_path / "missing"), "is not a prepared data set"),
        (mixture_option(first, second, (0.8, 0)), "data.mixture[1].weight is 0"),
        (mixture_option(first, second, (0.8, -1)), "give a positive share"),
        ('--data.mixture=[{"dri": "x", "weight": 1}]', "did you mean 'data.mixture[0].dir'"),
    ]
    for option, message in cases:
        args = [a for a in mixture_args(first, second, tmp_path / "run") if "mixture" not in a]
        result = run_script("train.py", *args, option, cwd=tmp_path, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
        assert not (tmp_path / "run").exists()


def test_the_mixture_config_is_checked_before_anything_runs():
    from gptlab.config import load_config
    from gptlab.errors import UserError

    sources = '[{"dir": "data/a", "weight": 0.8}, {"dir": "data/b", "weight": 0.2, "name": "b2"}]'
    config, _, _ = load_config(["--max_steps=1", f"--data.mixture={sources}"])
    assert [(s.dir, s.weight, s.label) for s in config.data.mixture] == [
        ("data/a", 0.8, "a"),
        ("data/b", 0.2, "b2"),
    ]
    bad = [
        ('[{"dir": "data/a", "weight": "high"}]', "'data.mixture[0].weight' must be float"),
        ('[{"weight": 1}]', "data.mixture[0] needs a dir"),
        ('[{"dir": "x/a", "weight": 1}, {"dir": "y/a", "weight": 1}]', "names 'a' twice"),
        ('[{"dir": "data/a", "weight": Infinity}]', "must be a finite number"),
        ('[{"dir": "data/a", "weight": 0}]', "give a positive share"),
        ('{"dir": "data/a"}', "must be an object of keys"),
    ]
    for value, message in bad:
        with pytest.raises(UserError, match=re.escape(message)):
            load_config(["--max_steps=1", f"--data.mixture={value}"])
    with pytest.raises(UserError, match="data.mixture replaces data.name and data.dir"):
        load_config(["--max_steps=1", "--data.dir=data/x", f"--data.mixture={sources}"])
