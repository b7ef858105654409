"""Sharded training (FSDP2 through Accelerate) on a CPU with two gloo processes: it really shards,
trains like one process at the same global batch, exports whole Hugging Face checkpoints, resumes
with another number of processes; activation checkpointing changes nothing but memory; and every
launch that would not shard, or would not share its run directory, is refused in one line."""

import copy
import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, TINY_MODEL, mixture_option, read_metrics, run_script
from gptlab import sharding
from gptlab.checkpoints import load_checkpoint
from gptlab.config import Config
from gptlab.errors import UserError
from gptlab.snapshots import batch_changes, verify_snapshot
from gptlab.storage import MANIFEST_FILE, sha256_of
from models import ModelConfig, build_model

FSDP = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "OMP_NUM_THREADS": "1"}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# Training is float32 throughout: sums over 2 shards or 2 processes differ from one process's sums
# only in their order, which moves losses by about 1e-6 relative here.
TOLERANCE = 1e-5


def adder_args(adder_dir, out_dir, *extra: str) -> list[str]:
    """A tiny 2-layer adder run of 10 steps, snapshots at steps 5 and 10."""
    return [
        "--config",
        str(REPO / "configs/adder.json"),
        *TINY_MODEL,
        "--model.n_layer=2",
        f"--data.dir={adder_dir}",
        "--data.eval_samples=64",
        "--data.exact_match_samples=16",
        f"--out_dir={out_dir}",
        "--max_steps=10",
        "--macro_batch_steps=5",
        "--log_interval=1",
        "--keep_best=2",
        *extra,
    ]


def curve(run_dir, key: str) -> list:
    return [event[key] for event in read_metrics(run_dir) if key in event]


def messages(run_dir) -> list[str]:
    return curve(run_dir, "message")


def resume_copy(run_dir, tmp_path, name: str):
    """A copy of a finished run without its last snapshot: it resumes from step 5."""
    copy_dir = tmp_path / name
    shutil.copytree(run_dir, copy_dir, symlinks=True)
    shutil.rmtree(copy_dir / "snapshots" / "step-00000010")
    return copy_dir


# ----------------------------------------------------------------------------------------------
# In one process: activation checkpointing, the global-batch rule


def test_activation_checkpointing_changes_no_number_even_with_dropout():
    torch.manual_seed(0)
    plain = build_model(ModelConfig(vocab_size=30, n_layer=2, n_head=2, n_embd=32, dropout=0.2))
    checkpointed = copy.deepcopy(plain)
    sharding.checkpoint_activations(checkpointed)
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()  # same names saved
    tokens = torch.randint(0, 30, (4, 16))
    losses = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same dropout masks, replayed in the recomputation
        loss = model(tokens, tokens)
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for a, b in zip(plain.parameters(), checkpointed.parameters()):
        assert torch.equal(a.grad, b.grad)
    checkpointed.eval()
    with torch.no_grad():  # evaluation runs the blocks as they are
        assert torch.equal(plain.eval()(tokens), checkpointed(tokens))


def test_a_resume_may_change_processes_only_if_the_global_batch_stays():
    config = asdict(Config())
    with_accum = copy.deepcopy(config)
    with_accum["grad_accum"]["peak"] = 2
    doubled = {**config, "batch_size": 2 * config["batch_size"]}
    assert batch_changes(config, config, 2, 2) == ([], [])
    assert batch_changes(config, doubled, 2, 1) == ([], ["batch_size 12 -> 24", "processes 2 -> 1"])
    assert batch_changes(config, with_accum, 2, 1)[0] == []  # 12 x 1 x 2 = 12 x 2 x 1
    breaking, _ = batch_changes(config, config, 2, 1)
    assert breaking[0].startswith("global batch 12 x 1 x 2 -> 12 x 1 x 1")
    growing = copy.deepcopy(config)
    growing["grad_accum"].update(begin=1, peak=4, warmup=0.5)
    halved = copy.deepcopy(growing)
    halved["grad_accum"].update(begin=2, peak=8)  # x2 and rounded: not the same batches
    assert batch_changes(growing, halved, 2, 1)[0]
    assert batch_changes(growing, {**growing, "batch_size": 24}, 2, 1)[0] == []


