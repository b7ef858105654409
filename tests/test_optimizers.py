"""Optimizers: Muon for the blocks' matrices with AdamW for the rest, saved and resumed exactly."""

import copy
import io
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from conftest import REPO, TINY_MODEL, read_metrics, run_script
from gptlab import optimizers
from gptlab.config import Config, OptimConfig
from gptlab.errors import UserError
from gptlab.optimizers import apply_schedule, build_optimizer, check_optimizer_supported
from models import ModelConfig, build_model

SMALL = ModelConfig(vocab_size=13, n_layer=2, n_head=2, n_embd=16, block_size=8)


def small_model(arch: str = "gpt", **changes) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**vars(SMALL), "arch": arch, **changes}))


def train(model, optimizer, steps: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, 13, (4, 9), generator=generator)
        (model(tokens[:, :-1], tokens[:, 1:]) / 32).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_our_muon_is_torchs_muon_computed_in_float32_on_a_cpu(monkeypatch):
    """With torch's bfloat16 it gives torch.optim.Muon's weights bit for bit, matrices of one shape
    (or its transpose) orthogonalised in one batch; on a CPU it runs in float32 (torch's bfloat16
    matmuls are an order of magnitude slower there)."""
    torch.manual_seed(0)
    shapes = [(24, 8), (8, 16), (8, 24), (16, 8), (8, 24)]
    ours = [torch.nn.Parameter(torch.randn(*shape)) for shape in shapes]
    assert optimizers.batches_of_one_shape(ours) == [[0, 2, 4], [1, 3]]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for adjust in (None, "match_rms_adamw"):
        ours_optimizer = optimizers.Muon(ours, lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust)
        theirs_optimizer = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust)
        with monkeypatch.context() as patch:
            patch.setattr(optimizers, "orthogonalisation_dtype", lambda device: torch.bfloat16)
            for _ in range(3):
                for mine, torchs in zip(ours, theirs):
                    mine.grad = torch.randn_like(mine)
                    torchs.grad = mine.grad.clone()
                ours_optimizer.step()
                theirs_optimizer.step()
        for mine, torchs in zip(ours, theirs):
            assert mine.equal(torchs)
    assert optimizers.orthogonalisation_dtype(torch.device("cpu")) is torch.float32


def test_orthogonalisation_flattens_the_singular_values():
    torch.manual_seed(0)
    matrix = torch.randn(64, 16) @ torch.diag(torch.logspace(-1, 0, 16))  # 10x apart and more
    group = {"ns_coefficients": (3.4445, -4.775, 2.0315), "ns_steps": 5, "eps": 1e-7}
    before = torch.linalg.svdvals(matrix)
    singular = torch.linalg.svdvals(optimizers.orthogonalise(matrix.T[None], group)[0])
    assert before.max() / before.min() > 10
    assert singular.max() < 1.3 and singular.min() > 0.6  # about 1 (Muon's iteration: 0.7-1.2)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("tie", [True, False])
def test_muon_takes_the_blocks_matrices_and_adamw_everything_else(arch, tie):
    model = small_model(arch, tie_embeddings=tie, bias=arch == "gpt")
    optimizer = build_optimizer(model, OptimConfig(name="muon", muon_lr_scale=20.0), 1e-3, 0.1)
    muon, decayed, not_decayed = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("blocks.") and p.dim() == 2 for p in muon["params"])
    matrices = [n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2]
    assert len(muon["params"]) == len(matrices)
    assert {names[id(p)] for p in decayed["params"]} == {
        n for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("blocks.")
    }  # embeddings and an untied head
    assert all(p.dim() == 1 for p in not_decayed["params"])  # norms and biases
    every = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())

    # Each group's lr is the schedule's times its scale; every decayed weight shrinks by
    # lr x weight_decay per step whatever its optimizer (torch multiplies weight decay by lr).
    apply_schedule(optimizer, lr=2e-3, weight_decay=0.05)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.04, 2e-3, 2e-3])
    shrink = [g["lr"] * g["weight_decay"] for g in optimizer.param_groups]
    assert shrink == pytest.approx([2e-3 * 0.05, 2e-3 * 0.05, 0.0])


def test_adamw_groups_are_the_ones_older_snapshots_hold():
    model = small_model()
    optimizer = build_optimizer(model, OptimConfig(), 1e-3, 0.1)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [len(g["params"]) for g in optimizer.param_groups] == [
        sum(p.dim() >= 2 for p in model.parameters()),
        sum(p.dim() < 2 for p in model.parameters()),
    ]
    # A snapshot written before groups carried lr_scale and decay still loads and schedules.
    train(model, optimizer, 2)
    old = optimizer.state_dict()
    for group in old["param_groups"]:
        del group["lr_scale"], group["decay"]
    fresh = build_optimizer(copy.deepcopy(model), OptimConfig(), 1e-3, 0.1)
    fresh.load_state_dict(old)
    apply_schedule(fresh, lr=5e-4, weight_decay=0.2)
    assert [g["weight_decay"] for g in fresh.param_groups] == [0.2, 0.0]


def test_muon_state_saves_and_loads_so_training_continues_exactly():
    model = small_model()
    options = OptimConfig(name="muon")
    optimizer = build_optimizer(model, options, 1e-3, 0.1)
    train(model, optimizer, 3)
    saved_model = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)  # as Accelerate's save_state does
    train(model, optimizer, 3, seed=1)

    buffer.seek(0)
    resumed = build_optimizer(saved_model, options, 1e-3, 0.1)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.muon.state is resumed.state and resumed.adamw.state is resumed.state
    assert resumed.muon.param_groups[0] is resumed.param_groups[0]
    train(saved_model, resumed, 3, seed=1)
    for mine, reference in zip(saved_model.parameters(), model.parameters()):
        assert mine.equal(reference)


