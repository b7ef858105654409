"""Tokenizers as saved with every data set and checkpoint: a `tokenizers.Tokenizer` in tokenizer.json.

Character vocabularies are built as word-level tokenizers that split text into single characters,
so a character model and a BPE model are saved, loaded and decoded the same way (and transformers'
AutoTokenizer can read both). A tokenizer made for chat also carries its chat template (a Jinja
string, see gptlab/chat_format.py), saved in tokenizer_config.json where transformers reads it.
"""

import json
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

from gptlab.errors import UserError

SPECIAL_TOKENS = ("<|endoftext|>",)


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer, chat_template: str | None = None):
        self.backend = backend
        self.chat_template = chat_template

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
            backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
            return cls(backend, read_chat_template(path))
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            bpe = tokenizers.ByteLevelBPETokenizer(
                str(path / "vocab.json"), str(path / "merges.txt")
            )
            backend = bpe._tokenizer
            known = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is not None]
            backend.add_special_tokens(known)
            return cls(backend, read_chat_template(path))
        if path.exists() or str(name_or_dir).startswith((".", "/")):
            raise UserError(
                f"no tokenizer in {name_or_dir}: expected tokenizer.json or vocab.json + merges.txt"
            )
        try:  # a hub name such as "gpt2": needs the network the first time
            from transformers import AutoTokenizer

            loaded = AutoTokenizer.from_pretrained(str(name_or_dir))
            return cls(loaded.backend_tokenizer, getattr(loaded, "chat_template", None))
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
        if self.chat_template is not None:
            settings["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def read_chat_template(directory: Path) -> str | None:
    """The chat template saved with a tokenizer: in tokenizer_config.json, or in
    chat_template.jinja where transformers 5's save_pretrained puts it."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    config_path = directory / "tokenizer_config.json"
    try:
        template = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    return template if isinstance(template, str) else None
