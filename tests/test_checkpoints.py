"""Checkpoint rotation, compile on/off interchange, and never saving a non-finite model (in-process)."""

import math
import os

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from gptlab import checkpoints
from gptlab.config import Config
from gptlab.errors import UserError
from gptlab.scheduler import EarlyStopConfig, EarlyStopping
from gptlab.snapshots import Snapshots, snapshot_dirs, verify_snapshot
from gptlab.tokenizer import Tokenizer
from gptlab.training import Progress, train_step
from models import ModelConfig, build_model

TINY = ModelConfig(vocab_size=13, n_layer=1, n_head=2, n_embd=16, block_size=8, dropout=0.0)


@pytest.fixture(scope="module")
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


def save_sequence(tmp_path, keep_best: int, losses: list[float]):
    rotator = checkpoints.CheckpointRotator(tmp_path, keep_best)
    model, tokenizer = build_model(TINY), Tokenizer.from_chars("0123456789+=")
    saved = [
        rotator.save(model, tokenizer, {}, step, {"val_loss": loss})
        for step, loss in enumerate(losses, 1)
    ]
    kept = {(loss, step) for loss, step, _ in rotator.kept()}
    return rotator, saved, kept


def link_target(tmp_path, name: str) -> str:
    return os.path.basename(os.readlink(tmp_path / name))


def test_the_best_n_are_kept_and_ties_keep_the_older(tmp_path):
    _, saved, kept = save_sequence(tmp_path, 2, [3.0, 2.0, 2.0, 1.0, 5.0])
    assert saved[4] is None  # worse than every kept one: never written
    assert kept == {(1.0, 4), (2.0, 2)}  # the tie at step 3 went out before the older step 2
    assert link_target(tmp_path, "best") == "step-00000004-val-1.0000"
    assert link_target(tmp_path, "latest") == "step-00000004-val-1.0000"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [
        "step-00000002-val-2.0000",
        "step-00000004-val-1.0000",
    ]


def test_keep_best_0_keeps_every_checkpoint_but_never_a_non_finite_one(tmp_path):
    _, saved, kept = save_sequence(tmp_path, 0, [3.0, 2.0, math.nan, 4.0, math.inf])
    assert saved[2] is None and saved[4] is None
    assert kept == {(3.0, 1), (2.0, 2), (4.0, 4)}
    assert link_target(tmp_path, "best") == "step-00000002-val-2.0000"
    assert link_target(tmp_path, "latest") == "step-00000004-val-4.0000"


def test_a_compiled_model_saves_and_loads_like_a_plain_one(tmp_path, accelerator):
    torch.manual_seed(0)
    model = build_model(TINY)
    compiled = torch.compile(model)  # compiles lazily: nothing is compiled by saving
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    plain = accelerator.unwrap_model(compiled, keep_torch_compile=False)
    tokenizer = Tokenizer.from_chars("0123456789+=")
    checkpoints.save_checkpoint(tmp_path / "ckpt", plain, tokenizer, {}, {"step": 1})
    loaded = checkpoints.load_checkpoint(tmp_path / "ckpt").model
    for name, tensor in model.state_dict().items():
        assert loaded.state_dict()[name].equal(tensor), name
    # Snapshots store the plain model's weights too, so a run resumes with compile on or off.
    store = Snapshots(accelerator, tmp_path / "run", Config(max_steps=1), model)
    weights = [compiled.state_dict()]
    store._unwrapped_weights([compiled], weights, tmp_path)
    assert set(weights[0]) == set(model.state_dict()) - {"lm_head.weight"}  # tied: stored once
    models = [compiled]
    store._unwrapped_models(models, tmp_path)
    assert models[0] is model


def test_a_non_finite_step_is_skipped_when_configured(accelerator):
    torch.manual_seed(0)
    model = build_model(TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    class Diverged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, inputs, targets):
            return self.inner(inputs, targets) * math.inf

    batch = [(torch.randint(0, 13, (4, 8)), torch.randint(0, 13, (4, 8)))]
    loss, tokens, _ = train_step(Diverged(), optimizer, accelerator, batch, 1.0, True)
    assert loss is None and tokens == 0 and not optimizer.state
    assert all(model.state_dict()[k].equal(v) for k, v in before.items())
    loss, tokens, _ = train_step(model, optimizer, accelerator, batch, 1.0, True)  # a finite one
    assert loss is not None and math.isfinite(loss.item()) and optimizer.state


def test_a_skipped_fp16_step_backs_off_the_scale_and_the_next_step_runs(monkeypatch):
    # Accelerate's fp16 on a GPU: a GradScaler that clip_grad_norm_ unscales through. The CPU has
    # the same GradScaler, set up here by hand since Accelerate gives the CPU no fp16.
    accelerator = Accelerator(cpu=True)
    monkeypatch.setattr(accelerator.state, "_mixed_precision", "fp16")
    monkeypatch.setattr(accelerator, "native_amp", True)
    monkeypatch.setattr(accelerator, "scaler", torch.amp.GradScaler("cpu", init_scale=1024.0))
    torch.manual_seed(0)
    model = build_model(TINY)
    optimizer = accelerator.prepare(torch.optim.AdamW(model.parameters(), lr=0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    class Diverged(torch.nn.Module):
        def forward(self, inputs, targets):
            return model(inputs, targets) * math.inf

    batch = [(torch.randint(0, 13, (4, 8)), torch.randint(0, 13, (4, 8)))]
    loss, _, _ = train_step(Diverged(), optimizer, accelerator, batch, 1.0, True)
    assert loss is None and accelerator.scaler.get_scale() == 512.0  # backed off, as on overflow
    assert all(model.state_dict()[k].equal(v) for k, v in before.items())
    loss, _, _ = train_step(model, optimizer, accelerator, batch, 1.0, True)  # no unscale_ error
    assert loss is not None and math.isfinite(loss.item())
    assert not model.state_dict()["wte.weight"].equal(before["wte.weight"])  # the step applied


def test_a_non_finite_model_is_never_saved_over_a_good_snapshot(tmp_path):
    model = build_model(TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    accelerator = Accelerator(cpu=True)  # one that holds only this test's model and optimizer
    model, optimizer = accelerator.prepare(model, optimizer)
    store = Snapshots(accelerator, tmp_path, Config(max_steps=1), model)
    stopper = EarlyStopping(EarlyStopConfig())
    (tmp_path / "trackers.json").write_text('{"wandb": {"run_id": "abc123"}}')
    good = store.save(Progress(step=1), stopper, None, 2.5)
    state = verify_snapshot(good)
    assert state["progress"] == {"step": 1, "tokens": 0, "samples": 0}
    assert state["trackers"] == {"wandb": {"run_id": "abc123"}}  # the tracker's run goes on too
    with pytest.raises(UserError, match=f"not saving it; the last good snapshot is {good}"):
        store.save(Progress(step=2), stopper, None, math.nan)
    with torch.no_grad():
        next(model.parameters())[0] = math.nan
    with pytest.raises(UserError, match="the model is not finite at step 3"):
        store.save(Progress(step=3), stopper, None, 2.0)
    assert snapshot_dirs(tmp_path) == [good]
    assert set(load_file(good / "model.safetensors")) == set(model.state_dict()) - {
        "lm_head.weight"
    }
