"""The chat format, written once as a Hugging Face chat template, and the token ids it stands for.

A conversation is a list of messages {"role": system|user|assistant, "content": text}. Each message
is its role's marker, its text and the end-of-turn marker; a reply is asked for with the assistant
marker alone (the generation prompt):

    <|system|>You are helpful.<|end|><|user|>Who are you?<|end|><|assistant|>I am ...<|end|>

The markers are special tokens, so they are one id each and never come out of ordinary text.
CHAT_TEMPLATE is the Jinja form transformers runs (`apply_chat_template`); the `{% generation %}`
markers around each reply and its end-of-turn token are what the loss covers, and what transformers
reports with `return_assistant_tokens_mask=True`. ChatFormat builds the same ids message by message
(the tests check they equal the template's, mask included), so training data and the interactive
chat, which feeds each turn's new tokens onto a KV cache, need no Jinja.
"""

from dataclasses import dataclass

import tokenizers

from gptlab.errors import UserError
from gptlab.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
END_OF_TURN = "<|end|>"
CHAT_TOKENS = (*ROLE_TOKENS.values(), END_OF_TURN)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('roles are system, user and assistant, not ' + message['role']) }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|assistant|>' }}{% generation %}{{- message['content'] + '<|end|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}"
)


def add_chat_format(tokenizer: Tokenizer) -> tuple[Tokenizer, list[str]]:
    """A copy of the tokenizer that speaks the chat format: the chat tokens it lacks appended as
    special tokens (new ids after the existing ones) and the template. Returns it and the tokens
    added, so that a model trained on the old vocabulary can grow its embedding for them."""
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    missing = [token for token in CHAT_TOKENS if backend.token_to_id(token) is None]
    backend.add_special_tokens(missing)
    return Tokenizer(backend, chat_template=CHAT_TEMPLATE, **tokenizer.special_tokens()), missing


@dataclass
class ChatFormat:
    """Token ids of chat messages for one tokenizer."""

    tokenizer: Tokenizer
    role_ids: dict[str, int]
    end_id: int

    @classmethod
    def of(cls, tokenizer: Tokenizer, source: str = "the tokenizer") -> "ChatFormat":
        """The format of a tokenizer made for chat; refuses one without our template."""
        if tokenizer.chat_template is None:
            raise UserError(
                f"{source} has no chat template; fine-tune it on chat data first: `python "
                "prepare_data.py chat --input FILE --tokenizer DIR` with its tokenizer, then "
                "`python train.py --init_from=... --data.dir=...` (see README, Chat)"
            )
        if tokenizer.chat_template != CHAT_TEMPLATE:
            raise UserError(
                f"{source} has a chat template other than gptlab's; fine-tune it on data "
                "prepared with `python prepare_data.py chat` to use it here"
            )
        ids = {token: tokenizer.backend.token_to_id(token) for token in CHAT_TOKENS}
        if None in ids.values():
            raise UserError(f"{source} lacks the chat tokens {', '.join(CHAT_TOKENS)}")
        roles = {role: ids[token] for role, token in ROLE_TOKENS.items()}
        return cls(tokenizer, roles, ids[END_OF_TURN])

    @property
    def stop_ids(self) -> list[int]:
        """What ends a reply: end-of-turn, and end-of-text where the tokenizer has one (a model
        should never say it in a chat, but if it does the reply is over, as in transformers)."""
        eos = self.tokenizer.eos_token_id
        return [self.end_id] + ([eos] if eos is not None and eos != self.end_id else [])

    def message(self, role: str, content: str) -> tuple[list[int], list[int]]:
        """Ids of one message, and its loss mask: 1 on a reply's text and end-of-turn token."""
        text = self.tokenizer.encode(content) if content else []
        ids = [self.role_ids[role], *text, self.end_id]
        reply = 1 if role == "assistant" else 0
        return ids, [0] + [reply] * (len(text) + 1)

    def conversation(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Ids and loss mask of a whole conversation, as the template renders and tokenizes it."""
        ids, mask = [], []
        for message in messages:
            message_ids, message_mask = self.message(message["role"], message["content"])
            ids += message_ids
            mask += message_mask
        return ids, mask

    def generation_prompt(self) -> list[int]:
        return [self.role_ids["assistant"]]
