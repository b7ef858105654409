"""The bridge to Hugging Face transformers: config fields and weight names, both ways.

    GPT   <->  GPT2LMHeadModel   (model_type "gpt2")
    Llama <->  LlamaForCausalLM  (model_type "llama")
    classifiers (model.labels)  <->  GPT2ForSequenceClassification, LlamaForSequenceClassification

Checkpoints are saved under transformers' names with a transformers config.json, so
`AutoModelForCausalLM.from_pretrained(checkpoint_dir)` loads them (a classifier:
`AutoModelForSequenceClassification`, with its labels and pad token); any GPT-2 or Llama model
directory loads into our models the other way. Anything the mapping cannot represent exactly is
refused with a UserError rather than loaded in part.
"""

import json
import typing
from pathlib import Path

import torch
from torch import Tensor, nn

from gptlab.errors import UserError
from models.config import ModelConfig
from models.llama import swiglu_hidden

# Our parameter names -> transformers' names; "{i}" is the layer number.
GPT2_NAMES = {
    "wte.weight": "transformer.wte.weight",
    "wpe.weight": "transformer.wpe.weight",
    "blocks.{i}.ln_1.weight": "transformer.h.{i}.ln_1.weight",
    "blocks.{i}.ln_1.bias": "transformer.h.{i}.ln_1.bias",
    "blocks.{i}.attn.qkv.weight": "transformer.h.{i}.attn.c_attn.weight",
    "blocks.{i}.attn.qkv.bias": "transformer.h.{i}.attn.c_attn.bias",
    "blocks.{i}.attn.proj.weight": "transformer.h.{i}.attn.c_proj.weight",
    "blocks.{i}.attn.proj.bias": "transformer.h.{i}.attn.c_proj.bias",
    "blocks.{i}.ln_2.weight": "transformer.h.{i}.ln_2.weight",
    "blocks.{i}.ln_2.bias": "transformer.h.{i}.ln_2.bias",
    "blocks.{i}.mlp.fc.weight": "transformer.h.{i}.mlp.c_fc.weight",
    "blocks.{i}.mlp.fc.bias": "transformer.h.{i}.mlp.c_fc.bias",
    "blocks.{i}.mlp.proj.weight": "transformer.h.{i}.mlp.c_proj.weight",
    "blocks.{i}.mlp.proj.bias": "transformer.h.{i}.mlp.c_proj.bias",
    "ln_f.weight": "transformer.ln_f.weight",
    "ln_f.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
}
# GPT-2's Conv1D layers store their weight as (in, out), the transpose of nn.Linear's.
GPT2_TRANSPOSED = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)

