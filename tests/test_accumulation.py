"""Gradient accumulation: every micro-batch's gradient counts once, weighted by its real tokens."""

import copy

import pytest
import torch
from accelerate import Accelerator
from torch.nn import functional as F

from conftest import REPO, TINY_MODEL, read_metrics, run_script
from gptlab.config import Config
from gptlab.data import IGNORE_INDEX, EpochSampler, open_split, read_meta
from gptlab.scheduler import RunSchedules, ScheduleConfig
from gptlab.training import fetch_micro_batches, train_step
from models import ModelConfig, build_model


class GradientRecorder:
    """Stands in for the optimizer: keeps the gradients train_step would apply."""

    def __init__(self, model):
        self.model = model
        self.gradients = None

    def step(self):
        self.gradients = [p.grad.clone() for p in self.model.parameters()]

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def one_big_batch_gradients(model, inputs, targets):
    """The reference: one batch holding every example, mean loss over its real tokens."""
    model.zero_grad()
    logits = model(inputs)
    loss = F.cross_entropy(
        logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def tiny_model(vocab_size: int, block_size: int = 16):
    torch.manual_seed(0)
    return build_model(
        ModelConfig(vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=block_size)
    )


def test_micro_batches_with_different_real_token_counts_weigh_each_token_equally():
    model = tiny_model(vocab_size=20)
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    micro_batches = []
    for keep in (0.9, 0.2, 0.5):  # very different numbers of real target tokens
        inputs = torch.randint(0, 20, (3, 12), generator=generator)
        targets = torch.randint(0, 20, (3, 12), generator=generator)
        mask = torch.rand(3, 12, generator=generator) < keep
        micro_batches.append((inputs, targets.masked_fill(~mask, IGNORE_INDEX)))
    recorder = GradientRecorder(model)
    _, real_tokens, _ = train_step(model, recorder, Accelerator(cpu=True), micro_batches, 0.0)
    expected = one_big_batch_gradients(
        reference,
        torch.cat([x for x, _ in micro_batches]),
        torch.cat([y for _, y in micro_batches]),
    )
    assert real_tokens == sum(int((y != IGNORE_INDEX).sum()) for _, y in micro_batches)
    for got, want in zip(recorder.gradients, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_growing_accumulation_equals_one_big_batch_step_by_step(adder_dir):
    meta = read_meta(adder_dir)
    split = open_split(adder_dir, meta, "train", 16, seed=0)
    config = Config(batch_size=5)
    accelerator = Accelerator(cpu=True)
    schedules = RunSchedules(
        lr=ScheduleConfig(peak=1e-3),
        weight_decay=ScheduleConfig(peak=0.0),
        grad_accum=ScheduleConfig(begin=1, peak=4, warmup=1.0, decay=0.0),
        total_tokens=5 * 8 * 10,
    )
    sampler = EpochSampler(split.num_samples, seed=0)
    model = tiny_model(vocab_size=meta["vocab_size"])
    reference = copy.deepcopy(model)
    recorder = GradientRecorder(model)
    position = tokens = 0
    accumulation_steps, used_rows = [], []
    while tokens < schedules.total_tokens:
        accum = schedules.at(tokens).grad_accum
        micro_batches = fetch_micro_batches(
            sampler, split, position, accum, config.batch_size, accelerator
        )
        train_step(model, recorder, accelerator, micro_batches, 0.0)
        epochs, indices = sampler.positions(position, accum * config.batch_size)
        big_inputs, big_targets = split.fetch(indices, epochs)
        expected = one_big_batch_gradients(reference, big_inputs, big_targets)
        for got, want in zip(recorder.gradients, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        used_rows += [row for x, _ in micro_batches for row in x.tolist()]
        accumulation_steps.append(accum)
        position += accum * config.batch_size
        tokens += sum(x.numel() for x, _ in micro_batches)
    assert accumulation_steps[0] == 1 and accumulation_steps[-1] == 4
    assert accumulation_steps == sorted(accumulation_steps)
    # The micro-batches used are exactly the sampler's first `position` samples, each once.
    _, indices = sampler.positions(0, position)
    assert used_rows == split.fetch(indices)[0].tolist()
    assert tokens == position * 8  # 2-digit sums: 8 input tokens per example


def test_a_run_with_a_growing_batch_counts_every_token(adder_dir, tmp_path):
    run_script(
        "train.py",
        "--config",
        str(REPO / "configs/adder.json"),
        *TINY_MODEL,
        f"--data.dir={adder_dir}",
        f"--out_dir={tmp_path / 'run'}",
        "--batch_size=8",
        "--max_tokens=20000",
        "--max_steps=0",
        "--grad_accum.begin=1",
        "--grad_accum.peak=6",
        "--grad_accum.warmup=0.5",
        "--grad_accum.style=constant",
        "--lr.begin=0.0005",
        "--macro_batch_steps=7",
        "--log_interval=1",
        "--data.exact_match_samples=0",
        cwd=tmp_path,
    )
    steps = [e for e in read_metrics(tmp_path / "run") if "train_loss" in e]
    assert steps[0]["lr"] == 0.0005 and steps[0]["grad_accum"] == 1
    assert steps[-1]["grad_accum"] == 6
    accumulation = [e["grad_accum"] for e in steps]
    assert accumulation == sorted(accumulation)
    tokens = 0
    for event in steps:
        assert event["batch_tokens"] == event["grad_accum"] * 8 * 8  # 2-digit sums: 8 input tokens
        tokens += event["batch_tokens"]
        assert event["tokens"] == tokens
    assert tokens >= 20000 > tokens - steps[-1]["batch_tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_early_stopping_stops_at_the_evaluation_the_rule_says(adder_dir, tmp_path, processes):
    run_script(
        "train.py",
        "--config",
        str(REPO / "configs/adder.json"),
        *TINY_MODEL,
        f"--data.dir={adder_dir}",
        f"--out_dir={tmp_path / 'run'}",
        "--batch_size=16",
        "--max_steps=100",
        "--macro_batch_steps=5",
        "--data.exact_match_samples=0",
        "--data.eval_samples=64",
        # No evaluation can beat the first by 10 nats: the 3rd evaluation is the 2nd without one.
        "--early_stop.patience=2",
        "--early_stop.min_delta=10",
        cwd=tmp_path,
        processes=processes,
    )
    events = read_metrics(tmp_path / "run")
    assert [e["step"] for e in events if "val_loss" in e] == [5, 10, 15]
    messages = [e["message"] for e in events if "message" in e]
    assert any(m.startswith("early stop: val loss has not improved") for m in messages)
    assert messages[-1].startswith("done: 15 steps")
    assert (tmp_path / "run/best/model.safetensors").is_file()
