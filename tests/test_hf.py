"""The two-way bridge to transformers: their GPT-2 and Llama models into ours and ours into theirs."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from conftest import REPO, SHARED_DATA, read_metrics, run_script
from gptlab.checkpoints import load_checkpoint, save_checkpoint
from gptlab.errors import UserError
from gptlab.tokenizer import Tokenizer
from models import generate

GPT2_TOKENIZER = SHARED_DATA / "gpt2-tokenizer"
PROMPT = "First Citizen:\nBefore we proceed"


def hf_gpt2(**overrides) -> GPT2LMHeadModel:
    values = dict(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**{**values, **overrides})).eval()


def hf_llama(**overrides) -> LlamaForCausalLM:
    values = dict(
        vocab_size=50257,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**values, **overrides})).eval()


def save_hf_dir(model, directory: Path) -> Path:
    """A Hugging Face model directory as save_pretrained writes it, with GPT-2's tokenizer files."""
    model.save_pretrained(directory)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(GPT2_TOKENIZER / name, directory / name)
    return directory


def prompt_ids() -> torch.Tensor:
    ids = Tokenizer.load(GPT2_TOKENIZER).encode(PROMPT)
    assert ids[:3] == [5962, 22307, 25]
    return torch.tensor([ids])


@pytest.mark.parametrize("build", [hf_gpt2, hf_llama, lambda: hf_llama(num_key_value_heads=4)])
def test_transformers_model_to_ours_and_back_keeps_logits_and_greedy_tokens(build, tmp_path):
    theirs = build()
    ids = prompt_ids()
    source = save_hf_dir(theirs, tmp_path / "hf")

    ours = load_checkpoint(source).model  # transformers -> ours
    with torch.no_grad():
        expected = theirs(ids).logits
        assert (ours(ids) - expected).abs().max().item() <= 1e-4
        their_tokens = theirs.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(generate(ours, ids, 20, temperature=0.0), their_tokens)

    tokenizer = Tokenizer.load(source)
    save_checkpoint(tmp_path / "ours", ours, tokenizer, {}, {"step": 0, "val_loss": 0.0})
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()  # ours -> transformers
    assert type(back) is type(theirs)
    with torch.no_grad():
        assert (back(ids).logits - expected).abs().max().item() <= 1e-4
        back_tokens = back.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(back_tokens, their_tokens)
    assert AutoTokenizer.from_pretrained(tmp_path / "ours")(PROMPT)["input_ids"] == ids[0].tolist()


def test_our_checkpoint_of_each_architecture_loads_in_transformers(tmp_path):
    from models import ModelConfig, build_model

    tokenizer = Tokenizer.from_chars(PROMPT + "xyz")
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    for arch, extra in [("gpt", {"bias": False}), ("llama", {"tie_embeddings": False})]:
        torch.manual_seed(0)
        config = ModelConfig(
            arch=arch, vocab_size=40, n_layer=2, n_head=4, n_embd=32, block_size=64, **extra
        )
        model = build_model(config).eval()
        save_checkpoint(tmp_path / arch, model, tokenizer, {}, {"step": 1, "val_loss": 1.0})
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / arch).eval()
        with torch.no_grad():
            assert (theirs(ids).logits - model(ids)).abs().max().item() <= 1e-4
        # Our loader stays exact, bias-free GPT included.
        reloaded = load_checkpoint(tmp_path / arch)
        assert reloaded.model.config == config
        assert torch.equal(reloaded.model(ids), model(ids))


def test_exact_gelu_gpt_exports_as_gelu_and_loads_back_as_it(tmp_path):
    from models import ModelConfig, build_model

    tokenizer = Tokenizer.from_chars(PROMPT + "xyz")
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    config = ModelConfig(vocab_size=40, n_layer=2, n_head=4, n_embd=32, activation="gelu")
    torch.manual_seed(0)
    model = build_model(config).eval()
    save_checkpoint(tmp_path / "gelu", model, tokenizer, {}, {"step": 1, "val_loss": 1.0})
    hf_config = json.loads((tmp_path / "gelu" / "config.json").read_text())
    assert hf_config["activation_function"] == "gelu"
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "gelu").eval()
    x = torch.linspace(-4, 4, 801)
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids)).abs().max().item() <= 1e-4
        # transformers applies exact GELU, which differs from the tanh approximation by up to 5e-4
        their_activation = theirs.transformer.h[0].mlp.act(x)
        assert (their_activation - F.gelu(x)).abs().max().item() <= 1e-6
        assert (their_activation - F.gelu(x, approximate="tanh")).abs().max().item() > 1e-4
    reloaded = load_checkpoint(tmp_path / "gelu")
    assert reloaded.model.config.activation == "gelu"
    assert torch.equal(reloaded.model(ids), model(ids))


