"""What every model shares for sampling: the key-value cache, token sampling and the generation loop."""

import torch
from torch import Tensor, nn


class KVCache:
    """Keys and values of past positions, one preallocated buffer per layer.

    A forward pass reads `length` (the first position it writes), calls `update` once per layer,
    and then moves `length` on by the number of tokens it processed.
    """

    def __init__(self, n_layer: int, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.keys: list[Tensor | None] = [None] * n_layer
        self.values: list[Tensor | None] = [None] * n_layer

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (batch, heads, new tokens, head dim) after the past ones; return all of them."""
        if self.keys[layer] is None:
            batch, heads, _, head_dim = k.shape
            shape = (batch, heads, self.capacity, head_dim)
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        end = self.length + k.size(2)
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions, asked for {end}")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def causal_attention(q: Tensor, k: Tensor, v: Tensor, dropout: float) -> Tensor:
    """Scaled dot-product attention of q over k, v where q holds the last q.size(2) positions."""
    n_new, n_all = q.size(2), k.size(2)
    if n_new == n_all:
        return nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=q.size(1) != k.size(1)
        )
    # Decoding with a cache: new position i may see every past position and new ones up to i
    # (one new token sees every position, so it needs no mask at all).
    mask = None
    if n_new > 1:
        mask = torch.ones(n_new, n_all, dtype=torch.bool, device=q.device).tril(n_all - n_new)
    return nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=q.size(1) != k.size(1)
    )


def sample_next_token(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row of logits (batch, vocab). Temperature 0 is greedy and deterministic."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k > 0:
        kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate(
    model: nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Append max_new_tokens sampled tokens to idx (batch, time) and return the whole sequence.

    Without a cache every step reruns the model on the last block_size tokens. With one, only the
    new token runs; once the window is full the cache is rebuilt from the last block_size tokens,
    so both paths see exactly the same context and give the same tokens under greedy decoding.
    """
    block_size = model.config.block_size
    # The cache needs room for the whole sequence or the window, whichever is shorter.
    capacity = min(block_size, idx.size(1) + max_new_tokens)
    cache = None
    for _ in range(max_new_tokens):
        if not use_cache:
            logits = model(idx[:, -block_size:], logits_to_keep=1)
        elif cache is None or cache.length + 1 > capacity:
            cache = KVCache(model.config.n_layer, capacity)
            logits = model(idx[:, -block_size:], cache=cache, logits_to_keep=1)
        else:
            logits = model(idx[:, -1:], cache=cache, logits_to_keep=1)
        next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)
        idx = torch.cat((idx, next_token), dim=1)
    return idx
