"""Sharded training (FSDP2) through Accelerate, on GPUs and on CPUs, and activation checkpointing.

FSDP is asked for the way Accelerate asks for it: `accelerate launch --config_file
configs/accelerate/fsdp.yaml train.py ...`, or ACCELERATE_USE_FSDP=true FSDP_VERSION=2 in the
environment of torchrun. Every transformer block is then its own FSDP2 unit (`fully_shard`): each
process keeps 1/N of every parameter, of its gradient and of its optimizer state, and gathers a
block's weights only while that block runs. Accelerate makes the final norm a unit of its own;
the token embedding and the output layer (one matrix when tied, so the tie holds) form the root.

What this module adds to Accelerate (1.15):
- On CPU, Accelerate turns FSDP into DDP without a word (distributed type MULTI_CPU). torch's
  fully_shard runs on gloo, so `configure` switches Accelerate to its FSDP2 path there too, and the
  CPU tests run the code that GPUs run.
- Every case where sharding was asked for and would not happen is refused with one line, and so
  are the Accelerate FSDP options a run here cannot honour.
- Mixed precision computes in bf16/fp16 but reduces gradients in fp32 (Accelerate's default
  reduces them in the compute precision), unless `fsdp_reduce_dtype` says otherwise.
- Activation checkpointing per block, for DDP and FSDP alike, replaying the RNG state so that
  dropout draws the same masks when a block is recomputed (Accelerate's own does not).
- The whole weights of a sharded model, gathered for a checkpoint.
"""

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import (
    DistributedType,
    FullyShardedDataParallelPlugin,
    broadcast_object_list,
    str_to_bool,
)
from torch import nn

