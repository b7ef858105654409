"""Weight averaging: one checkpoint whose weights are the mean of several checkpoints of one model.

    python train.py --average out/cls_seed1/latest out/cls_seed2/latest --out_dir out/cls_soup

Fine-tunes of one pretrained model that differ only in their seed (or dropout, or learning
rate) end in one basin of the loss, so the mean of their weights is a model too, and usually a
better one than any of them: a "model soup" (Wortsman et al., 2022). It costs nothing at
inference, unlike an ensemble, and the result is an ordinary checkpoint (a Hugging Face
directory like any other). The mean of unrelated models, such as two trained from scratch, is
not a model; nothing here can tell the two cases apart, so evaluate the result.
"""

import argparse
import json
import os
from pathlib import Path

import torch

from gptlab import storage
from gptlab.checkpoints import MODEL_FILE, load_checkpoint, resolve_checkpoint_dir, save_checkpoint
from gptlab.cli import ArgumentParser
from gptlab.errors import UserError


def is_average(directory: Path) -> bool:
    """A checkpoint written by average_checkpoints (a later average may replace it)."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):  # none, or not ours to replace: refused as not empty
        return False
    return (directory / MODEL_FILE).is_file() and "averaged_from" in config


def average_checkpoints(sources: list[str], out_dir: Path) -> Path:
    """Write to out_dir the checkpoint whose every weight is the mean of that weight over the
    sources (checkpoint or run directories: a run means its best checkpoint). The sources must
    have the same model config (dropout aside) and tokenizer; config and data.json are the
    first one's."""
    if len(sources) < 2:
        raise UserError("--average needs at least two checkpoints to average")
    directories = [resolve_checkpoint_dir(source) for source in sources]
    storage.check_output_dir(out_dir, "weight average", is_average, reads_from=directories)
    first, *others = [load_checkpoint(directory) for directory in directories]
    for source, other in zip(sources[1:], others):
        changed = [  # dropout does not shape the weights: fine-tunes may differ in it
            key
            for key, value in vars(first.model.config).items()
            if key != "dropout" and getattr(other.model.config, key) != value
        ]
        if changed:
            raise UserError(
                f"{source} differs from {sources[0]} in model.{', model.'.join(changed)}; "
                "average only checkpoints of one model (fine-tunes of one pretrained model)"
            )
        if other.tokenizer.backend.get_vocab() != first.tokenizer.backend.get_vocab():
            raise UserError(
                f"{source} has another tokenizer than {sources[0]}; average only checkpoints "
                "of one model (fine-tunes of one pretrained model)"
            )
    states = [checkpoint.model.state_dict() for checkpoint in (first, *others)]
    # Summed in float64 so the mean does not depend on the order of the sources.
    mean = {
        name: torch.stack([state[name].double() for state in states]).mean(0).to(tensor.dtype)
        if tensor.is_floating_point()
        else tensor
        for name, tensor in states[0].items()
    }
    first.model.load_state_dict(mean)
    info = {"averaged_from": [str(directory) for directory in directories]}
    save_checkpoint(out_dir, first.model, first.tokenizer, first.data_info, info)
    return out_dir


def main(argv: list[str]) -> None:
    """`train.py --average SOURCE SOURCE ... --out_dir DIR`."""
    parser = ArgumentParser(
        prog="train.py --average",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument(
        "sources", nargs="+", help="checkpoint or run directories (a run: its best checkpoint)"
    )
    parser.add_argument("--out_dir", required=True, help="where to write the averaged checkpoint")
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process would write the same directory
        raise UserError("train.py --average runs as one process: python train.py --average ...")
    out_dir = average_checkpoints(args.sources, Path(args.out_dir))
    print(f"averaged {len(args.sources)} checkpoints into {out_dir}")