def test_character_vocabulary_decodes_back_to_the_text_in_transformers(tmp_path):
    text = "ROMEO:\nWhat, ho! Is  it so?\n"
    tokenizer = Tokenizer.from_chars(text)
    tokenizer.save(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    ids = theirs(text)["input_ids"]
    assert ids == tokenizer.encode(text) and len(ids) == len(text)
    assert theirs.decode(ids) == text


def test_unsupported_models_are_refused_not_loaded_in_part(tmp_path):
    save_hf_dir(hf_gpt2(activation_function="relu"), tmp_path / "relu")
    with pytest.raises(UserError, match="activation_function 'relu' is not supported"):
        load_checkpoint(tmp_path / "relu")

    save_hf_dir(
        hf_llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
        tmp_path / "scaled",
    )
    with pytest.raises(UserError, match="RoPE scaling"):
        load_checkpoint(tmp_path / "scaled")

    save_hf_dir(hf_llama(attention_bias=True), tmp_path / "bias")
    with pytest.raises(UserError, match="attention_bias"):
        load_checkpoint(tmp_path / "bias")

    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="'bert' model; supported are gpt2, llama"):
        load_checkpoint(tmp_path / "bert")

    broken = save_hf_dir(hf_gpt2(), tmp_path / "broken")
    weights = load_file(broken / "model.safetensors")
    del weights["transformer.h.1.mlp.c_fc.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="missing.*h.1.mlp.c_fc.weight"):
        load_checkpoint(broken)


def test_our_checkpoints_are_still_verified_against_their_manifest(tmp_path):
    source = save_hf_dir(hf_gpt2(), tmp_path / "hf")
    checkpoint = load_checkpoint(source)
    save_checkpoint(tmp_path / "ours", checkpoint.model, checkpoint.tokenizer, {}, {"step": 0})
    weights = tmp_path / "ours" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(UserError, match="missing or corrupt"):
        load_checkpoint(tmp_path / "ours")


def test_a_hub_name_without_the_network_gets_a_clear_error(tmp_path):
    result = run_script(
        "generate.py",
        "--checkpoint",
        "no-such-owner/no-such-model",
        cwd=tmp_path,
        check=False,
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    assert "could not be downloaded from the Hugging Face hub" in result.stderr


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_trained_checkpoint_continues_a_prompt_in_transformers_as_generate_py(
    arch, shakespeare_dir, tmp_path
):
    run_dir = tmp_path / "run"
    run_script(
        "train.py",
        "--config",
        "configs/shakespeare_cpu.json",
        f"--model.arch={arch}",
        "--model.n_layer=2",
        "--model.n_embd=32",
        "--model.block_size=48",
        f"--data.dir={shakespeare_dir}",
        "--data.eval_samples=32",
        "--max_steps=30",
        "--macro_batch_steps=30",
        f"--out_dir={run_dir}",
        cwd=REPO,
    )
    assert read_metrics(run_dir)[-1]["message"].startswith("done: 30 steps")
    prompt = "ROMEO:\n"
    ours = run_script(
        "generate.py",
        *("--checkpoint", str(run_dir), "--prompt", prompt),
        *("--max_new_tokens", "40", "--temperature", "0"),
        cwd=tmp_path,
    ).stdout
    model = AutoModelForCausalLM.from_pretrained(run_dir / "best").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "best")
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=40, do_sample=False)
    assert ours == tokenizer.decode(tokens[0]) + "\n"
    assert len(ours) == len(prompt) + 40 + 1  # one character per token


def test_fine_tune_and_evaluate_start_from_a_transformers_directory(tmp_path):
    # A BPE data set made with GPT-2's tokenizer, from the first 20,000 characters of Shakespeare.
    text = (SHARED_DATA / "tinyshakespeare" / "input.txt").read_text()[:20_000]
    (tmp_path / "input.txt").write_text(text)
    data = tmp_path / "bpe"
    run_script(
        "prepare_data.py",
        *("text", "--input", "input.txt", "--tokenizer", str(GPT2_TOKENIZER)),
        f"--out_dir={data}",
        cwd=tmp_path,
    )
    source = save_hf_dir(hf_gpt2(), tmp_path / "hf")

    # A random GPT-2 predicts near-uniformly: the loss is about ln(50257) = 10.82.
    result = run_script(
        "evaluate.py",
        *("--task", "loss", "--checkpoint", str(source), "--data_dir", str(data)),
        *("--split", "val", "--max_samples", "8", "--output", "val.json"),
        cwd=tmp_path,
    )
    assert json.loads((tmp_path / "val.json").read_text())["loss"] == pytest.approx(10.82, abs=0.1)

    # A learning rate of 1e-9 leaves the weights as they were: the run really started from them.
    run_script(
        "train.py",
        "--config",
        str(REPO / "configs" / "shakespeare_cpu.json"),
        f"--init_from={source}",
        f"--data.dir={data}",
        *("--data.eval_samples=8", "--batch_size=2", "--max_steps=2", "--macro_batch_steps=2"),
        *("--lr.peak=1e-9", "--lr.begin=1e-9", "--lr.end=1e-9", "--out_dir=run"),
        cwd=tmp_path,
    )
    tuned = load_checkpoint(tmp_path / "run")
    assert tuned.model.config.n_embd == 32 and tuned.model.config.block_size == 64
    ids = prompt_ids()
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(source)(ids).logits
        assert (tuned.model(ids) - expected).abs().max().item() <= 1e-4
    assert result.returncode == 0