# ----------------------------------------------------------------------------------------------
# Two gloo processes: the shards themselves

SHARD_REPORT = """
import json, sys
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.distributed.fsdp import FSDPModule
from gptlab import sharding
from gptlab.config import Config
from gptlab.errors import let_collective_threads_finish
from models import ModelConfig, build_model, optimizer_groups

accelerator = Accelerator()
config = Config(activation_checkpointing=True)
sharding.configure(accelerator, config)
report = {}
for arch, tied in (("gpt", True), ("llama", False)):
    torch.manual_seed(0)
    model = build_model(ModelConfig(
        arch=arch, vocab_size=51, n_layer=2, n_head=2, n_embd=32, block_size=16,
        tie_embeddings=tied,
    ))
    whole = {name: list(p.shape) for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(optimizer_groups(model, 0.1))
    model, optimizer = sharding.prepare(accelerator, model, optimizer, config)
    clean = lambda name: name.replace("._checkpoint_wrapped_module", "")
    moments = {id(p): optimizer.optimizer.state[p]["exp_avg"] for p in model.parameters()}
    report[arch] = {
        "whole": whole,
        "local": {clean(n): list(sharding.local(p).shape) for n, p in model.named_parameters()},
        "moments": {
            clean(n): list(sharding.local(moments[id(p)]).shape)
            for n, p in model.named_parameters()
        },
        "placements": sorted({str(p.placements) for p in model.parameters()}),
        # The FSDP units that own parameters, and how many (an empty unit gathers nothing).
        "units": {
            clean(name) or "(root)": len(group.fsdp_params)
            for name, m in model.named_modules()
            if isinstance(m, FSDPModule)
            and (group := m._get_fsdp_state()._fsdp_param_group) is not None
        },
        "tied": model.lm_head.weight is model.wte.weight,
        "describe": sharding.describe(accelerator, config),
    }
reports = gather_object([report])
if accelerator.is_main_process:
    open(sys.argv[1], "w").write(json.dumps(reports))
accelerator.wait_for_everyone()  # and leave as the scripts do (see run_cli)
accelerator.end_training()
let_collective_threads_finish()
"""