from gptlab.config import Config
from gptlab.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (accelerate launch with an FSDP config sets this)."""
    value = os.environ.get("ACCELERATE_USE_FSDP", "false") or "false"
    try:
        return bool(str_to_bool(value))
    except ValueError:  # a misspelt flag must not quietly mean DDP
        raise UserError(
            f"ACCELERATE_USE_FSDP={value!r} is neither true nor false: set it to true or false"
        ) from None


def configure(accelerator: Accelerator, config: Config) -> None:
    """Check that the processes run as they were launched and, if FSDP was asked for, set
    Accelerate up to shard (or refuse). Call right after creating the Accelerator."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        raise UserError(
            f"{launched} processes were launched but each runs on its own: on a CPU start them "
            f"with ACCELERATE_USE_CPU=true torchrun --nproc_per_node {launched} (see the README)"
        )
    if not fsdp_requested():
        if config.fsdp_reduce_dtype != "fp32":
            raise UserError(
                f"fsdp_reduce_dtype={config.fsdp_reduce_dtype} applies to FSDP runs only; drop it "
                "or launch with --config_file configs/accelerate/fsdp.yaml"
            )
        return
    plugin = getattr(accelerator.state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise UserError(
            f"FSDP version {plugin.fsdp_version} was asked for; training here shards with FSDP2: "
            "set fsdp_version: 2 in the Accelerate config (FSDP_VERSION=2)"
        )
    if not torch.distributed.is_initialized():
        raise UserError(
            "FSDP was asked for in a single process without a process group, where nothing "
            "would be sharded; start it with accelerate launch or torchrun (even for 1 process)"
        )
    if accelerator.distributed_type in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        # Accelerate set up DDP: always on CPU, on GPUs when the flag is spelled 1 or yes.
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if not accelerator.is_fsdp2:
        raise UserError(
            f"FSDP was asked for but Accelerate set up {accelerator.distributed_type.value}, "
            "which does not shard; launch with --config_file configs/accelerate/fsdp.yaml"
        )
    refuse_unsupported_options(plugin)
    from torch.distributed.fsdp import MixedPrecisionPolicy

    compute = DTYPES.get(accelerator.mixed_precision)  # None: fp32 weights compute in fp32
    plugin.mixed_precision_policy = MixedPrecisionPolicy(
        param_dtype=compute, reduce_dtype=DTYPES[config.fsdp_reduce_dtype]
    )
    if plugin.activation_checkpointing:  # done by `prepare` instead, with dropout's RNG replayed
        config.activation_checkpointing = True
        plugin.activation_checkpointing = False


def refuse_unsupported_options(plugin: FullyShardedDataParallelPlugin) -> None:
    """Refuse the Accelerate FSDP options a run here cannot honour, all in one line."""
    from torch.distributed.fsdp import StateDictType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    problems = []
    if plugin.state_dict_type != StateDictType.SHARDED_STATE_DICT:
        problems.append(
            "fsdp_state_dict_type must be SHARDED_STATE_DICT (snapshots are saved sharded, "
            "checkpoints whole)"
        )
    if plugin.auto_wrap_policy not in (None, transformer_auto_wrap_policy) or (
        plugin.transformer_cls_names_to_wrap not in (None, ["Block"])
    ):
        problems.append(
            "models here are sharded per transformer block: set fsdp_auto_wrap_policy: "
            "TRANSFORMER_BASED_WRAP and fsdp_transformer_layer_cls_to_wrap: Block"
        )
    if plugin.cpu_ram_efficient_loading:
        problems.append(
            "fsdp_cpu_ram_efficient_loading would untie tied embeddings (every process builds "
            "the model itself here): set it to false"
        )
    if plugin.activation_checkpointing_offload:
        problems.append("fsdp_activation_checkpointing_offload is not supported: set it to false")
    if problems:
        raise UserError("; ".join(problems))


def checkpoint_activations(model: nn.Module) -> None:
    """Wrap every transformer block so that its activations are recomputed in the backward pass
    instead of kept: a block's inputs stay, its insides are dropped. The wrapper replays the RNG
    state (dropout draws the same masks) and keeps the weights' names in state dicts."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block)  # non-reentrant, preserve_rng_state=True


def _run_directly(module: nn.Module, *args, **kwargs):
    return module(*args, **kwargs)


@contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Run wrapped blocks with checkpointing on or off for a while (the benchmark measures the
    memory it saves on one and the same model)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    wrappers = [m for m in model.modules() if isinstance(m, CheckpointWrapper)]
    kept = [wrapper.checkpoint_fn for wrapper in wrappers]
    if not enabled:
        for wrapper in wrappers:
            wrapper.checkpoint_fn = _run_directly
    try:
        yield
    finally:
        for wrapper, checkpoint_fn in zip(wrappers, kept):
            wrapper.checkpoint_fn = checkpoint_fn


def prepare(
    accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, config: Config
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Hand model and optimizer to Accelerate: DDP, or with FSDP one unit per transformer block
    (the optimizer then holds the shards); activation checkpointing first, when asked."""
    block_class = type(model.blocks[0]).__name__
    if config.activation_checkpointing:
        checkpoint_activations(model)
    if accelerator.is_fsdp2:
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        plugin = accelerator.state.fsdp_plugin
        plugin.auto_wrap_policy = transformer_auto_wrap_policy
        plugin.transformer_cls_names_to_wrap = [block_class]
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.is_fsdp2:
        start_optimizer_state(optimizer)
    return model, optimizer


def start_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give a fresh optimizer its state now, as a fresh one. torch.distributed.checkpoint saves
    only a state that exists and makes a missing one by a step with zero gradients at learning
    rate 0, which counts: Adam's first real step would then get the bias correction of the
    second. So take that step here and set the step counts back to 0 (zero moments at step 0
    are exactly what a fresh Adam starts from)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # inside Accelerate's wrapper
    if inner.state:
        return
    rates = [group["lr"] for group in inner.param_groups]
    for group in inner.param_groups:
        group["lr"] = 0.0
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    inner.step()
    inner.zero_grad(set_to_none=True)
    for group, rate in zip(inner.param_groups, rates):
        group["lr"] = rate
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"].zero_()
        elif "step" in state:
            state["step"] = 0


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor that may be sharded (a DTensor); a plain one as it is.
    (Asked by duck typing so that runs without FSDP need not import torch.distributed.tensor.)"""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def all_finite(accelerator: Accelerator, model: nn.Module) -> bool:
    """Whether every weight is finite, each process checking its own shards (collective)."""
    bad = sum(not bool(torch.isfinite(local(p)).all()) for p in model.parameters())
    found = accelerator.reduce(torch.tensor(float(bad), device=accelerator.device), "sum")
    return found.item() == 0


def gathered_weights(
    accelerator: Accelerator, model: nn.Module, wanted: Callable[[], bool]
) -> dict[str, torch.Tensor] | None:
    """For a checkpoint of a sharded model: if the main process wants one (`wanted()`), the whole
    weights gathered onto its CPU (every process takes part); None on the other processes, when
    no checkpoint is wanted, and when the model is not sharded (its own state dict is whole)."""
    if not accelerator.is_fsdp2:
        return None
    decision = [wanted() if accelerator.is_main_process else None]
    broadcast_object_list(decision)
    if not decision[0]:
        return None
    weights = accelerator.get_state_dict(model)  # collective; only the main process gets tensors
    return weights if accelerator.is_main_process else None


def describe(accelerator: Accelerator, config: Config) -> str:
    """How the model is spread over the processes, for the run's log."""
    if accelerator.is_fsdp2:
        policy = accelerator.state.fsdp_plugin.mixed_precision_policy
        reduce = str(policy.reduce_dtype).removeprefix("torch.")
        text = f"FSDP2, each block sharded over {accelerator.num_processes}, gradients reduced in {reduce}"
    elif accelerator.num_processes > 1:
        text = "DDP (whole model on every process)"
    else:
        text = "one process"
    return text + (
        " | activation checkpointing per block" if config.activation_checkpointing else ""
    )
