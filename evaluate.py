"""Score a trained model on a whole data split.

    python evaluate.py --task adder --checkpoint out/adder --split test
    python evaluate.py --task loss --checkpoint out/shakespeare_cpu --split val --output val.json
    python evaluate.py --task classify --checkpoint out/chnsenticorp_cpu --split test
    accelerate launch evaluate.py ...      # the split is shared out over the processes

Tasks: `adder` and `multiplier` score exact match of the whole answer number under greedy
decoding (a non-digit token makes the answer wrong); `loss` gives the mean token loss,
perplexity and bits per UTF-8 byte of text (text data sets); `classify` gives a classifier's
accuracy, per-class precision/recall/F1 and confusion matrix. The data set is the one the
checkpoint was trained on unless --data_dir says otherwise.
"""

import argparse
import json
from pathlib import Path

from accelerate import Accelerator

from gptlab import tasks
from gptlab.checkpoints import load_checkpoint
from gptlab.cli import ArgumentParser, check_output_file, non_negative_int, positive_int
from gptlab.data import fixed_subset, load_tokenizer, open_split, read_meta
from gptlab.errors import UserError, run_cli


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="evaluate.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint or run directory, or a Hugging Face GPT-2/Llama directory or hub name",
    )
    parser.add_argument("--task", required=True, help=f"one of: {', '.join(tasks.all_scores())}")
    parser.add_argument("--split", default="test", help="data split to score (default: test)")
    parser.add_argument("--data_dir", help="prepared data set (default: the checkpoint's)")
    parser.add_argument("--batch_size", type=positive_int, default=512, help="examples per batch")
    parser.add_argument(
        "--max_samples", type=non_negative_int, default=0, help="score only the first N; 0: all"
    )
    parser.add_argument("--output", help="write the metrics as JSON to this file")
    args = parser.parse_args(argv)
    tasks.for_score(args.task)  # an unknown task is refused before anything is loaded
    check_output_file(args.output)
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    accelerator = Accelerator()
    checkpoint = load_checkpoint(args.checkpoint)
    if not (args.data_dir or checkpoint.data_info.get("dir")):
        sources = [source["dir"] for source in checkpoint.data_info.get("mixture", [])]
        raise UserError(
            f"{args.checkpoint} was trained on a mixture of {', '.join(sources)}; pass one of "
            "them as --data_dir"
            if sources
            else f"{args.checkpoint} does not say what data it was trained on; pass --data_dir"
        )
    data_dir = Path(args.data_dir or checkpoint.data_info["dir"])
    meta = read_meta(data_dir)
    if (
        load_tokenizer(data_dir, meta).backend.get_vocab()
        != checkpoint.tokenizer.backend.get_vocab()
    ):
        raise UserError(
            f"data set {data_dir} was tokenized with another vocabulary than {args.checkpoint}; "
            "prepare the data with the checkpoint's tokenizer"
        )
    model = checkpoint.model.to(accelerator.device)
    split = open_split(data_dir, meta, args.split, model.config.block_size, seed=0)
    count = split.num_samples if args.max_samples <= 0 else min(args.max_samples, split.num_samples)
    indices = fixed_subset(split.num_samples, count)
    scores, summary = tasks.for_score(args.task).score(
        args.task, model, checkpoint.tokenizer, meta, split, indices, accelerator, args.batch_size
    )
    result = {"checkpoint": str(checkpoint.directory), "task": args.task, "split": args.split}
    result.update(scores)

    if accelerator.is_main_process:
        print(f"{args.task} on {args.split} of {data_dir}: {summary}")
        if args.output:
            try:
                Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
            except OSError as error:
                raise UserError(
                    f"could not write --output {args.output}: {error.strerror}"
                ) from None
    # Leave the process group together and tear it down before the interpreter exits: gloo
    # aborts ("terminate called without an active exception") if it is destroyed at exit.
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