def test_optimizer_settings_changed_on_resume_take_effect():
    model = small_model()
    optimizer = build_optimizer(model, OptimConfig(name="muon"), 1e-3, 0.1)
    train(model, optimizer, 2)
    changed = OptimConfig(name="muon", beta2=0.99, muon_momentum=0.9, muon_ns_steps=3)
    resumed = build_optimizer(copy.deepcopy(model), changed, 1e-3, 0.1)
    resumed.load_state_dict(optimizer.state_dict())
    muon_group, *adamw_groups = resumed.param_groups
    assert (muon_group["momentum"], muon_group["ns_steps"]) == (0.9, 3)
    assert all(group["betas"] == (0.9, 0.99) for group in adamw_groups)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    resumed_params = [p for group in resumed.param_groups for p in group["params"]]
    for param, resumed_param in zip(params, resumed_params):  # moments and momentum come back
        saved, loaded = optimizer.state[param], resumed.state[resumed_param]
        assert saved and all(torch.equal(loaded[key], value) for key, value in saved.items())


def test_muon_lowers_the_loss_of_a_small_model():
    model = small_model()
    optimizer = build_optimizer(model, OptimConfig(name="muon"), 1e-2, 0.0)
    tokens = torch.arange(9).repeat(4, 1) % 13  # a sequence to learn by heart
    before = model(tokens[:, :-1], tokens[:, 1:]).item()
    for _ in range(30):
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model(tokens[:, :-1], tokens[:, 1:]).item() < 0.2 * before


def test_muon_under_fsdp_is_refused_with_a_clear_message():
    config = Config(max_steps=1)
    config.optim.name = "muon"
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    with pytest.raises(UserError, match="muon does not run under FSDP"):
        check_optimizer_supported(config, fsdp)
    check_optimizer_supported(config, SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
    config.optim.name = "adamw"
    check_optimizer_supported(config, fsdp)


def muon_run_args(adder_dir, out_dir, *extra: str) -> list[str]:
    return [
        "--config",
        str(REPO / "configs/adder.json"),
        *TINY_MODEL,
        f"--data.dir={adder_dir}",
        "--data.eval_samples=64",
        "--data.exact_match_samples=0",
        f"--out_dir={out_dir}",
        "--optim.name=muon",
        "--max_steps=10",
        "--macro_batch_steps=5",
        "--log_interval=1",
        "--keep_best=1",
        *extra,
    ]


@pytest.mark.slow
def test_a_muon_run_resumes_exactly_under_ddp_and_saves_adamw_compatible_checkpoints(
    adder_dir, tmp_path
):
    # Two processes with batch 16 train like one with batch 32 (DDP averages Muon's gradients).
    run_script(
        "train.py", *muon_run_args(adder_dir, tmp_path / "one", "--batch_size=32"), cwd=tmp_path
    )
    two = tmp_path / "two"
    run_script(
        "train.py",
        *muon_run_args(adder_dir, two, "--batch_size=16", "--keep_snapshots=2"),
        cwd=tmp_path,
        processes=2,
        env={"OMP_NUM_THREADS": "1"},
    )

    def curve(run, key):
        return [e[key] for e in read_metrics(tmp_path / run) if key in e]

    assert "optimizer muon" in curve("two", "message")[0]
    assert curve("two", "train_loss") == pytest.approx(curve("one", "train_loss"), rel=1e-4)
    assert curve("one", "train_loss")[-1] < curve("one", "train_loss")[0]

    # Resumed from the snapshot halfway, in a fresh directory: the same steps, the same weights.
    resumed = tmp_path / "resumed"
    run_script(
        "train.py",
        *muon_run_args(adder_dir, resumed, "--batch_size=16"),
        f"--resume={two / 'snapshots' / 'step-00000005'}",
        cwd=tmp_path,
        processes=2,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert curve("resumed", "train_loss") == curve("two", "train_loss")[5:]
    final = "snapshots/step-00000010/model.safetensors"
    weights, reference = load_file(resumed / final), load_file(two / final)
    assert all(weights[name].equal(reference[name]) for name in reference)

    # The optimizer is part of the run: switching it on resume is refused...
    refused = run_script(
        "train.py",
        *muon_run_args(adder_dir, tmp_path / "switch", "--batch_size=16", "--max_steps=12"),
        f"--resume={two / 'snapshots' / 'step-00000010'}",
        "--optim.name=adamw",
        cwd=tmp_path,
        processes=2,
        check=False,
    )
    # torchrun exits 1 when a process fails; each process printed the one-line error, exit 2.
    assert refused.returncode != 0 and 'optim.name "muon" -> "adamw"' in refused.stderr
    assert "exitcode  : 2" in refused.stderr
    # ... but its checkpoints are plain models, which an AdamW run starts from.
    run_script(
        "train.py",
        *muon_run_args(adder_dir, tmp_path / "ft", "--batch_size=32", "--max_steps=2"),
        f"--init_from={tmp_path / 'one'}",
        "--optim.name=adamw",
        cwd=tmp_path,
    )
    assert curve("ft", "train_loss")[0] < curve("one", "train_loss")[0]
