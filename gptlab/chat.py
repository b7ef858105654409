"""The interactive chat behind `generate.py --chat`: a conversation kept as token ids, a KV cache
kept across turns, replies streamed token by token, and the loop that reads the user's lines.

Each turn appends the user's message and the generation prompt to the history (ids of the chat
format, gptlab/chat_format.py: exactly what the chat template gives) and samples the reply until
the end-of-turn token. The cache holds every token the model has already run over, so a turn runs
the model over its new tokens only (the end-of-turn token of the last reply, the user's message,
the prompt) and then one token per step. When the history no longer leaves room for a reply of
max_new_tokens, the oldest exchanges are dropped (the system prompt stays) and the cache is
rebuilt once over what is left, since every token then sits at another position.

With a byte-level tokenizer (GPT-2's) a token can be part of a character; a reply is then only
allowed tokens that keep it valid UTF-8, so no reply ends in a broken character (see Utf8Guard).
"""

import codecs
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from tokenizers import decoders
from torch import nn

from gptlab.chat_format import ChatFormat
from gptlab.errors import UserError
from gptlab.tokenizer import Tokenizer
from models import KVCache, sample_next_token

HELP = "/clear forgets the conversation (the system prompt stays), /quit or Ctrl-D leaves"


@dataclass
class Sampling:
    temperature: float = 0.8
    """0 is greedy."""
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 200
    """Longest reply; a reply cut here is closed with the end-of-turn token."""


