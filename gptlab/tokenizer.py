"""Tokenizers as saved with every data set and checkpoint: a `tokenizers.Tokenizer` in tokenizer.json.

Character vocabularies are built as word-level tokenizers that split text into single characters,
so a character model and a BPE model are saved, loaded and decoded the same way (and transformers'
AutoTokenizer can read both). Every tokenizer we build or prepare data with has an end-of-text
special token (appended after each document) that tokenizer_config.json names as `eos_token`,
so tools built on transformers find it. A tokenizer made for chat also carries its chat template
(a Jinja string, see gptlab/chat_format.py), saved in tokenizer_config.json where transformers
reads it.

A loaded tokenizer keeps the special tokens its files name. Ours, GPT-2's and Llama's name an
`eos_token`; a BERT vocabulary (the Chinese GPT-2s of the hub, such as
uer/gpt2-chinese-cluecorpussmall: a `vocab.txt`, texts pretrained as `[CLS] text [SEP]`) names
none, so there `[SEP]` ends a text and `[CLS]` begins one, and `[PAD]` pads.
"""

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from gptlab.errors import UserError

END_OF_TEXT, PAD, UNKNOWN = "<|endoftext|>", "<|pad|>", "<|unk|>"
SPECIAL_TOKENS = (END_OF_TEXT,)
BYTE_ALPHABET = 256


