"""The model's hyperparameters: one dataclass shared by every architecture."""

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    arch: str = "gpt"
    """Architecture: "gpt" (GPT-2: learned positions, LayerNorm, GELU) or "llama" (RMSNorm, RoPE, SwiGLU, GQA)."""
    n_layer: int = 6
    """Number of transformer blocks."""
    n_head: int = 6
    """Number of attention (query) heads."""
    n_kv_head: int = 0
    """Llama: key-value heads for grouped-query attention (must divide n_head); 0 means n_head."""
    n_embd: int = 384
    """Width of the residual stream; must be a multiple of n_head."""
    block_size: int = 256
    """Context length in tokens."""
    vocab_size: int = 0
    """Vocabulary size; 0 takes it from the data set. Set it larger to pad (e.g. 50304 for GPT-2)."""
    vocab_multiple: int = 1
    """Round the vocabulary up to a multiple of this (64 turns GPT-2's 50257 into 50304, whose matmuls run faster on GPUs); the extra tokens are never targets."""
    dropout: float = 0.0
    """Dropout probability on attention weights and residual branches during training."""
    bias: bool = True
    """GPT: biases in Linear and LayerNorm layers (GPT-2 has them). Llama never uses biases."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output layer."""
    activation: str = "gelu_tanh"
    """GPT: the MLP's GELU, "gelu_tanh" (GPT-2's tanh approximation) or "gelu" (exact, as nanoGPT uses; its forward and backward cost less on a CPU). Llama ignores it: its MLP is SwiGLU."""
    mlp_hidden: int = 0
    """Hidden width of the MLP; 0 means 4*n_embd for GPT and the SwiGLU default for Llama."""
    rope_theta: float = 10000.0
    """Llama: base of the rotary position embedding frequencies."""
    norm_eps: float = 1e-5
    """Epsilon of LayerNorm / RMSNorm."""
    loss_chunk: int = 0
    """Compute the training loss this many positions at a time, recomputing their logits in the backward pass, so fp32 logits of the whole batch never exist (for large vocabularies); 0: all at once."""

    labels: list[str] = field(default_factory=list)
    """Classifiers: the class names, by class id, scored by a head on the last real token (empty: a language model). Classification data sets set it."""
    pad_token_id: int = -1
    """Classifiers: the padding token, which the pooled position comes before (-1: none). Classification data sets set it."""

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    def problems(self) -> list[str]:
        """Everything wrong with this configuration, as messages naming the fix."""
        found = []
        if self.arch not in ("gpt", "llama"):
            found.append(f"model.arch is {self.arch!r}; use 'gpt' or 'llama'")
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, name) < 1:
                found.append(f"model.{name} must be at least 1")
        if self.n_head >= 1 and self.n_embd % self.n_head:
            found.append(
                f"model.n_embd ({self.n_embd}) must be a multiple of model.n_head ({self.n_head})"
            )
        if self.n_kv_head < 0 or (self.n_kv_head and self.n_head % self.n_kv_head):
            found.append(
                f"model.n_kv_head ({self.n_kv_head}) must divide model.n_head ({self.n_head})"
            )
        if self.arch == "gpt" and self.n_kv_head not in (0, self.n_head):
            found.append("model.n_kv_head (grouped-query attention) needs model.arch='llama'")
        if self.arch == "llama" and self.head_dim % 2:
            found.append("model.n_embd / model.n_head must be even for rotary embeddings")
        if self.activation not in ("gelu_tanh", "gelu"):
            found.append(f"model.activation is {self.activation!r}; use 'gelu_tanh' or 'gelu'")
        if not 0.0 <= self.dropout < 1.0:
            found.append(f"model.dropout ({self.dropout}) must be in [0, 1)")
        if self.vocab_size < 0 or self.mlp_hidden < 0:
            found.append("model.vocab_size and model.mlp_hidden must not be negative")
        if self.vocab_multiple < 1:
            found.append(f"model.vocab_multiple ({self.vocab_multiple}) must be at least 1")
        if self.loss_chunk < 0:
            found.append(f"model.loss_chunk ({self.loss_chunk}) must be 0 (off) or more")
        if self.num_labels == 1 or len(set(self.labels)) < self.num_labels:
            found.append(f"model.labels {self.labels} must be 2 or more different names (or none)")
        # A classifier's pad token comes from its data set (train.py checks model.labels there).
        if self.pad_token_id < -1 or (self.vocab_size and self.pad_token_id >= self.vocab_size):
            found.append(
                f"model.pad_token_id ({self.pad_token_id}) must be a token id of the vocabulary"
            )
        for name in ("rope_theta", "norm_eps"):
            if not 0.0 < getattr(self, name) < float("inf"):
                found.append(f"model.{name} is {getattr(self, name)}; it must be a positive number")
        return found