@pytest.mark.slow
def test_fsdp_on_cpu_really_shards_every_block_weights_and_optimizer_state(tmp_path):
    script = tmp_path / "shards.py"
    script.write_text(SHARD_REPORT)
    run_script(str(script), str(tmp_path / "report.json"), cwd=tmp_path, processes=2, env=FSDP)
    ranks = json.loads((tmp_path / "report.json").read_text())
    # One unit per block, the final norm (Accelerate's doing), and the root: the embeddings and
    # the output layer (GPT: token and position embeddings, the output layer tied; Llama: the
    # token embedding and an untied output layer).
    blocks = {"blocks.0": 12, "blocks.1": 12}
    assert ranks[0]["gpt"]["units"] == {"(root)": 2, **blocks, "ln_f": 2}
    assert ranks[0]["llama"]["units"] == {"(root)": 2, "blocks.0": 7, "blocks.1": 7, "norm_f": 1}
    for arch in ("gpt", "llama"):
        zero, one = ranks[0][arch], ranks[1][arch]
        assert zero["placements"] == ["(Shard(dim=0),)"]
        assert (
            zero["tied"] is (arch == "gpt")
            and "FSDP2, each block sharded over 2" in zero["describe"]
        )
        assert zero["local"].keys() == zero["whole"].keys()
        for name, shape in zero["whole"].items():
            halves = [zero["local"][name], one["local"][name]]
            # Each process holds its own rows: the first ceil(n/2), the rest on the other.
            assert halves[0][0] == -(-shape[0] // 2) and halves[0][0] + halves[1][0] == shape[0]
            assert halves[0][1:] == halves[1][1:] == shape[1:], name
            assert zero["moments"][name] == halves[0] and one["moments"][name] == halves[1]


# ----------------------------------------------------------------------------------------------
# Two gloo processes: training, checkpoints, snapshots


@pytest.fixture(scope="module")
def runs(adder_dir, tmp_path_factory):
    """One process with batch 32, and FSDP over two processes with batch 16 each."""
    work = tmp_path_factory.mktemp("sharding")
    run_script(
        "train.py",
        *adder_args(adder_dir, work / "one", "--batch_size=32"),
        cwd=work,
        env=ONE_THREAD,
    )
    run_script(
        "train.py",
        *adder_args(adder_dir, work / "fsdp", "--batch_size=16"),
        cwd=work,
        processes=2,
        env=FSDP,
    )
    return work


@pytest.mark.slow
def test_fsdp_trains_like_one_process_at_the_same_global_batch(runs):
    one, fsdp = runs / "one", runs / "fsdp"
    assert any("FSDP2, each block sharded over 2" in m for m in messages(fsdp))
    assert len(curve(one, "train_loss")) == 10 and curve(one, "tokens") == curve(fsdp, "tokens")
    for key in ("train_loss", "grad_norm", "val_loss", "val_exact_match"):
        assert curve(fsdp, key) == pytest.approx(curve(one, key), rel=TOLERANCE), key
    whole = load_checkpoint(one / "latest").model.state_dict()
    gathered = load_checkpoint(fsdp / "latest").model.state_dict()
    for name, weight in whole.items():
        torch.testing.assert_close(gathered[name], weight, rtol=TOLERANCE, atol=1e-6)


@pytest.mark.slow
def test_a_sharded_run_exports_a_checkpoint_transformers_loads_with_equal_logits(runs):
    from transformers import AutoModelForCausalLM

    latest = runs / "fsdp" / "latest"
    assert sorted(p.name for p in latest.iterdir() if p.suffix == ".safetensors") == [
        "model.safetensors"
    ]
    ours = load_checkpoint(latest).model
    theirs = AutoModelForCausalLM.from_pretrained(latest).eval()
    tokens = torch.randint(0, ours.config.vocab_size, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_sharded_snapshot_holds_every_process_shards_and_refuses_a_planted_pickle(runs, tmp_path):
    snapshot = runs / "fsdp" / "snapshots" / "step-00000010"
    state = verify_snapshot(snapshot)
    assert state["sharding"] == "fsdp" and state["num_processes"] == 2
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (snapshot / part).iterdir()) == [
            ".metadata",
            "__0_0.distcp",
            "__1_0.distcp",
        ]
    assert not (snapshot / "model.safetensors").exists()
    planted = tmp_path / "planted"
    shutil.copytree(snapshot, planted)
    metadata = planted / "optimizer_0" / ".metadata"
    metadata.write_bytes(pickle.dumps(subprocess.Popen))  # runs a program when unpickled
    manifest = json.loads((planted / MANIFEST_FILE).read_text())
    manifest["files"]["optimizer_0/.metadata"] = sha256_of(metadata)  # even with a valid manifest
    (planted / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"refusing to unpickle .*\.metadata.*subprocess\.Popen"):
        verify_snapshot(planted)


@pytest.mark.slow
def test_snapshots_resume_with_another_number_of_processes_at_the_same_global_batch(
    runs, adder_dir, mixture_dirs, tmp_path
):
    # FSDP over 2 processes -> FSDP in 1 process with twice the batch.
    resumed = resume_copy(runs / "fsdp", tmp_path, "fsdp_to_one")
    args = adder_args(adder_dir, resumed, "--batch_size=32")
    run_script("train.py", *args, cwd=tmp_path, env=FSDP, torchrun=True)
    said = [m for m in messages(resumed) if m.startswith("resumed from")]
    assert "at step 5" in said[0] and "processes 2 -> 1" in said[0]
    for key in ("train_loss", "val_loss"):
        assert curve(resumed, key) == pytest.approx(curve(runs / "fsdp", key), rel=TOLERANCE)

    # Not from a sharded snapshot into an unsharded run (a changed global batch is refused too:
    # see test_a_resume_may_change_processes_only_if_the_global_batch_stays).
    again = resume_copy(runs / "fsdp", tmp_path, "refused")
    unsharded = run_script(
        "train.py", *adder_args(adder_dir, again, "--batch_size=32"), cwd=tmp_path, check=False
    )
    assert unsharded.returncode == 2 and "sharding fsdp -> none" in unsharded.stderr

    # DDP over 2 processes on a mixture of two text sets (with activation checkpointing) -> 1
    # process accumulating 2 batches: the mixture's order is a function of the global position
    # alone, so the resumed run draws the same samples from each source in the same steps.
    mixture = [mixture_option(*mixture_dirs), "--activation_checkpointing=true"]

    def mixture_args(out_dir, *extra):
        args = adder_args(adder_dir, out_dir, *mixture, "--data.eval_samples=16", *extra)
        return [a for a in args if not a.startswith("--data.dir=")]

    ddp = tmp_path / "ddp"
    run_script(
        "train.py",
        *mixture_args(ddp, "--batch_size=16"),
        cwd=tmp_path,
        processes=2,
        env=ONE_THREAD,
    )
    assert any("DDP (whole model on every process) | activation" in m for m in messages(ddp))
    single = resume_copy(ddp, tmp_path, "ddp_to_one")
    args = mixture_args(single, "--batch_size=16", "--grad_accum.peak=2")
    run_script("train.py", *args, cwd=tmp_path, env=ONE_THREAD)
    assert any("processes 2 -> 1" in m for m in messages(single))
    names = [d.name for d in mixture_dirs]
    for key in ("train_loss", "val_loss", *(f"tokens/{n}" for n in names)):
        assert curve(single, key) == pytest.approx(curve(ddp, key), rel=TOLERANCE), key


# ----------------------------------------------------------------------------------------------
# Refusals: sharding asked for that would not happen; a run directory the machines do not share


@pytest.mark.parametrize(
    "env, config, expected",
    [
        (FSDP, Config(), "FSDP was asked for in a single process without a process group"),
        ({**FSDP, "FSDP_VERSION": "1"}, Config(), "FSDP version 1 was asked for"),
        ({**FSDP, "ACCELERATE_USE_FSDP": "ture"}, Config(), "ACCELERATE_USE_FSDP='ture' is"),
        (ONE_THREAD, Config(fsdp_reduce_dtype="bf16"), "fsdp_reduce_dtype=bf16 applies to FSDP"),
        # torchrun on a CPU without ACCELERATE_USE_CPU=true: each process would run on its own.
        ({**FSDP, "WORLD_SIZE": "2"}, Config(), "2 processes were launched but each runs"),
    ],
)
def test_sharding_that_would_not_happen_is_refused(env, config, expected, monkeypatch):
    for name in ("WORLD_SIZE", "ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # What `configure` asks of a single process's Accelerator, without starting one.
    single = SimpleNamespace(num_processes=1, state=SimpleNamespace(fsdp_plugin=None))
    assert not torch.distributed.is_initialized()
    with pytest.raises(UserError, match=re.escape(expected)):
        sharding.configure(single, config)


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"state_dict_type": "FULL_STATE_DICT"}, "fsdp_state_dict_type must be SHARDED_STATE_DICT"),
        ({"auto_wrap_policy": "SIZE_BASED_WRAP"}, "sharded per transformer block"),
        (
            {
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "transformer_cls_names_to_wrap": ["MLP"],
            },
            "sharded per transformer block",
        ),
        ({"cpu_ram_efficient_loading": True}, "would untie tied embeddings"),
    ],
)
def test_accelerate_fsdp_options_that_cannot_be_honoured_are_refused(
    options, expected, monkeypatch
):
    from accelerate.utils import FullyShardedDataParallelPlugin

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # the plugin writes it back
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, **options)
    with pytest.raises(UserError, match=expected):
        sharding.refuse_unsupported_options(plugin)
    usual = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="TRANSFORMER_BASED_WRAP",
        transformer_cls_names_to_wrap="Block",
        cpu_ram_efficient_loading=False,
    )
    sharding.refuse_unsupported_options(usual)  # the shipped configuration passes


