"""Llama: RMSNorm, rotary position embeddings, SwiGLU MLP, grouped-query attention, no biases.

The layout follows Hugging Face's LlamaForCausalLM (rotary embeddings rotate the two halves of each
head, not interleaved pairs), so weights map one to one in models/hf.py. The key-value cache, the
attention kernel and the generation loop are the ones in models/generation.py that GPT uses too.

Positions past the context: generate() rebuilds the cache from the last block_size tokens once the
window is full, with or without a cache, and the window's tokens get positions 0..block_size-1.
Rotary attention scores depend only on the distance between query and key, so this is the same
attention as keeping every token at its absolute position, up to float rounding; it also keeps
the cached and the uncached path exactly alike.
"""

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.config import ModelConfig
from models.generation import KVCache, causal_attention
from models.gpt import GPT
from models.output import add_output_layer, output


def swiglu_hidden(config: ModelConfig) -> int:
    """The MLP width: mlp_hidden, or by default 8/3 * n_embd rounded up to a multiple of 64.

    Three matrices of 8/3 * n_embd hold as many weights as GPT's two of 4 * n_embd (Llama's rule).
    """
    return config.mlp_hidden or 64 * math.ceil(8 * config.n_embd / 3 / 64)


def rotary_tables(config: ModelConfig) -> tuple[Tensor, Tensor]:
    """cos and sin (block_size, head_dim) of every position, in float32 (Hugging Face's layout)."""
    half = torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim
    inv_freq = 1.0 / (config.rope_theta**half)
    angles = torch.outer(torch.arange(config.block_size).float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (batch, heads, time, head_dim) by the angles of its positions (time, head_dim)."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat((-second, first), dim=-1)
    return (x * cos + rotated_half * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        # Queries, keys and values in one matrix: n_head query heads, then n_kv_head of each.
        qkv_width = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.qkv = nn.Linear(config.n_embd, qkv_width, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None) -> Tensor:
        batch, time, width = x.shape
        kv_width = self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split((width, kv_width, kv_width), dim=2)
        q = q.view(batch, time, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(batch, time, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(batch, time, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:  # keys are cached rotated, at the positions they were computed at
            k, v = cache.update(self.layer, k, v)
        y = causal_attention(q, k, v, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(batch, time, width)
        return self.resid_dropout(self.proj(y))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = swiglu_hidden(config)
        self.gate = nn.Linear(config.n_embd, hidden, bias=False)
        self.up = nn.Linear(config.n_embd, hidden, bias=False)
        self.proj = nn.Linear(hidden, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.silu(self.gate(x)) * self.up(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.norm_1 = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = Attention(config, layer)
        self.norm_2 = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None) -> Tensor:
        x = x + self.attn(self.norm_1(x), cos, sin, cache)
        return x + self.mlp(self.norm_2(x))


class Llama(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        add_output_layer(self, config)
        # Derived from the config, so not saved with the weights.
        cos, sin = rotary_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # GPT-2's initialisation, residual projections scaled by 1/sqrt(2 * n_layer) as there.
        self.apply(GPT._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> Tensor:
        """Token ids idx (batch, time) -> the summed loss against targets (batch, time) if given
        (see models.loss), else logits (batch, time, vocab) of the last logits_to_keep positions
        (0: all; generation keeps 1). A classifier (config.num_labels) gives class logits
        (batch, num_labels) at each row's last real token, or their summed loss against targets
        (batch,) of labels (see models.classification)."""
        start = cache.length if cache is not None else 0
        end = start + idx.size(1)
        if end > self.config.block_size:
            raise ValueError(
                f"sequence of {end} tokens exceeds block_size {self.config.block_size}"
            )
        cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        x = self.drop(self.wte(idx))
        for block in self.blocks:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.length = end
        return output(self, self.norm_f(x), idx, targets, logits_to_keep)
