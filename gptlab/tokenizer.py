"""Tokenizers as saved with every data set and checkpoint: a `tokenizers.Tokenizer` in tokenizer.json.

Character vocabularies are built as word-level tokenizers that split text into single characters,
so a character model and a BPE model are saved, loaded and decoded the same way (and transformers'
AutoTokenizer can read both).
"""

import json
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

from gptlab.errors import UserError

SPECIAL_TOKENS = ("<|endoftext|>",)
END_OF_TEXT, PAD, UNKNOWN = "<|endoftext|>", "<|pad|>", "<|unk|>"


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer):
        self.backend = backend

    @classmethod
    def from_chars(cls, chars: str, special_tokens: tuple[str, ...] = ()) -> "Tokenizer":
        """A character vocabulary: token id i is the i-th character of sorted(set(chars)), then
        the special tokens. With UNKNOWN among them, a character outside the vocabulary reads as
        UNKNOWN; without, text with such a character is refused."""
        vocab = {c: i for i, c in enumerate(sorted(set(chars)))}
        vocab.update({token: len(vocab) + i for i, token in enumerate(special_tokens)})
        unknown = UNKNOWN if UNKNOWN in special_tokens else None
        backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=unknown))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
        backend.add_special_tokens(list(special_tokens))
        return cls(backend)

    @classmethod
    def load(cls, name_or_dir: str | Path) -> "Tokenizer":
        """Load from a directory (tokenizer.json, or GPT-2's vocab.json + merges.txt) or a hub name."""
        path = Path(name_or_dir)
        if (path / "tokenizer.json").is_file():
            return cls(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")))
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
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
        return self.backend.token_to_id(END_OF_TEXT)

    @property
    def pad_token_id(self) -> int | None:
        return self.backend.token_to_id(PAD)

    @property
    def unknown_token_id(self) -> int | None:
        return self.backend.token_to_id(UNKNOWN)

    def encode(self, text: str) -> list[int]:
        if self.is_char_level and self.unknown_token_id is None:
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
            settings.update(eos_token=END_OF_TEXT, bos_token=END_OF_TEXT)
        for name, token in (("pad_token", PAD), ("unk_token", UNKNOWN)):
            if self.backend.token_to_id(token) is not None:
                settings[name] = token
        (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
