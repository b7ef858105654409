"""Shared fixtures: small prepared data sets and a runner for the scripts as a user runs them."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# A tiny adder run that learns 2-digit addition in a few seconds on a CPU.
TINY_MODEL = [
    "--model.n_layer=1",
    "--model.n_head=2",
    "--model.n_embd=64",
    "--model.block_size=16",
    "--model.bias=false",
]


def run_script(
    script: str,
    *args: str,
    cwd: Path,
    processes: int = 1,
    check: bool = True,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts in cwd, as `python script.py` or under torchrun."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", **(env or {})}
    if processes > 1:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        environment["ACCELERATE_USE_CPU"] = "true"
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            f"--master_port={port}",
        ]
    else:
        launcher = [sys.executable]
    result = subprocess.run(
        [*launcher, str(REPO / script), *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def adder_dir(tmp_path_factory) -> Path:
    """2-digit addition (10,000 pairs), prepared once per test session."""
    from gptlab.tasks.arithmetic import prepare_arithmetic

    return prepare_arithmetic("adder", tmp_path_factory.mktemp("data") / "adder2", digits=2)


@pytest.fixture(scope="session")
def shakespeare_dir(tmp_path_factory) -> Path:
    """Tiny Shakespeare with a character vocabulary, from the shared copy."""
    from gptlab.tasks.text import prepare_text

    source = SHARED_DATA / "tinyshakespeare" / "input.txt"
    return prepare_text(str(source), "char", tmp_path_factory.mktemp("data") / "shakespeare")


@pytest.fixture(scope="session")
def mixture_dirs(shakespeare_dir, tmp_path_factory) -> tuple[Path, Path]:
    """Two language-modelling sets with one character tokenizer: tiny Shakespeare, and its
    lines in reverse order (other text, the same characters)."""
    from gptlab.tasks.text import prepare_text

    work = tmp_path_factory.mktemp("mixture")
    lines = (SHARED_DATA / "tinyshakespeare" / "input.txt").read_text().splitlines(True)
    (work / "reversed.txt").write_text("".join(reversed(lines))[:300_000])
    reversed_dir = prepare_text(str(work / "reversed.txt"), str(shakespeare_dir), work / "reversed")
    return shakespeare_dir, reversed_dir


def mixture_option(first: Path, second: Path, weights=(0.8, 0.2)) -> str:
    sources = [
        {"dir": str(first), "weight": weights[0]},
        {"dir": str(second), "weight": weights[1]},
    ]
    return f"--data.mixture={json.dumps(sources)}"