LLAMA_NAMES = {
    "wte.weight": "model.embed_tokens.weight",
    "blocks.{i}.norm_1.weight": "model.layers.{i}.input_layernorm.weight",
    # Our fused qkv is transformers' q_proj, k_proj and v_proj stacked along the output dimension.
    "blocks.{i}.attn.qkv.weight": (
        "model.layers.{i}.self_attn.q_proj.weight",
        "model.layers.{i}.self_attn.k_proj.weight",
        "model.layers.{i}.self_attn.v_proj.weight",
    ),
    "blocks.{i}.attn.proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blocks.{i}.norm_2.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blocks.{i}.mlp.gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blocks.{i}.mlp.up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blocks.{i}.mlp.proj.weight": "model.layers.{i}.mlp.down_proj.weight",
    "norm_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}

# Buffers some transformers versions save that hold nothing learned (causal masks, RoPE tables).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")

SUPPORTED = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
CLASSIFIERS = {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification"}
# GPT-2's activation_function for our model.activation, and back ("gelu_pytorch_tanh" is the
# same tanh approximation as "gelu_new").
HF_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
FROM_HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# config.json keys without which the model's shape is unknown.
REQUIRED_KEYS = {
    "gpt2": ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"),
    "llama": (
        "num_hidden_layers",
        "num_attention_heads",
        "hidden_size",
        "max_position_embeddings",
        "vocab_size",
        "intermediate_size",
    ),
}

# transformers' base_model_prefix of GPT2PreTrainedModel and LlamaPreTrainedModel: the causal LM
# holds its base model (GPT2Model, LlamaModel) under this name, so base-model weights carry it too.
BASE_MODEL_PREFIX = {"gpt": "transformer", "llama": "model"}


def name_pairs(config: ModelConfig) -> list[tuple[str, str | tuple[str, ...]]]:
    """(our name, transformers' name or names) for every parameter of a model of this config."""
    table = GPT2_NAMES if config.arch == "gpt" else LLAMA_NAMES
    if config.num_labels:  # a classifier's head replaces the language-model head
        table = {k: v for k, v in table.items() if k != "lm_head.weight"}
        table["score.weight"] = "score.weight"
    pairs = []
    for ours, theirs in table.items():
        layers = range(config.n_layer) if "{i}" in ours else [None]
        for i in layers:
            theirs_i = (
                theirs.format(i=i)
                if isinstance(theirs, str)
                else tuple(t.format(i=i) for t in theirs)
            )
            pairs.append((ours.format(i=i), theirs_i))
    return pairs


def _qkv_sizes(config: ModelConfig) -> list[int]:
    kv = config.kv_heads * config.head_dim
    return [config.n_embd, kv, kv]


def _transposed(name: str) -> bool:
    return name.endswith(GPT2_TRANSPOSED)


def to_hf_state(model: nn.Module, weights: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The model's weights under transformers' names, on the CPU, contiguous, tied ones once.
    `weights` (our names) replaces model.state_dict(): a sharded model's, gathered.

    GPT-2 always has biases: a GPT built with bias=False gets zero biases, which change nothing.
    """
    config: ModelConfig = model.config
    weights = model.state_dict() if weights is None else weights
    state = {k: v.detach().cpu() for k, v in weights.items()}
    hf = {}
    for ours, theirs in name_pairs(config):
        if ours == "lm_head.weight" and config.tie_embeddings:
            continue  # transformers ties it to the token embedding on loading
        if isinstance(theirs, tuple):
            for name, part in zip(theirs, state[ours].split(_qkv_sizes(config))):
                hf[name] = part.contiguous()
        elif ours in state:
            hf[theirs] = (state[ours].t() if _transposed(theirs) else state[ours]).contiguous()
        else:  # a bias of a bias-free GPT
            weight = state[ours.removesuffix("bias") + "weight"]  # (out, in) or (width,)
            hf[theirs] = torch.zeros(weight.size(0), dtype=weight.dtype)
    return hf


def with_base_model_prefix(hf: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """The weights under the causal LM's names. A save of the base model alone (the hub's original
    gpt2 checkpoints: `wte.weight`, `h.0.attn.c_attn.weight`) lacks the base_model_prefix
    (`transformer.`); transformers adds it on loading, and so do we."""
    prefix = BASE_MODEL_PREFIX[config.arch] + "."
    if any(name.startswith(prefix) for name in hf):
        return hf
    return {name if name == "lm_head.weight" else prefix + name: w for name, w in hf.items()}


def from_hf_state(hf: dict[str, Tensor], config: ModelConfig, source: str) -> dict[str, Tensor]:
    """Our state dict from transformers-named weights (of the causal LM or of its base model alone);
    every weight must be used, none missing."""
    hf = with_base_model_prefix(hf, config)
    state, used, missing = {}, set(), []
    for ours, theirs in name_pairs(config):
        names = theirs if isinstance(theirs, tuple) else (theirs,)
        if ours == "lm_head.weight" and config.tie_embeddings:
            # Some saves also store the tied output layer: it must then equal the embedding.
            embedding = (
                "transformer.wte.weight" if config.arch == "gpt" else "model.embed_tokens.weight"
            )
            if theirs in hf and embedding in hf and not torch.equal(hf[theirs], hf[embedding]):
                raise UserError(f"{source}: lm_head.weight differs from the tied token embedding")
            used.add(theirs)
            continue
        if any(name not in hf for name in names):
            missing.extend(name for name in names if name not in hf)
            continue
        used.update(names)
        if config.arch == "gpt" and not config.bias and ours.endswith(".bias"):
            if hf[theirs].any():
                raise UserError(f"{source}: {theirs} is not zero but the config says bias=false")
            continue
        if isinstance(theirs, tuple):
            state[ours] = torch.cat([hf[name] for name in theirs])
        else:
            state[ours] = hf[theirs].t() if _transposed(theirs) else hf[theirs]
    unexpected = sorted(k for k in hf if k not in used and not k.endswith(IGNORED_SUFFIXES))
    if missing or unexpected:
        raise UserError(
            f"{source} does not match its config.json (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); only plain GPT-2 and Llama causal language models are supported"
        )
    return state


def to_hf_config(
    config: ModelConfig, eos_token_id: int | None, bos_token_id: int | None = None
) -> dict:
    """transformers' config.json fields of a model of this config and its tokenizer's
    end-of-text and beginning-of-text tokens (the same token in ours and GPT-2's)."""
    model_type = "gpt2" if config.arch == "gpt" else "llama"
    common = {
        "architectures": [(CLASSIFIERS if config.num_labels else SUPPORTED)[model_type]],
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "dtype": "float32",
    }
    if config.num_labels:
        common["id2label"] = dict(enumerate(config.labels))
        common["label2id"] = {name: i for i, name in enumerate(config.labels)}
        common["pad_token_id"] = config.pad_token_id
    if config.arch == "gpt":
        return {
            "model_type": "gpt2",
            **common,
            "n_positions": config.block_size,
            "n_embd": config.n_embd,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": config.mlp_hidden or None,
            "activation_function": HF_ACTIVATIONS[config.activation],
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
            "layer_norm_epsilon": config.norm_eps,
        }
    return {
        "model_type": "llama",
        **common,
        "hidden_size": config.n_embd,
        "intermediate_size": swiglu_hidden(config),
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta (and without it silently
        # takes 10000), so both are written.
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": config.dropout,
    }


def _refuse(source: str, what: str) -> None:
    raise UserError(f"{source}: {what} is not supported; only plain GPT-2 and Llama models load")


def from_hf_config(hf: dict, source: str) -> ModelConfig:
    """Our ModelConfig for a transformers config.json; options we cannot reproduce are refused."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise UserError(
            f"{source} holds a {model_type!r} model; supported are {', '.join(SUPPORTED)} "
            "(GPT2LMHeadModel, LlamaForCausalLM)"
        )
    missing = [key for key in REQUIRED_KEYS[model_type] if key not in hf]
    if missing:
        raise UserError(
            f"{source}: config.json lacks {', '.join(missing)}; it is not a complete "
            f"{model_type} config (restore the file or use another model)"
        )
    if model_type == "gpt2":
        activation = hf.get("activation_function", "gelu_new")
        if activation not in FROM_HF_ACTIVATIONS:
            _refuse(source, f"activation_function {activation!r}")
        for key, wanted in (
            ("scale_attn_weights", True),
            ("scale_attn_by_inverse_layer_idx", False),
            ("add_cross_attention", False),
        ):
            if hf.get(key, wanted) != wanted:
                _refuse(source, f"{key}={hf[key]}")
        config = ModelConfig(
            arch="gpt",
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            block_size=hf["n_positions"],
            vocab_size=hf["vocab_size"],
            dropout=hf.get("resid_pdrop", 0.0),
            bias=True,
            tie_embeddings=hf.get("tie_word_embeddings", True),
            mlp_hidden=hf.get("n_inner") or 0,
            activation=FROM_HF_ACTIVATIONS[activation],
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        )
    else:
        rope = hf.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default" or hf.get("rope_scaling"):
            _refuse(source, f"RoPE scaling {hf.get('rope_scaling') or rope_type!r}")
        for key, wanted in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
            if hf.get(key, wanted) != wanted:
                _refuse(source, f"{key}={hf[key]!r}")
        n_head = hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, hf["hidden_size"] // n_head):
            _refuse(source, f"head_dim {hf['head_dim']} other than hidden_size / heads")
        config = ModelConfig(
            arch="llama",
            n_layer=hf["num_hidden_layers"],
            n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head,
            n_embd=hf["hidden_size"],
            block_size=hf["max_position_embeddings"],
            vocab_size=hf["vocab_size"],
            dropout=hf.get("attention_dropout", 0.0),
            bias=False,
            tie_embeddings=hf.get("tie_word_embeddings", False),
            mlp_hidden=hf["intermediate_size"],
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
        )
    if (hf.get("architectures") or [""])[0] == CLASSIFIERS[model_type]:
        if hf.get("pad_token_id") is None:
            _refuse(source, "a classifier without pad_token_id")
        config.labels, config.pad_token_id = label_names(hf), hf["pad_token_id"]
    for name, kind in typing.get_type_hints(ModelConfig).items():
        value = getattr(config, name)
        kinds = (int, float) if kind is float else typing.get_origin(kind) or kind
        wrong = not isinstance(value, kinds) or (isinstance(value, bool) and kind is not bool)
        if wrong or (kinds is list and not all(isinstance(item, str) for item in value)):
            raise UserError(
                f"{source}: config.json gives {name} the value {value!r}, not a "
                f"{kind.__name__}; restore the file or use another model"
            )
    if config.problems():
        raise UserError(f"{source}: {config.problems()[0]}")
    return config


def label_names(hf: dict) -> list[str]:
    """A transformers classifier's class names, by class id (from config.json's id2label)."""
    id2label = hf.get("id2label") or {}
    return [id2label.get(str(i), id2label.get(i, f"LABEL_{i}")) for i in range(len(id2label))]


def unpickling_cause(error: Exception) -> str:
    """The cause in torch's refusal to unpickle a file with weights_only=True, without the
    advice that follows it in torch's message (to load it with weights_only=False, which would
    run whatever code the file holds)."""
    lines = str(error).strip().splitlines() or ["unreadable"]
    cause = next((line for line in lines if "Unsupported" in line), lines[0])
    return cause.strip().removeprefix("WeightsUnpickler error: ").split(". ")[0]


def load_pickled_weights(path: Path) -> dict[str, Tensor]:
    """A PyTorch .bin file of tensors, read with weights_only=True: nothing else is unpickled."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(
            f"refusing to load {path}: it is corrupt or holds more than tensors "
            f"({unpickling_cause(error)})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"refusing to load {path}: it does not hold a dict of tensors")
    return state


def load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as error:
        raise UserError(
            f"{path} is truncated or corrupt ({error}); download or copy the model again"
        ) from None


def read_hf_weights(directory: Path) -> dict[str, Tensor]:
    """All weights of a transformers model directory: safetensors (maybe sharded) or, failing
    that, PyTorch .bin files read with weights_only=True (no code is unpickled)."""
    for single, index, load in (
        ("model.safetensors", "model.safetensors.index.json", load_safetensors),
        ("pytorch_model.bin", "pytorch_model.bin.index.json", load_pickled_weights),
    ):
        if (directory / single).is_file():
            return load(directory / single)
        if (directory / index).is_file():
            try:
                weight_map = json.loads((directory / index).read_text())["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise UserError(
                    f"{directory / index} is corrupt; download or copy the model again"
                ) from None
            state = {}
            for shard in shards:
                state.update(load(directory / shard))
            return state
    raise UserError(f"{directory} has no model.safetensors or pytorch_model.bin weights")


def download(name: str) -> Path:
    """A hub model's directory (config, tokenizer, weights) in the local Hugging Face cache."""
    from huggingface_hub import snapshot_download

    try:
        directory = Path(
            snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt"])
        )
        if not any(directory.glob("*.safetensors")):
            directory = Path(
                snapshot_download(name, allow_patterns=["*.json", "*.txt", "pytorch_model*.bin"])
            )
    except Exception as error:  # offline, unknown name, gated model, ...
        raise UserError(
            f"checkpoint {name} does not exist here and could not be downloaded from the Hugging "
            f"Face hub ({error.__class__.__name__}); check the path, the name and the network"
        ) from None
    return directory
