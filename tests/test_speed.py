"""What makes runs fast without changing what they compute: CPU threads, batches read ahead with
their real-token count known on the host, the chunked loss, a padded vocabulary, cheap evaluations
during a run with an exact one at its end, and the benchmark on random tokens."""

import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_MODEL, read_metrics, run_script
from gptlab import training
from gptlab.data import EpochSampler, open_split, read_meta
from gptlab.training import BatchReader, fetch_micro_batches, step_target_count
from models import IGNORE_INDEX, ModelConfig, build_model


def fake_accelerator(processes: int = 1, rank: int = 0, device: str = "cpu"):
    return SimpleNamespace(num_processes=processes, process_index=rank, device=torch.device(device))


def test_each_process_gets_its_share_of_the_cores_unless_the_user_chose(monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: setattr(test_state, "threads", n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: test_state.threads)
    monkeypatch.setattr(training.psutil, "cpu_count", lambda logical=True: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    test_state = SimpleNamespace(threads=1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for name in training.LAUNCHER_MARKERS:
        monkeypatch.delenv(name, raising=False)
    assert training.use_cpu_cores(fake_accelerator()).startswith("8 CPU threads per process")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert test_state.threads == 8 and training.use_cpu_cores(fake_accelerator())
    assert test_state.threads == 4  # two processes on this machine: half the cores each

    # `accelerate launch` put OMP_NUM_THREADS=1 there, not the user: its environment lacks it.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    launcher = {"environ": b"PATH=/bin\0HOME=/root\0", "cmdline": b"accelerate\0launch\0"}
    real_read_bytes = training.Path.read_bytes
    monkeypatch.setattr(
        training.Path,
        "read_bytes",
        lambda self: (
            launcher[self.name] if self.parent.name == str(os.getppid()) else real_read_bytes(self)
        ),
    )
    assert not training.user_chose_threads()
    launcher["environ"] += b"OMP_NUM_THREADS=1\0"  # the user's own choice, passed through
    assert training.user_chose_threads()
    test_state.threads = 1
    assert training.use_cpu_cores(fake_accelerator()).endswith("(OMP_NUM_THREADS)")
    assert test_state.threads == 1
    launcher["environ"] = b"PATH=/bin\0"
    launcher["cmdline"] += b"--num_cpu_threads_per_process=3\0"
    assert training.user_chose_threads()
    # Without a launcher the variable is the user's.
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND")
    launcher["cmdline"] = b"bash\0"
    assert training.user_chose_threads()


@pytest.fixture(scope="module")
def adder_split(adder_dir):
    meta = read_meta(adder_dir)
    return open_split(adder_dir, meta, "train", 16, seed=0)


def test_the_steps_real_token_count_is_known_on_the_host_without_asking_other_processes(
    adder_split,
):
    sampler = EpochSampler(adder_split.num_samples, seed=3)
    for position in (0, 40, adder_split.num_samples - 7):  # the last crosses into a new epoch
        counted = 0
        for rank in range(3):
            micro = fetch_micro_batches(
                sampler, adder_split, position, 2, 5, fake_accelerator(3, rank)
            )
            counted += sum(int((y != IGNORE_INDEX).sum()) for _, y in micro)
        assert step_target_count(sampler, adder_split, position, 2, 5, 3) == counted


def test_the_reader_gives_the_batches_of_each_step_and_reads_the_next_ahead(adder_split):
    sampler = EpochSampler(adder_split.num_samples, seed=3)
    accelerator = fake_accelerator(2, 1)
    reader = BatchReader(sampler, adder_split, 4, accelerator)
    position = 0
    for accum in (1, 1, 3, 3, 2):  # a growing then shrinking accumulation: prefetches missed
        batches = reader(position, accum)
        expected = fetch_micro_batches(sampler, adder_split, position, accum, 4, accelerator)
        assert len(batches.micro_batches) == accum
        for (x, y), (ex, ey) in zip(batches.micro_batches, expected):
            assert x.equal(ex) and y.equal(ey)
        assert batches.targets == step_target_count(sampler, adder_split, position, accum, 4, 2)
        position += accum * 4 * 2
    assert reader.pending[0] == (position, 2)  # the next step is being read


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_the_chunked_loss_equals_the_whole_one_with_its_gradients(arch):
    torch.manual_seed(0)
    config = ModelConfig(arch=arch, vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=12)
    whole = build_model(config)
    chunked = build_model(ModelConfig(**{**vars(config), "loss_chunk": 7}))  # 7 does not divide 36
    chunked.load_state_dict(whole.state_dict())
    inputs = torch.randint(0, 50, (3, 12))
    targets = torch.randint(0, 50, (3, 12)).masked_fill(torch.rand(3, 12) < 0.3, IGNORE_INDEX)
    losses = [model(inputs, targets) for model in (whole, chunked)]
    torch.testing.assert_close(losses[1], losses[0])
    for loss in losses:
        loss.backward()
    for (name, a), b in zip(whole.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


def test_no_more_than_one_chunk_of_logits_is_kept_for_the_backward_pass():
    """With a large vocabulary, the chunked loss keeps none of the logits between passes."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=4096, n_layer=1, n_head=2, n_embd=16, block_size=64)
    inputs = torch.randint(0, 4096, (8, 64))
    saved = {}
    for chunk in (0, 64):
        model = build_model(ModelConfig(**{**vars(config), "loss_chunk": chunk}))
        sizes = saved[chunk] = []

        def keep(tensor, sizes=sizes):
            sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            model(inputs, inputs)
    saved = {chunk: max(sizes) for chunk, sizes in saved.items()}
    assert saved[0] >= 8 * 64 * 4096  # the whole batch's logits
    assert saved[64] < 8 * 64 * 4096 / 8


def test_the_vocabulary_is_padded_to_the_multiple_the_config_asks_for(shakespeare_dir):
    from gptlab.config import Config
    from gptlab.tokenizer import Tokenizer

    config = Config(max_steps=1)
    config.model.vocab_multiple = 64
    meta = read_meta(shakespeare_dir)
    model = training.build_model(config, meta, Tokenizer.load(shakespeare_dir), {})
    assert meta["vocab_size"] == 66 and config.model.vocab_size == model.config.vocab_size == 128
    assert model.lm_head.weight.shape[0] == 128


@pytest.mark.slow
def test_cheap_evaluations_during_the_run_and_an_exact_one_at_its_end(shakespeare_dir, tmp_path):
    run_script(
        "train.py",
        *("--config", str(REPO / "configs/shakespeare_cpu.json")),
        f"--data.dir={shakespeare_dir}",
        *("--model.n_layer=1", "--model.n_embd=32", "--model.n_head=2", "--model.block_size=32"),
        "--data.eval_samples=20",
        "--data.final_eval_samples=0",
        "--max_steps=6",
        "--macro_batch_steps=2",
        f"--out_dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    events = [e for e in read_metrics(tmp_path / "run") if "val_loss" in e]
    windows = (111_539 - 1) // 32 - 1  # the whole val split in windows of 32
    assert [e["val_samples"] for e in events] == [20, 20, windows]
    elapsed = [e["elapsed"] for e in events]
    assert 0 < elapsed[0] < elapsed[1] < elapsed[2]
    first = read_metrics(tmp_path / "run")[0]["message"]
    assert "CPU threads per process" in first and "optimizer adamw" in first


@pytest.mark.slow
def test_accelerate_launch_uses_every_core_unless_omp_num_threads_says_otherwise(
    adder_dir, tmp_path
):
    args = [
        "-m",
        "accelerate.commands.launch",
        str(REPO / "train.py"),
        *("--config", str(REPO / "configs/adder.json"), *TINY_MODEL),
        f"--data.dir={adder_dir}",
        *("--max_steps=2", "--macro_batch_steps=2", "--data.exact_match_samples=0"),
    ]
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    env.pop("OMP_NUM_THREADS", None)
    cores = training.psutil.cpu_count(logical=False) or os.cpu_count()
    cores = min(cores, len(os.sched_getaffinity(0)))
    for name, extra_env, expected in (
        ("all", {}, f"{cores} CPU threads per process ({cores} cores"),
        ("user", {"OMP_NUM_THREADS": "1"}, "1 CPU threads per process (OMP_NUM_THREADS)"),
    ):
        out = tmp_path / name
        subprocess.run(
            [sys.executable, *args, f"--out_dir={out}"],
            cwd=tmp_path,
            env={**env, **extra_env},
            check=True,
            capture_output=True,
            timeout=900,
        )
        assert expected in read_metrics(out)[0]["message"]


def test_benchmark_trains_on_random_tokens_when_there_is_no_data_set(tmp_path):
    run_script(
        "benchmark.py",
        *("--config", str(REPO / "configs/gpt2_124m.json")),
        *("--model.n_layer=1", "--model.n_embd=32", "--model.n_head=2", "--model.block_size=16"),
        *("--batch_size=2", "--grad_accum.peak=1", "--compile=false", "--mixed_precision=no"),
        *("--steps", "2", "--rounds", "1", "--output", "bench.json"),
        cwd=tmp_path,  # no data/openwebtext here
        env={"OMP_NUM_THREADS": "1"},
    )
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["random_tokens"] is True and result["tokens_per_step"] == 32
    assert result["train_py_tokens_per_sec"] > 0 and result["bare_tokens_per_sec"] > 0
    assert result["peak_memory_gb"] > 0 and "mfu" not in result  # no MFU on a CPU
    config = json.loads((REPO / "configs/gpt2_124m.json").read_text())
    assert config["model"]["vocab_multiple"] == 64 and config["mixed_precision"] == "bf16"
    assert np.ceil(50257 / 64) * 64 == 50304
