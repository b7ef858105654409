"""The arithmetic tasks (adder, multiplier): n-digit examples, how they are prepared, and their
exact-match scoring.

An example reads `123+045=8610`: operands zero-padded to n digits, then the answer zero-padded to
its full width and reversed (least significant digit first), which is how a left-to-right model
can carry. Only the answer tokens are trained on and scored.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from gptlab.cli import fraction, positive_int, random_seed
from gptlab.data import fixed_subset, write_data_set
from gptlab.errors import UserError
from gptlab.evaluation import process_share
from gptlab.tokenizer import Tokenizer
from models import generate

VOCABULARY = "0123456789+*="
OPERATORS = {"adder": "+", "multiplier": "*"}
DEFAULT_DIGITS = {"adder": 3, "multiplier": 2}


@dataclass
class ArithmeticTask:
    name: str  # "adder" or "multiplier"
    digits: int

    @property
    def operator(self) -> str:
        return OPERATORS[self.name]

    @property
    def answer_digits(self) -> int:
        return self.digits + 1 if self.name == "adder" else 2 * self.digits

    @property
    def prompt_length(self) -> int:
        return 2 * self.digits + 2

    @property
    def example_length(self) -> int:
        return self.prompt_length + self.answer_digits

    def result(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a + b if self.name == "adder" else a * b

    def examples(self, a: np.ndarray, b: np.ndarray, tokenizer: Tokenizer) -> np.ndarray:
        """Token ids (len(a), example_length) of the examples for operand arrays a and b."""
        vocab = tokenizer.backend.get_vocab()
        digit_ids = np.array([vocab[str(d)] for d in range(10)])
        result = self.result(a, b)
        columns = [digit_ids[(a // 10**k) % 10] for k in reversed(range(self.digits))]
        columns.append(np.full_like(a, vocab[self.operator]))
        columns += [digit_ids[(b // 10**k) % 10] for k in reversed(range(self.digits))]
        columns.append(np.full_like(a, vocab["="]))
        columns += [digit_ids[(result // 10**k) % 10] for k in range(self.answer_digits)]
        return np.stack(columns, axis=1)

    def loss_mask(self) -> np.ndarray:
        """1 on the answer positions of an example, 0 on the prompt."""
        mask = np.zeros(self.example_length, dtype=np.uint8)
        mask[self.prompt_length :] = 1
        return mask

    def is_correct(self, prompt: str, generated: str) -> bool:
        """Exact match of the whole number: every generated token must be a digit."""
        if len(generated) != self.answer_digits or not generated.isdigit():
            return False
        a, b = prompt.rstrip("=").split(self.operator)
        return int(generated[::-1]) == int(self.result(np.int64(a), np.int64(b)))


@torch.no_grad()
def count_exact_matches(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    task: ArithmeticTask,
    examples: np.ndarray,
    batch_size: int = 1024,
    counted: int | None = None,
) -> int:
    """Greedy-decode the answer of every example (rows of token ids) and count exact matches
    among the first `counted` (default: all; the rest pad a process's share)."""
    device = next(model.parameters()).device
    correct = 0
    batch_size = max(1, batch_size)
    for start in range(0, len(examples), batch_size):
        batch = torch.as_tensor(examples[start : start + batch_size, : task.prompt_length])
        out = generate(model, batch.to(device).long(), task.answer_digits, temperature=0.0)
        rows = out.tolist()
        if counted is not None:
            rows = rows[: max(0, counted - start)]
        for row in rows:
            prompt = tokenizer.decode(row[: task.prompt_length])
            correct += task.is_correct(prompt, tokenizer.decode(row[task.prompt_length :]))
    return correct


def exact_matches(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    task: ArithmeticTask,
    split,
    indices: np.ndarray,
    accelerator: Accelerator,
    batch_size: int = 1024,
) -> tuple[int, int]:
    """(correct, total) over `indices` of the split, shared out over and summed across processes."""
    shard, real = process_share(indices, accelerator)
    correct = count_exact_matches(model, tokenizer, task, split.rows(shard), batch_size, real)
    totals = accelerator.reduce(
        torch.tensor([correct, real], device=accelerator.device, dtype=torch.float64), "sum"
    )
    return int(totals[0]), int(totals[1])


# ----------------------------------------------------------------------------------------------
# prepare_data.py adder|multiplier and evaluate.py --task adder|multiplier

COMMANDS = {name: f"every pair of n-digit operands ({name}, exact match)" for name in OPERATORS}
SCORES = {name: f"exact match of the whole answer ({name} data)" for name in OPERATORS}
CHECKPOINT_METRIC = "val_loss"


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument(
        "--digits", type=positive_int, default=DEFAULT_DIGITS[command], help="1 to 6"
    )
    parser.add_argument("--val_fraction", type=fraction, default=0.05)
    parser.add_argument("--test_fraction", type=fraction, default=0.05)
    parser.add_argument("--seed", type=random_seed, default=0, help="seed of the split")


def prepare(command: str, args: argparse.Namespace, out_dir: Path) -> Path:
    return prepare_arithmetic(
        command,
        out_dir,
        args.digits,
        args.val_fraction,
        args.test_fraction,
        args.seed,
        args.overwrite,
    )


def prepare_arithmetic(
    name: str,
    out_dir: Path,
    digits: int | None = None,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Every pair of n-digit operands (0 .. 10**n - 1), shuffled once and split, no pair in two splits."""
    task = ArithmeticTask(name, DEFAULT_DIGITS[name] if digits is None else digits)
    if not 1 <= task.digits <= 6:
        raise UserError(f"--digits {task.digits} must be between 1 and 6")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError("--val_fraction and --test_fraction must be positive and sum below 1")
    if seed < 0:
        raise UserError(f"--seed {seed} must be 0 or more")
    tokenizer = Tokenizer.from_chars(VOCABULARY)
    n = 10**task.digits
    order = np.random.default_rng(seed).permutation(n * n)
    n_val, n_test = max(1, int(n * n * val_fraction)), max(1, int(n * n * test_fraction))
    if n_val + n_test >= n * n:
        raise UserError(f"{n * n} examples are too few to split; use more --digits")
    splits = {
        "val": order[:n_val],
        "test": order[n_val : n_val + n_test],
        "train": order[n_val + n_test :],
    }

    def fill(tmp_dir: Path) -> dict:
        for split, pairs in splits.items():
            examples = task.examples(pairs // n, pairs % n, tokenizer)
            examples.astype(np.uint16).tofile(tmp_dir / f"{split}.bin")
            mask = np.broadcast_to(task.loss_mask(), examples.shape)
            np.ascontiguousarray(mask).tofile(tmp_dir / f"{split}_mask.bin")
        return {
            "format": "examples",
            "dtype": "uint16",
            "example_length": task.example_length,
            "splits": {split: len(pairs) for split, pairs in splits.items()},
            "task": {"name": name, "digits": task.digits},
        }

    return write_data_set(out_dir, tokenizer, fill, overwrite)


def score(task_name: str, model, tokenizer, meta: dict, split, indices, accelerator, batch_size):
    """Exact match of the whole answer over the split: (result fields, one-line summary)."""
    trained_on = meta.get("task", {}).get("name")
    if trained_on != task_name:
        raise UserError(
            f"the data set holds {trained_on or 'text'}, not {task_name}; use --task "
            f"{trained_on or 'loss'} or --data_dir with a {task_name} data set"
        )
    task = ArithmeticTask(**meta["task"])
    correct, total = exact_matches(model, tokenizer, task, split, indices, accelerator, batch_size)
    result = {"exact_match": correct / total, "correct": correct, "total": total}
    return result, f"exact match {correct / total:.2%} ({correct:,} of {total:,})"


def val_metrics(meta: dict, tokenizer: Tokenizer, split, samples: int):
    """The metric each evaluation in training adds: exact match on a fixed val subset."""
    if samples < 1:
        return None
    task = ArithmeticTask(**meta["task"])
    indices = fixed_subset(split.num_samples, samples)

    def metrics(model: torch.nn.Module, accelerator: Accelerator) -> dict:
        correct, total = exact_matches(model, tokenizer, task, split, indices, accelerator)
        return {"val_exact_match": correct / total}

    return metrics
