"""The faults a review found in the training loop and evaluation (issue 9), each pinned by a test.

Several need more than one process. `launch` starts them as torchrun would (RANK, WORLD_SIZE, ...,
gloo on the CPU) but as separate children, so that each process's exit code and stderr can be
checked and a hang fails the test instead of blocking it.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_MODEL

# A tiny adder run (see conftest.TINY_MODEL), short and without exact-match decoding.
TINY_RUN = [
    "--config",
    str(REPO / "configs/adder.json"),
    *TINY_MODEL,
    "--batch_size=8",
    "--data.eval_samples=16",
    "--data.exact_match_samples=0",
]


def write_probe(directory: Path, source: str) -> Path:
    """A script that runs a piece of train.py with instruments around it."""
    path = directory / "probe.py"
    path.write_text(textwrap.dedent(source))
    return path


def launch(
    script: Path, *args: str, processes: int, cwd: Path, timeout: float = 180
) -> list[subprocess.CompletedProcess]:
    """Run `processes` processes of a script in one gloo process group; one result per process."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "WANDB_MODE": "disabled",
        "ACCELERATE_USE_CPU": "true",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(processes),
        "LOCAL_WORLD_SIZE": str(processes),
        "OMP_NUM_THREADS": "1",  # as torchrun sets it
    }
    children = [
        subprocess.Popen(
            [sys.executable, str(script), *args],
            cwd=cwd,
            env={**environment, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(processes)
    ]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for child in children:
            stdout, stderr = child.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(
                subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
            )
    except subprocess.TimeoutExpired:
        for child in children:
            child.kill()
            child.communicate()
        pytest.fail(f"{script.name} with {processes} processes still ran after {timeout} s: a hang")
    return results


@pytest.mark.slow
def test_after_an_evaluation_a_compiled_ddp_model_still_syncs_gradients_once_per_step(
    adder_dir, tmp_path
):
    # Fault 1: accelerator.unwrap_model(model) (keep_torch_compile=True) for the evaluation set
    # `_orig_mod` of the live compiled model to the plain model: Accelerate's no_sync found no DDP
    # behind it any more, so every micro-batch after the first evaluation all-reduced. train.py
    # runs here with compile on, in 2 processes, inductor swapped for dynamo's eager backend
    # (the same wrappers without a 25 s compile), counting DDP's all-reduces of each step.
    probe = write_probe(
        tmp_path,
        """
        import json

        import torch
        from accelerate import Accelerator
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        import train
        from gptlab.errors import run_cli

        compile_with = torch.compile
        torch.compile = lambda model, **options: compile_with(model, **{**options, "backend": "eager"})
        allreduces, per_step = [0], []

        def counting_allreduce(state, bucket):
            allreduces[0] += 1
            return allreduce_hook(state, bucket)

        prepare_model = Accelerator.prepare_model

        def prepare_and_count(self, model, *args, **kwargs):
            prepared = prepare_model(self, model, *args, **kwargs)
            ddp = prepared._orig_mod  # torch.compile(DDP(model))
            assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
            ddp.register_comm_hook(None, counting_allreduce)
            return prepared

        Accelerator.prepare_model = prepare_and_count
        train_step = train.train_step

        def counted_step(*args, **kwargs):
            before = allreduces[0]
            result = train_step(*args, **kwargs)
            per_step.append(allreduces[0] - before)
            return result

        train.train_step = counted_step
        run_cli(train.main)
        print(json.dumps(per_step))
        """,
    )
    results = launch(
        probe,
        *TINY_RUN,
        f"--data.dir={adder_dir}",
        "--compile=true",
        "--grad_accum.peak=2",
        "--max_steps=2",
        "--macro_batch_steps=1",
        f"--out_dir={tmp_path / 'run'}",
        processes=2,
        cwd=tmp_path,
    )
    for result in results:
        assert result.returncode == 0, result.stderr
        per_step = json.loads(result.stdout.strip().splitlines()[-1])
        # Two micro-batches a step, gradients all-reduced on the last one only, evaluated or not.
        assert len(per_step) == 2 and per_step[0] > 0
        assert per_step[1] == per_step[0]


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_takes_bf16_only_where_the_gpu_computes_it_natively(
    monkeypatch, native_bf16, expected
):
    # Fault 4: torch.cuda.is_bf16_supported() counts emulation (True on a V100 or T4, where bf16
    # is slow), so `auto` chose bf16 there.
    import torch

    from gptlab.config import Config
    from gptlab.training import mixed_precision_mode

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native_bf16 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert mixed_precision_mode(Config(mixed_precision="auto")) == expected
    assert mixed_precision_mode(Config(mixed_precision="no")) == "no"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert mixed_precision_mode(Config(mixed_precision="auto")) == "no"


@pytest.mark.slow
def test_the_run_records_the_precision_it_used_not_auto(adder_dir, tmp_path):
    # Fault 4: config.json and the snapshots said "auto", so a resume on other hardware silently
    # computed in another precision. The resolved one is recorded, and a resume must match it.
    from conftest import run_script
    from gptlab.snapshots import snapshot_dirs, verify_snapshot

    run_dir = tmp_path / "run"
    run_script(
        "train.py",
        *TINY_RUN,
        f"--data.dir={adder_dir}",
        "--max_steps=1",
        f"--out_dir={run_dir}",
        cwd=tmp_path,
    )
    assert json.loads((run_dir / "config.json").read_text())["mixed_precision"] == "no"  # a CPU
    for snapshot in snapshot_dirs(run_dir):
        assert verify_snapshot(snapshot)["config"]["mixed_precision"] == "no"


@pytest.mark.slow
def test_fine_tuning_takes_a_shorter_context_and_another_dropout_and_refuses_the_rest(
    adder_dir, tmp_path
):
    # Fault 5: init_from dropped the command line's model.* changes silently.
    import torch

    from conftest import run_script
    from gptlab.checkpoints import adapt_for_finetuning, load_checkpoint, save_checkpoint
    from gptlab.errors import UserError
    from gptlab.tokenizer import Tokenizer
    from models import ModelConfig, build_model

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=13, n_layer=1, n_head=2, n_embd=32, block_size=32, dropout=0.0)
    source = build_model(config)
    info = {"step": 1, "val_loss": 1.0}
    save_checkpoint(tmp_path / "source", source, Tokenizer.load(adder_dir), {}, info)
    tune = [
        *("--config", str(REPO / "configs/adder.json"), f"--data.dir={adder_dir}"),
        *("--batch_size=8", "--data.eval_samples=16", "--data.exact_match_samples=0"),
        f"--init_from={tmp_path / 'source'}",
    ]
    run_script(
        "train.py",
        *tune,
        "--model.block_size=16",
        "--model.dropout=0.1",
        "--max_steps=2",
        *("--lr.peak=1e-9", "--lr.begin=1e-9", "--lr.end=1e-9"),  # the weights stay the source's
        f"--out_dir={tmp_path / 'tuned'}",
        cwd=tmp_path,
    )
    tuned = load_checkpoint(tmp_path / "tuned").model
    assert tuned.config.block_size == 16 and tuned.config.dropout == 0.1
    assert json.loads((tmp_path / "tuned" / "config.json").read_text())["model"]["block_size"] == 16
    # The position table is the source's first 16 rows (as nanoGPT's crop_block_size).
    assert torch.allclose(tuned.wpe.weight, source.wpe.weight[:16], atol=1e-6)

    refused = run_script(
        "train.py",
        *tune,
        "--model.n_layer=3",
        f"--out_dir={tmp_path / 'no'}",
        cwd=tmp_path,
        check=False,
    )
    assert refused.returncode == 2 and not (tmp_path / "no").exists()
    assert refused.stderr.strip().splitlines() == [
        f"error: --model.n_layer cannot change when fine-tuning from {tmp_path / 'source'} (it is 1 "
        "there); drop the option, or train from scratch"
    ]
    with pytest.raises(UserError, match="longer than the 32 positions"):
        adapt_for_finetuning(source, {"block_size": 64}, "source")


DROPOUT_PROBE = """
    import json
    import sys

    import torch
    from accelerate import Accelerator

    import train
    from gptlab.config import load_config
    from gptlab.errors import let_collective_threads_finish

    config, _, overrides = load_config(sys.argv[1:])
    accelerator = Accelerator()
    run = train.start_run(config, overrides, accelerator)
    weights = torch.cat([p.detach().flatten() for p in run.raw_model.parameters()])
    inputs, targets = run.data.train_split.fetch([0, 1, 2, 3])  # the same samples on every process
    loss = run.raw_model(inputs, targets)  # in training mode: through the dropout masks
    weights, losses = accelerator.gather(weights[None]), accelerator.gather(loss.detach()[None])
    if accelerator.is_main_process:
        print(json.dumps({"same_weights": bool((weights == weights[0]).all()), "losses": losses.tolist()}))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    let_collective_threads_finish()  # as run_cli does
"""


@pytest.mark.slow
def test_processes_start_from_the_same_weights_but_draw_their_own_dropout_masks(
    adder_dir, tmp_path
):
    # Fault 6: set_seed without a per-process offset gave every process the same dropout masks.
    results = launch(
        write_probe(tmp_path, DROPOUT_PROBE),
        *TINY_RUN,
        f"--data.dir={adder_dir}",
        "--model.dropout=0.2",
        "--max_steps=1",
        f"--out_dir={tmp_path / 'run'}",
        processes=2,
        cwd=tmp_path,
    )
    assert [result.returncode for result in results] == [0, 0], (
        results[0].stderr + results[1].stderr
    )
    report = json.loads(results[0].stdout.strip().splitlines()[-1])
    assert report["same_weights"]
    first, second = report["losses"]
    assert first != second


FULL_DISK_PROBE = """
    import errno

    import train
    from gptlab import checkpoints
    from gptlab.errors import run_cli

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    checkpoints.save_checkpoint = full_disk  # only the main process writes checkpoints
    run_cli(train.main)
"""


@pytest.mark.slow
def test_a_checkpoint_write_failing_on_the_main_process_stops_every_process(adder_dir, tmp_path):
    # Fault 7: the main process raised while the others waited for it at a barrier.
    results = launch(
        write_probe(tmp_path, FULL_DISK_PROBE),
        *TINY_RUN,
        f"--data.dir={adder_dir}",
        "--max_steps=2",
        f"--out_dir={tmp_path / 'run'}",
        processes=2,
        cwd=tmp_path,
        timeout=120,
    )
    for result in results:
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith("error: could not write checkpoint ")
        assert "(No space left on device)" in lines[0]


def test_loss_evaluation_holds_at_most_the_logits_budget_in_one_forward(adder_dir, monkeypatch):
    # Fault 8: evaluate.py --task loss at its default batch of 512 on a GPT-2 vocabulary (1024
    # positions) held 512 * 1024 * 50257 fp32 logits: 105 GB.
    from types import SimpleNamespace

    import torch
    from accelerate import Accelerator

    from gptlab import evaluation
    from gptlab.data import open_split, read_meta
    from gptlab.tasks import text
    from models import ModelConfig, build_model

    gpt2 = SimpleNamespace(config=ModelConfig(block_size=1024, vocab_size=50257))
    assert evaluation.windows_per_forward(gpt2, 512) == 5  # 1 GiB of fp32 logits at most

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=13, n_layer=1, n_head=2, n_embd=16, block_size=16))
    split = open_split(adder_dir, read_meta(adder_dir), "val", 16, seed=0)
    indices = torch.arange(40).numpy()
    accelerator = Accelerator(cpu=True)
    whole = evaluation.evaluate_loss(model, split, indices, accelerator, batch_size=512)
    windows = []
    model.register_forward_pre_hook(lambda module, args: windows.append(args[0].size(0)))
    monkeypatch.setattr(evaluation, "LOGITS_BUDGET", 16 * 13 * 3)  # 3 windows' logits
    scores, _ = text.score("loss", model, None, {}, split, indices, accelerator, 512)
    assert max(windows) == 3 and sum(windows) == 40
    assert scores["loss"] == pytest.approx(whole, rel=1e-6)


def test_every_script_of_a_multi_process_launch_leaves_the_gil_before_exit(monkeypatch):
    # Fault 9: a gloo worker thread freeing the last collective's tensors during interpreter
    # shutdown aborted a process that had succeeded (exit -6), about one FSDP run in four. Each
    # script's run_cli pauses on the way out, whether main returned or raised; one process does not.
    from gptlab import errors

    def failing(argv):
        raise errors.UserError("bad flag")

    pauses = []
    monkeypatch.setattr(errors.time, "sleep", pauses.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    errors.run_cli(lambda argv: None)
    with pytest.raises(SystemExit) as exit_info:
        errors.run_cli(failing)
    assert exit_info.value.code == 2
    assert pauses == [errors.COLLECTIVE_THREADS_GRACE_S] * 2
    monkeypatch.setenv("WORLD_SIZE", "1")
    errors.run_cli(lambda argv: None)
    monkeypatch.delenv("WORLD_SIZE")
    errors.run_cli(lambda argv: None)
    assert len(pauses) == 2
