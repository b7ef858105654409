"""Command-line flags of the scripts: argparse whose errors are one-line UserErrors, and value
types that check range and finiteness at the edge (an `inf` or a negative count never gets in)."""

import argparse
import math
from collections.abc import Callable
from pathlib import Path


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad or missing flag is a UserError (one line, exit 2) naming --help."""

    def error(self, message: str):
        from gptlab.errors import UserError

        raise UserError(f"{message}; see `python {self.prog} --help`")


def _checked(kind: Callable, test: Callable, wanted: str) -> Callable[[str], object]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if (
            value is None
            or (isinstance(value, float) and not math.isfinite(value))
            or not test(value)
        ):
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
        return value

    parse.__name__ = wanted
    return parse


def device(text: str):
    """A torch device that exists here: auto (cuda if there is a GPU, else cpu), cpu, cuda,
    cuda:1, mps, ... An unknown name or a device this machine lacks is refused."""
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(text)
        torch.empty(0, device=chosen)  # raises if this machine has no such device
    except Exception as error:  # RuntimeError, or AssertionError from a build without CUDA
        cause = str(error).strip().splitlines()[0] if str(error).strip() else "not available"
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device of this machine ({cause}); use auto, cpu, cuda, cuda:N or mps"
        ) from None
    return chosen


positive_int = _checked(int, lambda v: v >= 1, "a whole number of at least 1")
non_negative_int = _checked(int, lambda v: v >= 0, "a whole number of 0 or more")
non_negative_float = _checked(float, lambda v: v >= 0, "a finite number of 0 or more")
fraction = _checked(float, lambda v: 0 < v < 1, "a number between 0 and 1")
probability = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")

MAX_SEED = 2**31 - 1
"""Seeds go to Python, NumPy (below 2**32) and torch, plus one per process: keep them small."""
random_seed = _checked(int, lambda v: 0 <= v <= MAX_SEED, f"a whole number from 0 to {MAX_SEED}")


def check_output_file(path: str | Path | None, flag: str = "--output") -> None:
    """Refuse an output file whose directory is missing, or that is a directory, before any work."""
    if path is None:
        return
    from gptlab.errors import UserError

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file name")
    if not path.resolve().parent.is_dir():
        raise UserError(f"{flag} {path}: its directory does not exist; create it first")