def byte_values() -> dict[str, int]:
    """Byte-level BPE's alphabet: the character that stands for each byte in its vocabulary.
    Printable Latin-1 bytes stand for themselves; the others are moved to 256 and up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


def token_bytes(tokenizer: Tokenizer) -> list[bytes | None] | None:
    """The bytes of every token id (None for special tokens), or None if every token is whole
    characters anyway (a character vocabulary) or the tokenizer is not byte-level."""
    if not isinstance(tokenizer.backend.decoder, decoders.ByteLevel):
        return None
    alphabet = byte_values()
    special = {t.content for t in tokenizer.backend.get_added_tokens_decoder().values()}
    table: list[bytes | None] = [None] * tokenizer.vocab_size
    for token, i in tokenizer.backend.get_vocab().items():
        if token not in special and all(c in alphabet for c in token):
            table[i] = bytes(alphabet[c] for c in token)
    return table


class Utf8Guard:
    """Which tokens may come next so that the reply's bytes stay valid UTF-8.

    The state is the reply's unfinished character (0 to 3 bytes); for each state met, the
    allowed tokens are worked out once over the vocabulary and kept. Special tokens (the
    end-of-turn token) are allowed only between characters.
    """

    def __init__(self, table: list[bytes | None], vocab_size: int):
        self.table = table
        self.vocab_size = vocab_size
        self.masks: dict[bytes, torch.Tensor] = {}

    def allowed(self, pending: bytes) -> torch.Tensor:
        """Tokens that may follow a reply whose unfinished character is `pending`."""
        pending = self.canonical(pending)
        if pending not in self.masks:
            allowed = [
                self.valid_prefix(pending + piece) if piece is not None else not pending
                for piece in self.table
            ]
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            mask[: len(allowed)] = torch.tensor(allowed)
            self.masks[pending] = mask
        return self.masks[pending]

    @staticmethod
    def canonical(pending: bytes) -> bytes:
        """An unfinished character that allows the same continuations: after its lead byte and
        one continuation byte, only the number of bytes still missing matters (so at most a few
        dozen states are ever worked out)."""
        if len(pending) < 2:
            return pending
        lead = 0xE1 if pending[0] < 0xF0 else 0xF1
        return bytes([lead]) + b"\x80" * (len(pending) - 1)

    @staticmethod
    def valid_prefix(data: bytes) -> bool:
        try:
            codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
            return True
        except UnicodeDecodeError:
            return False

    @staticmethod
    def pending(data: bytes) -> bytes:
        """The unfinished character at the end of valid UTF-8 bytes."""
        decoder = codecs.getincrementaldecoder("utf-8")()
        decoder.decode(data, final=False)
        return decoder.getstate()[0]


class ChatSession:
    """One conversation with a model (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        system: str | None = None,
        sampling: Sampling | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        notify: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
        source: str = "the checkpoint",
    ):
        self.format = ChatFormat.of(tokenizer, source)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.sampling = sampling or Sampling()
        self.use_cache = use_cache
        self.generator = generator
        self.notify = notify
        self.block_size = model.config.block_size
        if model.config.vocab_size < tokenizer.vocab_size:
            raise UserError(
                f"{source}: the model has {model.config.vocab_size} tokens but its tokenizer "
                f"{tokenizer.vocab_size}; it was not trained on chat data"
            )
        if not 1 <= self.sampling.max_new_tokens < self.block_size:
            raise UserError(
                f"--max_new_tokens must be between 1 and {self.block_size - 1} (the context of "
                f"{self.block_size} tokens holds the history and the reply)"
            )
        self.system = self.format.message("system", system)[0] if system else []
        if len(self.system) > self.block_size // 2:
            raise UserError(
                f"--system is {len(self.system)} tokens; keep it under half the context "
                f"({self.block_size // 2})"
            )
        bytes_table = token_bytes(tokenizer)
        self.guard = Utf8Guard(bytes_table, model.config.vocab_size) if bytes_table else None
        self.bytes_table = bytes_table
        self.tokens_run = 0
        """Tokens the model has run over (with the cache: each token once, unless rebuilt)."""
        self.clear()

    def clear(self) -> None:
        """Forget the conversation; the system prompt stays."""
        self.tokens: list[int] = list(self.system)
        self.exchange_lengths: list[int] = []
        self.cache: KVCache | None = None

    def _drop_oldest(self, room_needed: int) -> None:
        """Drop the oldest exchanges until room_needed more tokens fit with a full reply."""
        dropped = 0
        budget = self.block_size - self.sampling.max_new_tokens
        while self.exchange_lengths and len(self.tokens) + room_needed > budget:
            start = len(self.system)
            del self.tokens[start : start + self.exchange_lengths.pop(0)]
            dropped += 1
        if dropped:
            self.cache = None  # every kept token moved: the cache is rebuilt over them once
            self.notify(
                f"(the conversation outgrew the context of {self.block_size} tokens: dropped the "
                f"oldest {dropped} exchange{'s' * (dropped > 1)}, {len(self.exchange_lengths)} "
                "kept)"
            )

    @torch.no_grad()
    def _next_logits(self) -> torch.Tensor:
        """Logits of the token after self.tokens: with the cache, the model runs only over the
        tokens it has not seen yet; without, over the whole history."""
        device = next(self.model.parameters()).device
        if not self.use_cache:
            self.tokens_run += len(self.tokens)
            ids = torch.tensor([self.tokens], device=device)
            return self.model(ids, logits_to_keep=1)[0, -1]
        if self.cache is None:
            self.cache = KVCache(self.model.config.n_layer, self.block_size)
        new = self.tokens[self.cache.length :]
        self.tokens_run += len(new)
        ids = torch.tensor([new], device=device)
        return self.model(ids, cache=self.cache, logits_to_keep=1)[0, -1]

    def reply(self, message: str) -> Iterator[str]:
        """Answer a user message: the reply's text, streamed as it is sampled."""
        turn = self.format.message("user", message)[0] + self.format.generation_prompt()
        room = self.block_size - self.sampling.max_new_tokens - len(self.system)
        if len(turn) > room:
            raise UserError(
                f"the message is {len(turn)} tokens; with a reply of up to "
                f"{self.sampling.max_new_tokens} tokens the context has room for {room}: "
                "shorten it (or lower --max_new_tokens)"
            )
        self._drop_oldest(len(turn))
        start = len(self.tokens)
        self.tokens += turn
        reply: list[int] = []
        shown = ""
        for _ in range(self.sampling.max_new_tokens):
            logits = self._next_logits()
            if self.guard is not None:
                pending = Utf8Guard.pending(self._bytes(reply))
                allowed = self.guard.allowed(pending).to(logits.device)
                logits = logits.masked_fill(~allowed, float("-inf"))
            token = int(self._sample(logits))
            if token in self.format.stop_ids:  # the history closes the turn with end-of-turn
                self.tokens.append(self.format.end_id)
                break
            self.tokens.append(token)
            reply.append(token)
            text = self.tokenizer.decode(reply)
            if not text.endswith("\ufffd"):  # a character still being spelled out byte by byte
                yield text[len(shown) :]
                shown = text
        else:  # cut at max_new_tokens: no half character left, and the turn closed
            while self.guard is not None and reply and Utf8Guard.pending(self._bytes(reply)):
                reply.pop()
                self.tokens.pop()
            self.tokens.append(self.format.end_id)
        text = self.tokenizer.decode(reply)
        if text != shown:
            yield text[len(shown) :]
        self.exchange_lengths.append(len(self.tokens) - start)

    def _bytes(self, ids: list[int]) -> bytes:
        return b"".join(self.bytes_table[i] or b"" for i in ids)

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        s = self.sampling
        return sample_next_token(logits[None], s.temperature, s.top_k, s.top_p, self.generator)[0]


def one_line(text: str) -> str:
    """A reply as one line of output: its own line breaks written as \\n (backslashes doubled)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def run_chat(
    session: ChatSession,
    lines: Iterable[str],
    interactive: bool,
    out=sys.stdout,
    err=sys.stderr,
) -> None:
    """Read user messages and answer each. Interactive: a prompt, the reply streamed below it.
    From a pipe or file: one message per line in, one reply per line out (streamed too), every
    notice on stderr, so scripts can read replies line by line."""
    if interactive:
        print(f"chat: {HELP}", file=err)
    for line in lines:
        message = line.rstrip("\n").rstrip("\r")
        command = message.strip().lower()
        if command in ("/quit", "/exit"):
            return
        if command == "/clear":
            session.clear()
            print("(conversation cleared)", file=err)
            continue
        if command == "/help":
            print(HELP, file=err)
            continue
        if not message.strip():
            continue
        try:
            for piece in session.reply(message):
                out.write(piece if interactive else one_line(piece))
                out.flush()
        except UserError as error:
            print(f"error: {error}", file=err)
        out.write("\n")
        out.flush()


def terminal_lines(prompt: str = "> ") -> Iterator[str]:
    """The user's lines typed at a terminal (with line editing), until Ctrl-D."""
    import readline  # noqa: F401  (input() then edits lines and keeps a history)

    while True:
        try:
            yield input(prompt)
        except EOFError:
            print()
            return