def test_sharded_safetensors_and_pytorch_bin_weights_load_alike(tmp_path):
    theirs = hf_gpt2()
    ids = prompt_ids()
    with torch.no_grad():
        expected = theirs(ids).logits
    sharded = tmp_path / "sharded"
    theirs.save_pretrained(sharded, max_shard_size="2MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    pickled = save_hf_dir(theirs, tmp_path / "bin")
    weights = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(weights, pickled / "pytorch_model.bin")
    for source in (sharded, pickled):
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(GPT2_TOKENIZER / name, source / name)
        with torch.no_grad():
            logits = load_checkpoint(source).model(ids)
        assert (logits - expected).abs().max().item() <= 1e-4


def test_checkpoints_saved_with_our_own_names_before_the_bridge_still_load(tmp_path):
    from gptlab.storage import write_directory_atomically
    from models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=40, n_layer=1, n_head=2, n_embd=16)).eval()
    tokenizer = Tokenizer.from_chars(PROMPT + "xyz")

    def old_format(directory: Path) -> None:  # what save_checkpoint wrote before
        state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        config = {"gptlab": {**model.config.__dict__}, "step": 5, "val_loss": 1.5}
        (directory / "config.json").write_text(json.dumps(config))
        (directory / "data.json").write_text("{}")
        tokenizer.save(directory)

    write_directory_atomically(tmp_path / "old", old_format)
    loaded = load_checkpoint(tmp_path / "old")
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    assert torch.equal(loaded.model(ids), model(ids)) and loaded.info["step"] == 5


def test_hub_gpt2_weights_without_the_base_model_prefix_load(tmp_path):
    # The hub's original gpt2 checkpoints hold GPT2Model's weights alone: `wte.weight`,
    # `h.0.attn.c_attn.weight` (and the causal-mask buffers), without transformers' `transformer.`.
    theirs = hf_gpt2()
    source = save_hf_dir(theirs, tmp_path / "gpt2")
    weights = {k: v.contiguous() for k, v in theirs.transformer.state_dict().items()}
    weights["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))  # the hub's mask buffer
    assert "wte.weight" in weights and "h.0.attn.c_attn.weight" in weights
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    ids = prompt_ids()
    with torch.no_grad():
        expected = theirs(ids).logits
        assert (
            AutoModelForCausalLM.from_pretrained(source)(ids).logits - expected
        ).abs().max() < 1e-4
        ours = load_checkpoint(source).model
        assert (ours(ids) - expected).abs().max().item() <= 1e-4


def test_base_model_prefixes_are_transformers_own():
    from transformers import GPT2PreTrainedModel, LlamaPreTrainedModel

    from models import hf

    theirs = {"gpt": GPT2PreTrainedModel, "llama": LlamaPreTrainedModel}
    assert {arch: cls.base_model_prefix for arch, cls in theirs.items()} == hf.BASE_MODEL_PREFIX


def test_llama_export_writes_rope_theta_for_transformers_4_and_reads_either(tmp_path):
    from models import ModelConfig, build_model

    config = ModelConfig(
        arch="llama", vocab_size=40, n_layer=1, n_head=2, n_embd=16, block_size=32, rope_theta=500.0
    )
    tokenizer = Tokenizer.from_chars(PROMPT + "xyz")
    save_checkpoint(tmp_path / "ours", build_model(config), tokenizer, {}, {"step": 1})
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["rope_theta"] == 500.0  # what transformers 4.x reads
    assert written["rope_parameters"]["rope_theta"] == 500.0  # what transformers 5 reads
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ours").config.rope_parameters == {
        "rope_type": "default",
        "rope_theta": 500.0,
    }
    # A directory written by transformers 4.x (rope_theta only) or 5 (rope_parameters only) loads.
    del written["gptlab"]
    for key in ("rope_parameters", "rope_theta"):
        one = {k: v for k, v in written.items() if k != key}
        shutil.copytree(tmp_path / "ours", tmp_path / key)
        (tmp_path / key / "config.json").write_text(json.dumps(one))
        assert load_checkpoint(tmp_path / key).model.config.rope_theta == 500.0
