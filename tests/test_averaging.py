"""train.py --average: one checkpoint whose weights are the mean of several (gptlab.averaging)."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from conftest import run_script
from gptlab.averaging import average_checkpoints
from gptlab.checkpoints import load_checkpoint, save_checkpoint
from gptlab.errors import UserError
from gptlab.tokenizer import Tokenizer
from models import ModelConfig, build_model, with_classification_head

TOKENIZER = Tokenizer.from_chars("abcdefghijklmnop", ("<|pad|>", "<|unk|>"))


def save_classifier(directory, seed: int, n_embd: int = 16, dropout: float = 0.0):
    torch.manual_seed(seed)
    config = ModelConfig(
        arch="gpt",
        n_layer=2,
        n_head=2,
        n_embd=n_embd,
        block_size=12,
        vocab_size=TOKENIZER.vocab_size,
        dropout=dropout,
    )
    model = with_classification_head(build_model(config), ["neg", "pos"], TOKENIZER.pad_token_id)
    info = {"step": seed, "val_accuracy": 0.5}
    save_checkpoint(directory, model, TOKENIZER, {"format": "classify"}, info)
    return model


def test_the_average_is_the_mean_of_every_weight_and_transformers_loads_it(tmp_path):
    models = [save_classifier(tmp_path / f"seed{s}", s, dropout=0.1 * s) for s in (1, 2, 3)]
    sources = [str(tmp_path / f"seed{s}") for s in (1, 2, 3)]
    result = run_script("train.py", "--average", *sources, "--out_dir=soup", cwd=tmp_path)
    assert "averaged 3 checkpoints into soup" in result.stdout
    soup = load_checkpoint(tmp_path / "soup")
    for name, weight in soup.model.state_dict().items():
        mean = sum(m.state_dict()[name].double() for m in models) / 3
        assert torch.allclose(weight.double(), mean, atol=1e-7), name
    config = json.loads((tmp_path / "soup" / "config.json").read_text())
    assert len(config["averaged_from"]) == 3 and config["gptlab"]["dropout"] == 0.1
    assert soup.data_info == {"format": "classify"}
    batch = torch.tensor([[1, 2, 3, 4], [5, 6, 16, 16]])
    theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path / "soup").eval()
    with torch.no_grad():
        assert (theirs(batch).logits - soup.model(batch)).abs().max().item() <= 1e-4

    # The mean of a model with itself is that model, bit for bit; a second average replaces
    # the first one's directory (it is ours), and the order of the sources does not matter.
    average_checkpoints([sources[0], sources[0]], tmp_path / "soup")
    for name, weight in load_checkpoint(tmp_path / "soup").model.state_dict().items():
        assert torch.equal(weight, models[0].state_dict()[name]), name
    average_checkpoints(sources[::-1], tmp_path / "reversed")
    average_checkpoints(sources, tmp_path / "soup")
    reversed_state = load_checkpoint(tmp_path / "reversed").model.state_dict()
    for name, weight in load_checkpoint(tmp_path / "soup").model.state_dict().items():
        assert torch.equal(weight, reversed_state[name]), name


def test_averaging_refuses_what_is_not_one_model_and_writes_nothing(tmp_path):
    save_classifier(tmp_path / "a", 1)
    save_classifier(tmp_path / "b", 2)
    save_classifier(tmp_path / "wide", 3, n_embd=32)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    (tmp_path / "broken").mkdir()  # a config.json that is not JSON is no average of ours
    (tmp_path / "broken" / "config.json").write_text("{not json")
    (tmp_path / "broken" / "model.safetensors").write_text("")
    refusals = [
        (["a", "wide"], "out", "/a in model.n_embd"),
        (["a"], "out", "at least two checkpoints"),
        (["a", "missing"], "out", "missing does not exist"),
        (["a", "b"], "notes", "not empty and does not hold a weight average"),
        (["a", "b"], "b", "overlaps"),
        (["a", "b"], "broken", "not empty and does not hold a weight average"),
    ]
    for sources, out, message in refusals:
        with pytest.raises(UserError, match=message):
            average_checkpoints([str(tmp_path / s) for s in sources], tmp_path / out)
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert (tmp_path / "broken" / "config.json").read_text() == "{not json"
    assert load_checkpoint(tmp_path / "b").info["step"] == 2

    result = run_script(
        "train.py", "--average", "a", "wide", "--out_dir=out", cwd=tmp_path, check=False
    )
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "model.n_embd" in result.stderr and not (tmp_path / "out").exists()
    result = run_script("train.py", "--average", "a", "b", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "--out_dir" in result.stderr
