"""Score a trained model on a whole data split.

    python evaluate.py --task adder --checkpoint out/adder --split test
    python evaluate.py --task loss --checkpoint out/shakespeare_cpu --split val --output val.json
    accelerate launch evaluate.py ...      # the split is shared out over the processes

Tasks: `adder` and `multiplier` score exact match of the whole answer number under greedy
decoding (a non-digit token makes the answer wrong); `loss` gives the mean token loss and
perplexity. The data set is the one the checkpoint was trained on unless --data_dir says otherwise.
"""

import argparse
import json
import math
from pathlib import Path

import torch
from accelerate import Accelerator

from arithmetic import OPERATORS, ArithmeticTask, count_exact_matches
from checkpoints import load_checkpoint
from config import UserError, run_cli
from data import fixed_subset, open_split, read_meta
from train import evaluate_loss

TASKS = (*OPERATORS, "loss")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint or run directory, or a Hugging Face GPT-2/Llama directory or hub name",
    )
    parser.add_argument("--task", required=True, help=f"one of: {', '.join(TASKS)}")
    parser.add_argument("--split", default="test", help="data split to score (default: test)")
    parser.add_argument("--data_dir", help="prepared data set (default: the checkpoint's)")
    parser.add_argument("--batch_size", type=int, default=512, help="examples per batch")
    parser.add_argument("--max_samples", type=int, default=0, help="score only the first N; 0: all")
    parser.add_argument("--output", help="write the metrics as JSON to this file")
    args = parser.parse_args(argv)
    if args.task not in TASKS:
        raise UserError(f"unknown task {args.task!r}; choose one of: {', '.join(TASKS)}")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    accelerator = Accelerator()
    checkpoint = load_checkpoint(args.checkpoint)
    if not (args.data_dir or checkpoint.data_info.get("dir")):
        raise UserError(
            f"{args.checkpoint} does not say what data it was trained on; pass --data_dir"
        )
    data_dir = Path(args.data_dir or checkpoint.data_info["dir"])
    meta = read_meta(data_dir)
    model = checkpoint.model.to(accelerator.device)
    split = open_split(data_dir, meta, args.split, model.config.block_size, seed=0)
    count = split.num_samples if args.max_samples <= 0 else min(args.max_samples, split.num_samples)
    indices = fixed_subset(split.num_samples, count)
    result = {"checkpoint": str(checkpoint.directory), "task": args.task, "split": args.split}

    if args.task == "loss":
        loss = evaluate_loss(model, split, indices, accelerator, args.batch_size)
        result.update(loss=loss, perplexity=math.exp(loss), samples=len(indices))
        summary = f"loss {loss:.4f}, perplexity {math.exp(loss):.3f} on {len(indices):,} samples"
    else:
        trained_on = meta.get("task", {}).get("name")
        if trained_on != args.task:
            raise UserError(
                f"data set {data_dir} holds {trained_on or 'text'}, not {args.task}; "
                f"use --task {trained_on or 'loss'} or --data_dir with a {args.task} data set"
            )
        task = ArithmeticTask(**meta["task"])
        shard = indices[accelerator.process_index :: accelerator.num_processes]
        correct = count_exact_matches(
            model, checkpoint.tokenizer, task, split.rows(shard), args.batch_size
        )
        totals = accelerator.reduce(
            torch.tensor([correct, len(shard)], device=accelerator.device, dtype=torch.float64),
            "sum",
        )
        correct, total = int(totals[0]), int(totals[1])
        result.update(exact_match=correct / total, correct=correct, total=total)
        summary = f"exact match {correct / total:.2%} ({correct:,} of {total:,})"

    if accelerator.is_main_process:
        print(f"{args.task} on {args.split} of {data_dir}: {summary}")
        if args.output:
            Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    # Leave the process group together and tear it down before the interpreter exits: gloo
    # aborts ("terminate called without an active exception") if it is destroyed at exit.
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
