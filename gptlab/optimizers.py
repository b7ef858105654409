"""The optimizer of a run: AdamW, or Muon for the blocks' weight matrices with AdamW for the rest.

Muon orthogonalises the momentum of each weight matrix with a Newton-Schulz iteration, which suits
the hidden matrices of the blocks; embeddings, the output layer, norms and biases stay with AdamW,
as in modded-nanogpt and nanochat. Both run inside one torch Optimizer, so
Accelerate prepares, clips, scales and saves it like plain AdamW (one optimizer.bin per snapshot),
and checkpoints hold only the model: a Muon run and an AdamW run save the same files.

Every parameter group carries its own `lr_scale`: its learning rate is the lr schedule's value
times that (1 for AdamW, optim.muon_lr_scale for Muon), so one schedule drives every group. Weight
decay means the same everywhere: each decayed weight shrinks by lr x weight_decay per step, so a
group's weight_decay is the schedule's divided by its lr_scale (torch multiplies it by the lr).
"""

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from gptlab.config import Config, OptimConfig
from gptlab.errors import UserError
from models import optimizer_groups


class Muon(torch.optim.Muon):
    """torch.optim.Muon (same options, state and update), orthogonalising in float32 on a CPU.

    torch's step runs the Newton-Schulz iteration in bfloat16, which a CPU without bfloat16
    matrix units (AVX2 only, as on our machines) multiplies about 14x slower than float32: the
    step of a 0.8M-parameter model took longer than its forward and backward. GPUs keep bfloat16.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, momentum_buffers = [], [], []
            self._init_group(group, params, grads, momentum_buffers)
            if not params:
                continue
            momentum = group["momentum"]
            torch._foreach_lerp_(momentum_buffers, grads, 1 - momentum)
            updates = (
                torch._foreach_lerp(grads, momentum_buffers, momentum)
                if group["nesterov"]
                else momentum_buffers
            )
            # Matrices of one shape (a tall one transposed) are orthogonalised together in one
            # batched iteration: on a CPU the step takes about a fifth less time than one at a time.
            for batch in batches_of_one_shape(params):
                wide = [updates[i].T if is_tall(params[i]) else updates[i] for i in batch]
                dtype = orthogonalisation_dtype(params[batch[0]].device)
                orthogonal = orthogonalise(torch.stack(wide).to(dtype), group)
                for i, update in zip(batch, orthogonal):
                    param = params[i]
                    update = update.T if is_tall(param) else update
                    step_size = group["lr"] * shape_scale(param, group)
                    param.mul_(1 - group["lr"] * group["weight_decay"])
                    param.add_(update.to(param.dtype), alpha=-step_size)
        return loss


def is_tall(matrix: torch.Tensor) -> bool:
    return matrix.size(0) > matrix.size(1)


def batches_of_one_shape(params: list[torch.Tensor]) -> list[list[int]]:
    """Indices of the parameters grouped by shape, a matrix and its transpose counting as one."""
    batches: dict[tuple[int, int], list[int]] = {}
    for i, param in enumerate(params):
        batches.setdefault(tuple(sorted(param.shape)), []).append(i)
    return list(batches.values())


def orthogonalisation_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def shape_scale(param: torch.Tensor, group: dict) -> float:
    """torch's adjust_lr_fn: "original" (Keller Jordan's, the default) scales the update of a tall
    matrix by sqrt(rows / columns); "match_rms_adamw" (Moonshot's) by 0.2 sqrt(max(rows, columns))."""
    rows, columns = param.shape
    if group["adjust_lr_fn"] == "match_rms_adamw":
        return 0.2 * max(rows, columns) ** 0.5
    return max(1.0, rows / columns) ** 0.5


def orthogonalise(matrices: torch.Tensor, group: dict) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration on a batch of wide matrices (rows <= columns): about
    U V^T of each one's SVD U S V^T."""
    a, b, c = group["ns_coefficients"]
    norms = matrices.norm(dim=(-2, -1), keepdim=True)
    x = matrices / norms.clamp(min=group["eps"])  # spectral norm at most 1
    for _ in range(group["ns_steps"]):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on the groups marked `muon`, torch's AdamW on the others.

    The two inner optimizers work on this optimizer's own groups and state (the state is keyed by
    parameter, so they never collide); state_dict and load_state_dict are the base class's.
    """

    def __init__(self, muon_groups: list[dict], adamw_groups: list[dict], muon: dict, adamw: dict):
        self.muon = Muon([{**g, "muon": True} for g in muon_groups], **muon)
        self.adamw = torch.optim.AdamW([{**g, "muon": False} for g in adamw_groups], **adamw)
        super().__init__(self.muon.param_groups + self.adamw.param_groups, {})
        self._share_groups_and_state()

    def _share_groups_and_state(self) -> None:
        self.muon.param_groups = [g for g in self.param_groups if g["muon"]]
        self.adamw.param_groups = [g for g in self.param_groups if not g["muon"]]
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share_groups_and_state()  # loading put new group and state objects in place


def block_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weight matrices of the transformer blocks: what Muon optimises."""
    return [p for p in model.blocks.parameters() if p.requires_grad and p.dim() == 2]


