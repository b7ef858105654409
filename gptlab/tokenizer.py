"""Tokenizers as saved with every data set and checkpoint: a `tokenizers.Tokenizer` in tokenizer.json.

Character vocabularies are built as word-level tokenizers that split text into single characters,
so a character model and a BPE model are saved, loaded and decoded the same way (and transformers'
AutoTokenizer can read both).
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

from gptlab.errors import UserError

SPECIAL_TOKENS = ("<|endoftext|>",)


@contextmanager
def _refusing_corrupt(*files: Path) -> Iterator[None]:
    """Turn the tokenizers library's error about an unreadable file into one line naming it."""
    try:
        yield
    except Exception as error:  # tokenizers raises a bare Exception from Rust
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"{' and '.join(map(str, files))}: not a valid tokenizer ({cause}); restore the file "
            "from where it came, or prepare the data set again"
        ) from None


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer):
        self.backend = backend

    @classmethod
    def from_chars(cls, chars: str) -> "Tokenizer":
        """A character vocabulary: token id i is the i-th character of sorted(set(chars))."""
        vocab = {c: i for i, c in enumerate(sorted(set(chars)))}
        backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=None))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
        return cls(backend)

    @classmethod
    def load(cls, name_or_dir: str | Path) -> "Tokenizer":
        """Load from a directory (tokenizer.json, or GPT-2's vocab.json + merges.txt) or a hub name."""
        path = Path(name_or_dir)
        if (path / "tokenizer.json").is_file():
            with _refusing_corrupt(path / "tokenizer.json"):
                return cls(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")))
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            with _refusing_corrupt(path / "vocab.json", path / "merges.txt"):
                bpe = tokenizers.ByteLevelBPETokenizer(
                    str(path / "vocab.json"), str(path / "merges.txt")
                )
            backend = bpe._tokenizer
            known = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is not None]
            backend.add_special_tokens(known)
            return cls(backend)
        if path.exists() or str(name_or_dir).startswith((".", "/")):
            raise UserError(
                f"no tokenizer in {name_or_dir}: expected tokenizer.json or vocab.json + merges.txt"
            )
        try:  # a hub name such as "gpt2": needs the network the first time
            from transformers import AutoTokenizer

            return cls(AutoTokenizer.from_pretrained(str(name_or_dir)).backend_tokenizer)
        except OSError as error:
            raise UserError(
                f"could not load tokenizer {name_or_dir!r} ({error.__class__.__name__}); "
                "pass a local directory with tokenizer.json or vocab.json + merges.txt"
            ) from None

    @property
    def is_char_level(self) -> bool:
        return isinstance(self.backend.model, models.WordLevel)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @property
    def eos_token_id(self) -> int | None:
        return self.backend.token_to_id("<|endoftext|>")

    def encode(self, text: str) -> list[int]:
        if self.is_char_level:
            vocab = self.backend.get_vocab()
            unknown = sorted({c for c in text if c not in vocab})
            if unknown:
                raise UserError(
                    f"text has characters outside the vocabulary: {''.join(unknown)!r}; "
                    f"use only these: {''.join(sorted(vocab, key=vocab.get))!r}"
                )
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and a tokenizer_config.json that transformers' AutoTokenizer reads."""
        directory = Path(directory)
        self.backend.save(str(directory / "tokenizer.json"))
        settings = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        if self.eos_token_id is not None:
            settings.update(eos_token="<|endoftext|>", bos_token="<|endoftext|>")
        (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
