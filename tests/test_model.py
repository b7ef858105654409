import pytest
import torch

from models import ModelConfig, build_model, count_parameters, generate, optimizer_groups
from models.generation import sample_next_token


def tiny_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=50, n_layer=2, n_head=4, n_embd=32, block_size=16, dropout=0.0)
    values.update(overrides)
    return ModelConfig(**values)


def test_logits_have_batch_time_vocab_shape():
    model = build_model(tiny_config())
    idx = torch.randint(0, 50, (3, 11))
    assert model(idx).shape == (3, 11, 50)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_a_later_token_never_changes_an_earlier_logit(arch):
    torch.manual_seed(0)
    model = build_model(tiny_config(arch=arch)).eval()
    idx = torch.randint(0, 50, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = torch.randint(0, 50, (2, 7))
    before, after = model(idx), model(changed)
    assert torch.equal(before[:, :9], after[:, :9])
    assert not torch.allclose(before[:, 9:], after[:, 9:])


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_tied_embeddings_share_one_matrix_and_untied_do_not(arch):
    tied = build_model(tiny_config(arch=arch))
    assert tied.lm_head.weight is tied.wte.weight
    untied = build_model(tiny_config(arch=arch, tie_embeddings=False))
    assert untied.lm_head.weight is not untied.wte.weight
    assert count_parameters(untied) - count_parameters(tied) == 50 * 32


def test_gpt2_initialisation_scales_residual_projections():
    torch.manual_seed(0)
    model = build_model(tiny_config(n_layer=8, n_embd=256, n_head=4))
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    expected = 0.02 / (2 * 8) ** 0.5
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(expected, rel=0.05)


def test_weight_decay_only_on_matrices():
    model = build_model(tiny_config())
    decay, no_decay = optimizer_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["params"]
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )


def test_dropout_only_in_training_mode():
    model = build_model(tiny_config(dropout=0.5))
    idx = torch.randint(0, 50, (2, 8))
    model.eval()
    assert torch.equal(model(idx), model(idx))
    model.train()
    assert not torch.equal(model(idx), model(idx))


@pytest.mark.parametrize("new_tokens", [5, 40])  # within the context, and far past it
def test_cached_generation_equals_uncached_under_greedy(new_tokens):
    torch.manual_seed(1)
    model = build_model(tiny_config()).eval()
    prompt = torch.randint(0, 50, (2, 5))
    with_cache = generate(model, prompt, new_tokens, temperature=0.0, use_cache=True)
    without = generate(model, prompt, new_tokens, temperature=0.0, use_cache=False)
    assert with_cache.shape == (2, 5 + new_tokens)
    assert torch.equal(with_cache, without)


def test_sampling_is_reproducible_with_a_seed_and_respects_top_k():
    torch.manual_seed(2)
    model = build_model(tiny_config()).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    runs = [
        generate(model, prompt, 10, top_k=3, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(*runs)
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0, -1.0]])
    picks = {
        sample_next_token(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(s)).item()
        for s in range(50)
    }
    assert picks == {1, 2}


def test_top_p_keeps_the_smallest_set_holding_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    picks = {
        sample_next_token(logits, 1.0, top_p=0.7, generator=torch.Generator().manual_seed(s)).item()
        for s in range(100)
    }
    assert picks == {0, 1}


def test_config_problems_name_the_fix():
    assert any("multiple of model.n_head" in p for p in tiny_config(n_embd=30).problems())
    assert any("'gpt' or 'llama'" in p for p in tiny_config(arch="rnn").problems())
    assert tiny_config().problems() == []
