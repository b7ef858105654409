"""n-digit addition and multiplication as fixed-length examples, and their exact-match scoring.

An example reads `123+045=8610`: operands zero-padded to n digits, then the answer zero-padded to
its full width and reversed (least significant digit first), which is how a left-to-right model
can carry. Only the answer tokens are trained on and scored.
"""

from dataclasses import dataclass

import numpy as np
import torch

from models import generate
from tokenizer import Tokenizer

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
) -> int:
    """Greedy-decode the answer of every example (rows of token ids) and count exact matches."""
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(examples), batch_size):
        batch = torch.as_tensor(examples[start : start + batch_size, : task.prompt_length])
        out = generate(model, batch.to(device).long(), task.answer_digits, temperature=0.0)
        for row in out.tolist():
            prompt = tokenizer.decode(row[: task.prompt_length])
            correct += task.is_correct(prompt, tokenizer.decode(row[task.prompt_length :]))
    return correct