def _named_token(value) -> str | None:
    """A token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


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
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        eos_token: str | None = None,
        chat_template: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
    ):
        """Special tokens not given, or not in the vocabulary, fall back to ours: <|endoftext|>
        ends a text and begins one (GPT-2's convention), <|pad|> pads, <|unk|> stands for what
        the vocabulary lacks, each where the vocabulary has it."""
        self.backend = backend

        def first_known(*tokens: str | None, unlike: str | None = None) -> str | None:
            """The first of the tokens that the vocabulary has and that is not `unlike`."""
            return next((t for t in tokens if t != unlike and self._id(t) is not None), None)

        self.eos_token = first_known(eos_token, END_OF_TEXT)
        self.bos_token = first_known(bos_token) or self.eos_token
        # A pad or unknown token that is the end-of-text token (GPT-2's hub tokenizer names
        # <|endoftext|> as its unk_token) is none: padding and unknowns must not look like it.
        self.pad_token = first_known(pad_token, PAD, unlike=self.eos_token)
        self.unk_token = first_known(unk_token, UNKNOWN, unlike=self.eos_token)
        self.chat_template = chat_template

    def special_tokens(self) -> dict[str, str | None]:
        """The special tokens as keyword arguments of Tokenizer, for a copy with another backend."""
        return {
            "eos_token": self.eos_token,
            "bos_token": self.bos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
        }

    @classmethod
    def from_chars(cls, chars: str, extra_special_tokens: tuple[str, ...] = ()) -> "Tokenizer":
        """A character vocabulary: token id i is the i-th character of sorted(set(chars)), then
        the end-of-text token, then extra_special_tokens (PAD, UNKNOWN). With UNKNOWN among them,
        a character outside the vocabulary reads as UNKNOWN; without, such text is refused."""
        special_tokens = (END_OF_TEXT, *extra_special_tokens)
        vocab = {c: i for i, c in enumerate(sorted(set(chars)))}
        vocab.update({token: len(vocab) + i for i, token in enumerate(special_tokens)})
        unknown = UNKNOWN if UNKNOWN in special_tokens else None
        backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=unknown))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
        backend.add_special_tokens(list(special_tokens))
        return cls(backend, END_OF_TEXT)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """A byte-level BPE of vocab_size tokens (GPT-2's pre-tokenization: every text encodes,
        nothing is unknown) learnt from `texts`; the end-of-text token is id 0."""
        bpe_size(f"bpe:{vocab_size}")
        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[END_OF_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend, END_OF_TEXT)

    @classmethod
    def load(cls, name_or_dir: str | Path) -> "Tokenizer":
        """Load from a directory (tokenizer.json, or GPT-2's vocab.json + merges.txt) or a hub name."""
        path = Path(name_or_dir)
        if (path / "tokenizer.json").is_file():
            with _refusing_corrupt(path / "tokenizer.json"):
                backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
            return cls(backend, chat_template=read_chat_template(path), **_configured(path))
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            with _refusing_corrupt(path / "vocab.json", path / "merges.txt"):
                bpe = tokenizers.ByteLevelBPETokenizer(
                    str(path / "vocab.json"), str(path / "merges.txt")
                )
            backend = bpe._tokenizer
            known = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is not None]
            backend.add_special_tokens(known)
            return cls(backend, chat_template=read_chat_template(path), **_configured(path))
        if (path / "vocab.txt").is_file():  # a BERT WordPiece vocabulary: transformers reads it
            with _refusing_corrupt(path / "vocab.txt"):
                return cls._from_transformers(str(path))
        if path.exists() or str(name_or_dir).startswith((".", "/")):
            raise UserError(
                f"no tokenizer in {name_or_dir}: expected tokenizer.json, vocab.json + merges.txt "
                "or vocab.txt"
            )
        try:  # a hub name such as "gpt2": needs the network the first time
            return cls._from_transformers(str(name_or_dir))
        except OSError as error:
            raise UserError(
                f"could not load tokenizer {name_or_dir!r} from the Hugging Face Hub "
                f"({error.__class__.__name__}; the first load needs the network); pass a local "
                "directory with tokenizer.json, vocab.json + merges.txt, or vocab.txt"
            ) from None

    @classmethod
    def _from_transformers(cls, name_or_dir: str) -> "Tokenizer":
        """The fast tokenizer transformers' AutoTokenizer makes of a hub name or directory, with
        the special tokens it names."""
        from transformers import AutoTokenizer

        loaded = AutoTokenizer.from_pretrained(name_or_dir)
        return cls(
            loaded.backend_tokenizer,
            chat_template=getattr(loaded, "chat_template", None),
            **_with_bert_markers({name: getattr(loaded, name, None) for name in _NAMED}),
        )

    def with_end_of_text(self) -> "Tokenizer":
        """This tokenizer if it has an end-of-text token, else a copy with <|endoftext|> added
        as a special token after its vocabulary."""
        if self.eos_token_id is not None:
            return self
        backend = tokenizers.Tokenizer.from_str(self.backend.to_str())
        backend.add_special_tokens([END_OF_TEXT])
        tokens = self.special_tokens() | {"eos_token": END_OF_TEXT}
        return Tokenizer(backend, chat_template=self.chat_template, **tokens)

    def _id(self, token: str | None) -> int | None:
        """The id of a token, None for no token or one the vocabulary lacks."""
        return None if token is None else self.backend.token_to_id(token)

    @property
    def is_char_level(self) -> bool:
        return isinstance(self.backend.model, models.WordLevel)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def unknown_token_id(self) -> int | None:
        return self._id(self.unk_token)

    def _check_characters(self, text: str) -> None:
        if self.is_char_level and self.unknown_token_id is None:
            vocab = self.backend.get_vocab()
            for token in self.backend.get_added_tokens_decoder().values():
                text = text.replace(token.content, "")  # special tokens written in the text
            unknown = sorted(set(text).difference(vocab))
            if unknown:
                known = "".join(sorted((t for t in vocab if len(t) == 1), key=vocab.get))
                raise UserError(
                    f"text has characters outside the vocabulary: {''.join(unknown)!r}; "
                    f"use only these: {known!r}"
                )

    def encode(self, text: str) -> list[int]:
        self._check_characters(text)
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once, on every core (the tokenizers library's own threads)."""
        for text in texts:
            self._check_characters(text)
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

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
        settings.update({name: token for name, token in self.special_tokens().items() if token})
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


def bpe_size(spec: str) -> int:
    """The vocabulary size N of `bpe:N`, checked to hold the byte alphabet and end-of-text."""
    size = spec.removeprefix("bpe:")
    if not size.isdigit():
        raise UserError(f"--tokenizer {spec}: give the vocabulary size, such as bpe:4096")
    if int(size) < BYTE_ALPHABET + 1:
        raise UserError(
            f"--tokenizer {spec} is too small: a byte-level BPE needs at least "
            f"{BYTE_ALPHABET + 1} tokens ({BYTE_ALPHABET} bytes and end-of-text)"
        )
    return int(size)


_NAMED = ("eos_token", "bos_token", "pad_token", "unk_token", "sep_token", "cls_token")


def _configured(directory: Path) -> dict[str, str | None]:
    """The special tokens that special_tokens_map.json and tokenizer_config.json in directory
    name (the latter wins), as keyword arguments of Tokenizer."""
    named: dict[str, str | None] = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            settings = json.loads((directory / file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(settings, dict):
            named.update({k: _named_token(settings[k]) for k in _NAMED if settings.get(k)})
    return _with_bert_markers(named)


def _with_bert_markers(named: dict[str, str | None]) -> dict[str, str | None]:
    """Tokenizer's keyword arguments from named special tokens: a vocabulary that names no
    eos_token but a sep_token (BERT's [SEP]) ends texts with it, and begins them with its
    cls_token ([CLS]), as BERT-vocabulary GPT-2s were pretrained."""
    eos, bos = named.get("eos_token"), named.get("bos_token")
    if eos is None and named.get("sep_token"):
        eos, bos = named["sep_token"], bos or named.get("cls_token")
    return {
        "eos_token": eos,
        "bos_token": bos,
        "pad_token": named.get("pad_token"),
        "unk_token": named.get("unk_token"),
    }
