import pytest
import torch

from models import ModelConfig, build_model, count_parameters, generate
from models.llama import apply_rotary, rotary_tables, swiglu_hidden


def llama_config(**overrides) -> ModelConfig:
    values = dict(
        arch="llama", vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16
    )
    values.update(overrides)
    return ModelConfig(**values)


def test_llama_has_no_biases_and_grouped_key_value_heads():
    model = build_model(llama_config())
    assert all(not name.endswith("bias") for name, _ in model.named_parameters())
    # 4 query heads of 8, and 2 key and 2 value heads of 8.
    assert model.blocks[0].attn.qkv.weight.shape == (32 + 2 * 16, 32)
    assert model(torch.randint(0, 50, (3, 11))).shape == (3, 11, 50)


def test_swiglu_default_width_matches_gpts_mlp_weights():
    assert swiglu_hidden(llama_config(n_embd=128)) == 384  # 8/3 * 128 = 341.3, up to 64s
    assert swiglu_hidden(llama_config(mlp_hidden=100)) == 100
    gpt = build_model(ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_embd=192, bias=False))
    llama = build_model(llama_config(n_kv_head=0, n_embd=192))
    gpt_mlp = sum(p.numel() for p in gpt.blocks[0].mlp.parameters())
    assert sum(p.numel() for p in llama.blocks[0].mlp.parameters()) == gpt_mlp


def test_rotary_scores_depend_only_on_the_distance_between_positions():
    # Why restarting the window at position 0 past the context equals keeping absolute positions.
    cos, sin = rotary_tables(llama_config(block_size=64, rope_theta=500.0))
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m: int, n: int) -> float:
        return (apply_rotary(q, cos[m], sin[m]) * apply_rotary(k, cos[n], sin[n])).sum().item()

    assert score(10, 3) == pytest.approx(score(50, 43), abs=1e-5)
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-3)


def test_rope_theta_changes_the_model():
    torch.manual_seed(0)
    a = build_model(llama_config()).eval()
    b = build_model(llama_config(rope_theta=100.0)).eval()
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 50, (1, 16))
    assert not torch.allclose(a(idx), b(idx))


@pytest.mark.parametrize("new_tokens", [5, 40])  # within the context, and far past it
@pytest.mark.parametrize("n_kv_head", [0, 1, 2])
def test_cached_generation_equals_uncached_under_greedy(new_tokens, n_kv_head):
    torch.manual_seed(1)
    model = build_model(llama_config(n_kv_head=n_kv_head)).eval()
    prompt = torch.randint(0, 50, (2, 5))
    with_cache = generate(model, prompt, new_tokens, temperature=0.0, use_cache=True)
    without = generate(model, prompt, new_tokens, temperature=0.0, use_cache=False)
    assert with_cache.shape == (2, 5 + new_tokens)
    assert torch.equal(with_cache, without)


def test_config_problems_for_llama():
    assert any("must divide" in p for p in llama_config(n_kv_head=3).problems())
    assert any("even" in p for p in llama_config(n_embd=36, n_head=4).problems())
    assert llama_config().problems() == []


def test_the_303m_config_builds_with_its_parameter_count():
    from conftest import REPO
    from gptlab.config import load_config

    config, _, _ = load_config(["--config", str(REPO / "configs" / "llama_303m.json")])
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        model = build_model(config.model)
    assert count_parameters(model) == 303_219_712
    assert model.blocks[0].attn.qkv.weight.shape == (1024 + 2 * 4 * 64, 1024)
    assert model.blocks[0].mlp.gate.weight.shape == (2560, 1024)


def test_benchmark_times_generation_with_and_without_the_cache(shakespeare_dir, tmp_path):
    import json

    from conftest import REPO, run_script

    run_script(
        "benchmark.py",
        *("--config", str(REPO / "configs" / "shakespeare_llama_cpu.json")),
        f"--data.dir={shakespeare_dir}",
        *("--generate", "24", "--model.block_size=40", "--output", "gen.json"),
        cwd=tmp_path,
    )
    result = json.loads((tmp_path / "gen.json").read_text())
    assert result["new_tokens"] == 24 and result["same_tokens"] is True
    assert result["cache_tokens_per_sec"] > 0 and result["no_cache_tokens_per_sec"] > 0
    # transformers' generate on the same weights, exported as a checkpoint, gives the same tokens.
    assert result["same_tokens_as_transformers"] is True
    assert result["speedup_over_transformers"] == pytest.approx(
        result["cache_tokens_per_sec"] / result["transformers_tokens_per_sec"]
    )
    refused = run_script(
        "benchmark.py",
        *("--config", str(REPO / "configs" / "shakespeare_llama_cpu.json")),
        *("--generate", "512"),
        cwd=tmp_path,
        check=False,
    )
    assert refused.returncode == 2 and "--model.block_size=528" in refused.stderr