def launch_node(node_rank: int, cwd, port: int, args: list[str]) -> subprocess.Popen:
    """One 'machine' of a two-node run: torchrun with one process, in its own directory."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        f"--node_rank={node_rank}",
        "--nproc_per_node=1",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        str(REPO / "train.py"),
        *args,
    ]
    env = {"PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "ACCELERATE_USE_CPU": "true"}
    return subprocess.Popen(
        command,
        cwd=cwd,
        env={**os.environ, **env, **ONE_THREAD},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_a_two_node_run_without_a_shared_run_directory_is_refused_before_writing(
    adder_dir, tmp_path
):
    # Two "machines" on this one: each resolves the relative out_dir in its own directory, as
    # two machines with their own disks would.
    args = adder_args(adder_dir, "out/run", "--max_steps=4", "--macro_batch_steps=2")
    roots = [tmp_path / "node0", tmp_path / "node1"]
    for root in roots:
        root.mkdir()
    port = free_port()
    nodes = [launch_node(rank, root, port, args) for rank, root in enumerate(roots)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs):
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert node.returncode != 0 and len(errors) == 1, stderr
        assert "the run directory out/run is not shared by all processes" in errors[0]
        assert "process 1 on" in errors[0]
    assert [list(root.iterdir()) for root in roots] == [[], []]  # nothing written

    # The same two nodes sharing one directory train together.
    shared = tmp_path / "shared"
    shared.mkdir()
    port = free_port()
    nodes = [launch_node(rank, shared, port, args) for rank in range(2)]
    for node in nodes:
        _, stderr = node.communicate(timeout=600)
        assert node.returncode == 0, stderr
    assert curve(shared / "out/run", "step")[-1] == 4
    assert any("2 process(es)" in m for m in messages(shared / "out/run"))


@pytest.mark.slow
def test_the_benchmark_reports_each_process_memory_with_checkpointing_on_and_off(
    shakespeare_dir, tmp_path
):
    output = tmp_path / "memory.json"
    args = ["--config", str(REPO / "configs/shakespeare_cpu.json"), f"--data.dir={shakespeare_dir}"]
    result = run_script(
        "benchmark.py",
        *args,
        "--memory",
        "--output",
        str(output),
        cwd=tmp_path,
        processes=2,
        env=FSDP,
    )
    report = json.loads(output.read_text())
    assert report["layout"] == "FSDP2" and [p["process"] for p in report["processes"]] == [0, 1]
    whole = build_model(
        ModelConfig(
            **json.loads((REPO / "configs/shakespeare_cpu.json").read_text())["model"],
            vocab_size=65,
        )
    )
    weights = sum(p.numel() * 4 for p in whole.parameters()) / 2**20
    for process in report["processes"]:  # half the weights each, Adam's two moments as much again
        assert process["weights_mib"] == pytest.approx(weights / 2, rel=0.02)
        assert process["optimizer_mib"] == pytest.approx(weights, rel=0.02)
        assert process["step_peak_mib"] > 0 and process["step_peak_checkpointing_mib"] > 0
    assert "with activation checkpointing" in result.stdout and "saves" in result.stdout