def build_optimizer(
    model: nn.Module, options: OptimConfig, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW over every parameter (weight decay on matrices and embeddings), or with options.name
    "muon" Muon over the blocks' matrices and AdamW over the rest. Groups carry lr_scale and decay."""
    adamw = {
        "lr": lr,
        "betas": (options.beta1, options.beta2),
        "eps": options.eps,
        "fused": torch.cuda.is_available(),
    }
    decayed, not_decayed = optimizer_groups(model, weight_decay)
    decayed.update(lr_scale=1.0, decay=True)
    not_decayed.update(lr_scale=1.0, decay=False)
    if options.name == "adamw":
        optimizer = torch.optim.AdamW([decayed, not_decayed], **adamw)
    else:
        matrices = block_matrices(model)
        in_muon = {id(p) for p in matrices}
        decayed["params"] = [p for p in decayed["params"] if id(p) not in in_muon]
        scale = options.muon_lr_scale
        muon_group = {
            "params": matrices,
            "lr": lr * scale,
            "weight_decay": weight_decay / scale,
            "lr_scale": scale,
            "decay": True,
        }
        muon = {
            "momentum": options.muon_momentum,
            "nesterov": True,
            "ns_steps": options.muon_ns_steps,
        }
        optimizer = MuonWithAdamW([muon_group], [decayed, not_decayed], muon, adamw)
    optimizer.register_load_state_dict_pre_hook(keep_group_settings)
    return optimizer


def keep_group_settings(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """Loading a snapshot replaces the groups with the saved ones: keep the live settings (our
    lr_scale and decay, betas, Muon's momentum and ns_steps...), which come from this run's config,
    so that a setting changed on resume takes effect as the log says; lr and weight decay are set
    from the schedules before every step anyway. Only the saved parameter ids are kept."""
    for live, saved in zip(optimizer.param_groups, state_dict["param_groups"]):
        saved.update({key: value for key, value in live.items() if key != "params"})
    return state_dict


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set every group's learning rate and weight decay from the schedules' values."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
        group["weight_decay"] = weight_decay / group["lr_scale"] if group["decay"] else 0.0


def check_optimizer_supported(config: Config, accelerator: Accelerator) -> None:
    """Muon orthogonalises whole weight matrices: FSDP, which shards them over processes, would
    orthogonalise the pieces, so that combination is refused."""
    if config.optim.name == "muon" and accelerator.distributed_type == DistributedType.FSDP:
        raise UserError(
            "optim.name muon does not run under FSDP (Muon needs every weight matrix whole, "
            "FSDP shards them); use optim.name adamw with FSDP, or Muon with DDP"
        )
