"""Command-line flags of the scripts: argparse whose errors are one-line UserErrors, and value
types that check range and finiteness at the edge (an `inf` or a negative count never gets in)."""

import argparse
import math
from collections.abc import Callable


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


positive_int = _checked(int, lambda v: v >= 1, "a whole number of at least 1")
non_negative_int = _checked(int, lambda v: v >= 0, "a whole number of 0 or more")
non_negative_float = _checked(float, lambda v: v >= 0, "a finite number of 0 or more")
fraction = _checked(float, lambda v: 0 < v < 1, "a number between 0 and 1")
probability = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
