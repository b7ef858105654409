"""The run's log: metrics.jsonl, experiment trackers (wandb, TensorBoard) through Accelerate,
and the wandb run id of a run.

train.py passes `accelerator_options(config)` to its Accelerator and calls `start_trackers` once
the run directory exists; every log event then reaches the trackers through `accelerator.log`.
wandb follows its own settings: WANDB_MODE=online/offline/disabled, the key from `wandb login` or
WANDB_API_KEY (never from this repository), WANDB_DIR for its files (default: the run directory).

A run keeps its wandb run id in out_dir/trackers.json, so starting train.py again in the same run
directory (a resume) continues the same wandb run instead of opening a new one.
"""

import json
import os
import secrets
import string
from dataclasses import asdict
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from tqdm import tqdm

from gptlab.config import Config, dotted
from gptlab.errors import UserError

RUN_IDS_FILE = "trackers.json"
METRICS_FILE = "metrics.jsonl"


class RunLog:
    """Log events: appended to out_dir/metrics.jsonl and sent to Accelerate's trackers."""

    def __init__(self, accelerator: Accelerator, out_dir: Path):
        self.accelerator = accelerator
        self.path = Path(out_dir) / METRICS_FILE

    def write(self, event: dict) -> None:
        if self.accelerator.is_main_process:
            try:
                with open(self.path, "a") as file:
                    file.write(json.dumps(event) + "\n")
            except OSError as error:
                raise UserError(
                    f"could not write {self.path} ({error.strerror}); free some space or fix "
                    "the permissions, then rerun the same command to resume"
                ) from None
        self.accelerator.log({k: v for k, v in event.items() if k != "step"}, step=event["step"])

    def say(self, message: str, step: int) -> None:
        """Print a message and keep it in metrics.jsonl, so the log tells the whole story."""
        if self.accelerator.is_main_process:
            tqdm.write(message)
            self.write({"step": step, "message": message})


def accelerator_options(config: Config) -> dict:
    """Keyword arguments for Accelerator(...) that set up the configured trackers."""
    out_dir = Path(config.out_dir)
    return {
        "log_with": list(config.tracking.trackers) or None,
        "project_config": ProjectConfiguration(
            project_dir=str(out_dir), logging_dir=str(out_dir / "tensorboard")
        ),
    }


def start_trackers(accelerator: Accelerator, config: Config) -> None:
    """Open the trackers' run, with the resolved config as the run's config (out_dir must exist)."""
    tracking = config.tracking
    if not tracking.trackers:
        return
    out_dir = Path(config.out_dir)
    init_kwargs = {}
    if "wandb" in tracking.trackers and accelerator.is_main_process:
        init_kwargs["wandb"] = {
            "name": tracking.run_name or out_dir.resolve().name,
            "tags": tracking.tags,
            "id": wandb_run_id(out_dir),
            "resume": "allow",  # the same id again continues that run
        }
        if "WANDB_DIR" not in os.environ:
            init_kwargs["wandb"]["dir"] = str(out_dir)
    accelerator.init_trackers(
        tracking.project, config=flat_config(asdict(config)), init_kwargs=init_kwargs
    )


def wandb_run_id(out_dir: Path) -> str:
    """The wandb run id of the run in out_dir: read from trackers.json, or made and saved there."""
    path = out_dir / RUN_IDS_FILE
    if path.exists():
        return json.loads(path.read_text())["wandb_run_id"]
    # wandb's own id format: 8 characters from [a-z0-9]. secrets, not random: set_seed has
    # seeded `random` identically for every run of the same config.
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"wandb_run_id": run_id}) + "\n")
    temporary.replace(path)
    return run_id


def flat_config(values: dict) -> dict:
    """A nested config as dotted keys with scalar values: the only form TensorBoard's hparams take."""
    return {
        key: json.dumps(value) if isinstance(value, (list, tuple)) else value
        for key, value in dotted(values).items()
    }
