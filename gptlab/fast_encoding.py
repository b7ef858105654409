"""Encoding a corpus fast, into exactly the ids that Tokenizer.encode (and transformers) give.

- A character vocabulary: a lookup of code points in numpy.
- A byte-level BPE with GPT-2's pre-tokenization (GPT-2 itself, any bpe:N we train): tiktoken,
  which applies the same merges three to six times faster than the tokenizers library. Its rule
  (merge the adjacent pair whose result has the lowest id) is the merge list's rule when merge
  results are numbered in merge order, which is checked; a first batch of the corpus is also
  encoded both ways and must agree, or the tokenizers library is used throughout.
- Anything else: the tokenizers library's batch encoding.

Each runs on every core. Special tokens written in the text (such as <|endoftext|>) become their
ids, as the tokenizers library does.
"""

import json
import os
import re

import numpy as np

from gptlab.tokenizer import Tokenizer

CHECK_CHARS = 1 << 18
"""Characters of the corpus's first texts that tiktoken and tokenizers must encode alike."""
# The tokenizers library's ByteLevel pre-tokenizer pattern (GPT-2's), as it writes it.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's stand-in character for each byte: printable Latin-1 bytes stand for themselves,
    the others take the characters from U+0100 on, in byte order. {character: byte}."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    alphabet = {chr(b): b for b in printable}
    alphabet.update({chr(256 + i): b for i, b in enumerate(others)})
    return alphabet


class BatchEncoder:
    """encoder(texts) -> the ids of each text; `engine` says which way it encodes."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.threads = os.cpu_count() or 1
        backend = tokenizer.backend
        specials = [t.content for t in backend.get_added_tokens_decoder().values() if t.special]
        self.specials = {token: backend.token_to_id(token) for token in specials}
        self.special_pattern = (
            re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
            if specials
            else None
        )
        self.engine, self._encode_plain = "tokenizers", self._with_tokenizers
        if tokenizer.is_char_level:
            self._set_up_characters()
        else:
            self._set_up_tiktoken()

    # -- engines -------------------------------------------------------------------------------

    def _with_tokenizers(self, texts: list[str]) -> list:
        return self.tokenizer.encode_batch(texts)

    def _set_up_characters(self) -> None:
        vocab = self.tokenizer.backend.get_vocab()
        chars = sorted((c for c in vocab if len(c) == 1 and c not in self.specials), key=ord)
        self.code_points = np.array([ord(c) for c in chars], dtype=np.uint32)
        self.char_ids = np.array([vocab[c] for c in chars], dtype=np.int64)
        self.engine, self._encode_plain = "characters", self._with_characters

    def _with_characters(self, texts: list[str]) -> list:
        encoded = []
        for text in texts:
            points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            where = np.searchsorted(self.code_points, points)
            where = np.minimum(where, len(self.code_points) - 1)
            if np.array_equal(self.code_points[where], points):
                encoded.append(self.char_ids[where])
            else:  # characters outside the vocabulary: <|unk|> for each, or the error naming them
                encoded.append(np.asarray(self.tokenizer.encode(text), dtype=np.int64))
        return encoded

    def _set_up_tiktoken(self) -> None:
        try:
            import tiktoken
        except ImportError:
            return
        ranks = mergeable_ranks(self.tokenizer)
        if ranks is None:
            return
        self.tiktoken = tiktoken.Encoding(
            "gptlab", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={}
        )
        self.engine, self._encode_plain = "tiktoken", self._with_tiktoken
        self.checked = False

    def _with_tiktoken(self, texts: list[str]) -> list:
        encoded = self.tiktoken.encode_ordinary_batch(texts, num_threads=self.threads)
        if not self.checked:  # the first texts both ways: any difference and tiktoken is out
            self.checked = True
            sample, chars = 0, 0
            while sample < len(texts) and chars < CHECK_CHARS:
                chars += len(texts[sample])
                sample += 1
            if encoded[:sample] != self._with_tokenizers(texts[:sample]):
                print("tiktoken and tokenizers disagree on this vocabulary; using tokenizers")
                self.engine, self._encode_plain = "tokenizers", self._with_tokenizers
                return self._with_tokenizers(texts)
        return encoded

    # -- the public call -----------------------------------------------------------------------

    def __call__(self, texts: list[str]) -> list:
        """The ids of each text (lists or arrays of ints)."""
        if self.special_pattern is None or self.engine == "tokenizers":
            return self._encode_plain(texts)
        plain = [not self.special_pattern.search(text) for text in texts]
        encoded = self._encode_plain([t for t, p in zip(texts, plain) if p])
        if all(plain):
            return encoded
        results, done = [], iter(encoded)
        for text, is_plain in zip(texts, plain):
            results.append(next(done) if is_plain else self._with_specials(text))
        return results

    def _with_specials(self, text: str) -> list[int]:
        """A text that holds special tokens: the text between them encoded, their ids between."""
        ids, start = [], 0
        for match in self.special_pattern.finditer(text):
            ids.extend(int(i) for i in self._encode_plain([text[start : match.start()]])[0])
            ids.append(self.specials[match.group()])
            start = match.end()
        ids.extend(int(i) for i in self._encode_plain([text[start:]])[0])
        return ids


def mergeable_ranks(tokenizer: Tokenizer) -> dict[bytes, int] | None:
    """{token bytes: id} of a byte-level BPE with GPT-2's pre-tokenization whose merge results
    are numbered in merge order (so that tiktoken's rule is the merge list's), else None."""
    settings = json.loads(tokenizer.backend.to_str())
    model, pre = settings["model"], settings.get("pre_tokenizer") or {}
    plain_bpe = model.get("type") == "BPE" and not model.get("dropout")
    plain_bpe = plain_bpe and not model.get("continuing_subword_prefix")
    plain_bpe = plain_bpe and not model.get("end_of_word_suffix") and not model.get("ignore_merges")
    gpt2_split = pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
    gpt2_split = gpt2_split and not pre.get("add_prefix_space")
    if not (plain_bpe and gpt2_split and settings.get("normalizer") is None):
        return None
    alphabet = byte_level_alphabet()
    added = {t.content for t in tokenizer.backend.get_added_tokens_decoder().values()}
    vocab = {token: i for token, i in model["vocab"].items() if token not in added}
    try:
        ranks = {bytes(alphabet[c] for c in token): i for token, i in vocab.items()}
    except KeyError:  # a token outside the byte alphabet
        return None
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    results = [vocab.get(a + b) for a, b in merges]
    singles = sum(len(token) == 1 for token in ranks)
    in_order = all(r is not None for r in results) and all(
        a < b for a, b in zip(results, results[1:])
    )
    if not in_order or singles != 256 or len(ranks) != 256 + len(merges):
        return None
    return ranks
