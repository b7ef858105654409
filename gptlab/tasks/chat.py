"""Chat data: conversations in the formats people have, normalised, split by conversation, turned
into the chat format's token ids with a loss mask on the replies, and laid out as fixed-length
examples (data.ExampleSplit), so chat fine-tuning runs through the one training loop.

Formats, detected from the records themselves:
    ShareGPT  {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}
    OpenAI    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
    Alpaca    {"instruction": ..., "input": ..., "output": ...}: one user turn (the instruction,
              then the input after a blank line) and one reply; optional "system" and "history"
              ([[instruction, reply], ...] before it), as in LLaMA-Factory's files
read from a .json list, a .jsonl file, a directory written by datasets' save_to_disk, or a
Hugging Face data set name.

The loss covers every reply and its end-of-turn token, each with the conversation before it; the
system prompt, user turns and markers only condition. Rows are packed by default: whole
conversations one after another until the next does not fit, the rest padded; padding is never a
target. Packing wastes little compute on padding (on the dummy set one conversation per row would
leave two thirds of each 512-token row empty); its cost is that a conversation can attend to the
unrelated ones before it in its row. `--layout pad` puts one conversation per row instead, each
starting at position 0 exactly as in the chat.
"""

import argparse
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gptlab import storage
from gptlab.chat_format import ChatFormat, add_chat_format
from gptlab.cli import fraction, fraction_or_zero, positive_int, random_seed
from gptlab.data import is_data_set, token_dtype, write_data_set
from gptlab.errors import UserError
from gptlab.tokenizer import Tokenizer

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
SHAREGPT_ROLES["system"] = "system"
FORMATS = (
    "ShareGPT ('conversations' of from/value), OpenAI ('messages' of role/content), "
    "Alpaca ('instruction', 'input', 'output')"
)
LAYOUTS = ("pack", "pad")
LAID_OUT = {"pack": "packed", "pad": "one per row"}
TOO_LONG = ("truncate", "skip", "error")


# ----------------------------------------------------------------------------------------------
# Reading and normalising


def read_records(source: str, hf_split: str = "train") -> list:
    """The records of a .json list, a .jsonl file, a save_to_disk directory or a hub data set."""
    path = Path(source)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise UserError(f"{source} is not UTF-8 (byte {error.start}); convert it") from None
        if path.suffix == ".jsonl":
            records = []
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    records.append(_parse_json(line, f"{source} line {number}"))
            return records
        records = _parse_json(text, source)
        if isinstance(records, dict) and len(records) == 1:  # {"data": [...]}, {"train": [...]}
            records = next(iter(records.values()))
        if not isinstance(records, list):
            raise UserError(f"{source} must hold a JSON list of conversations (or be .jsonl)")
        return records
    hub_name = source.count("/") <= 1 and not source.startswith((".", "/", "~"))
    if not path.exists() and (path.suffix in (".json", ".jsonl") or not hub_name):
        raise UserError(f"input {source} not found")
    import datasets  # only here: it is slow to import

    if path.is_dir() and (
        (path / "dataset_info.json").is_file() or (path / "state.json").is_file()
    ):
        loaded = datasets.load_from_disk(str(path))
    elif path.exists():  # a directory of data files
        loaded = _load_dataset(datasets, str(path), hf_split)
    else:
        loaded = _load_dataset(datasets, source, hf_split)
    if isinstance(loaded, datasets.DatasetDict):
        if hf_split not in loaded:
            raise UserError(f"{source} has splits {sorted(loaded)}, not {hf_split}; set --hf_split")
        loaded = loaded[hf_split]
    return [dict(record) for record in loaded]


def _parse_json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{where} is not valid JSON ({error.msg}, line {error.lineno})") from None


def _load_dataset(datasets, name: str, split: str):
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as error:  # offline, unknown name, no such split, unreadable files, ...
        raise UserError(
            f"could not load data set {name!r} ({error.__class__.__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); pass a .json or .jsonl file, "
            "a save_to_disk directory, or a Hugging Face data set name (needs the network)"
        ) from None


def detect_format(record, where: str) -> str:
    """ "sharegpt", "openai" or "alpaca", from a record's keys (and its messages' keys)."""
    if not isinstance(record, dict):
        raise UserError(f"{where} is a {type(record).__name__}, not an object; formats: {FORMATS}")
    for key in ("conversations", "messages"):
        if isinstance(record.get(key), list):
            first = next((m for m in record[key] if isinstance(m, dict)), {})
            if {"from", "value"} <= set(first):
                return "sharegpt"
            if {"role", "content"} <= set(first):
                return "openai"
            raise UserError(
                f"{where}: the messages under {key!r} have keys {sorted(first)}; expected "
                "from/value (ShareGPT) or role/content (OpenAI)"
            )
    if {"instruction", "output"} <= set(record):
        return "alpaca"
    raise UserError(
        f"{where} has keys {sorted(record)}, which match none of the formats: {FORMATS}"
    )


def _text(value, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where} is a {type(value).__name__}, not text")
    return value


def normalise(record, fmt: str, where: str) -> list[dict]:
    """The record as a list of {"role": system|user|assistant, "content": str}."""
    if not isinstance(record, dict):
        raise UserError(f"{where} is a {type(record).__name__}, not an object")
    if fmt == "alpaca":
        if not {"instruction", "output"} <= set(record):
            raise UserError(f"{where} has keys {sorted(record)}; an Alpaca record needs these")
        messages = []
        if record.get("system"):
            messages.append({"role": "system", "content": _text(record["system"], where)})
        for pair in record.get("history") or []:
            if not (isinstance(pair, list | tuple) and len(pair) == 2):
                raise UserError(f"{where}: history must be a list of [instruction, reply] pairs")
            messages.append({"role": "user", "content": _text(pair[0], f"{where} history")})
            messages.append({"role": "assistant", "content": _text(pair[1], f"{where} history")})
        instruction = _text(record["instruction"], f"{where} instruction")
        extra = _text(record.get("input"), f"{where} input")
        user = f"{instruction}\n\n{extra}" if instruction and extra else instruction or extra
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": _text(record["output"], where)})
        return messages
    key, role_key, content_key = (
        ("conversations", "from", "value") if fmt == "sharegpt" else ("messages", "role", "content")
    )
    if not isinstance(record.get(key), list):
        raise UserError(f"{where} has no list {key!r} (keys {sorted(record)})")
    messages = []
    if fmt == "sharegpt" and record.get("system"):  # LLaMA-Factory's ShareGPT files
        messages.append({"role": "system", "content": _text(record["system"], where)})
    for i, message in enumerate(record[key]):
        at = f"{where} message {i}"
        if not isinstance(message, dict) or role_key not in message:
            raise UserError(f"{at} has no {role_key!r}")
        role = message[role_key]
        mapped = SHAREGPT_ROLES.get(role) if fmt == "sharegpt" else role
        if mapped not in ("system", "user", "assistant"):
            accepted = "human, gpt, system" if fmt == "sharegpt" else "system, user, assistant"
            raise UserError(
                f"{at} has the role {role!r}; roles must be system, user or assistant "
                f"({accepted}); drop or rename such messages"
            )
        messages.append({"role": mapped, "content": _text(message.get(content_key), at)})
    return messages


def read_conversations(source: str, hf_split: str = "train") -> tuple[str, list[list[dict]], int]:
    """(format, conversations that have a reply, how many had none): each conversation is cut
    after its last reply (a trailing user turn teaches nothing)."""
    records = read_records(source, hf_split)
    if not records:
        raise UserError(f"{source} holds no conversations")
    fmt = detect_format(records[0], f"{source} record 0")
    conversations, no_reply = [], 0
    for i, record in enumerate(records):
        messages = normalise(record, fmt, f"{source} record {i}")
        last_reply = max(
            (j for j, m in enumerate(messages) if m["role"] == "assistant"), default=-1
        )
        if last_reply < 0:
            no_reply += 1
            continue
        conversations.append(messages[: last_reply + 1])
    if not conversations:
        raise UserError(
            f"none of the {len(records)} conversations in {source} has an assistant turn"
        )
    return fmt, conversations, no_reply


# ----------------------------------------------------------------------------------------------
# Token ids, length limits and the layout of rows


@dataclass
class Encoded:
    """The conversations of one split as ids and masks, and what fitting them to rows did."""

    ids: list[list[int]] = field(default_factory=list)
    masks: list[list[int]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


def fit_to_length(ids: list[int], mask: list[int], limit: int, too_long: str) -> tuple | None:
    """The conversation cut to `limit` tokens, or None to skip it (see --too_long).

    truncate keeps the turns up to the last reply that fits whole; if not even the first reply
    fits, it is cut mid-way (its start still trains). The caller counts what happened."""
    if len(ids) <= limit:
        return ids, mask, "whole"
    if too_long == "skip":
        return None
    # Ends of replies: positions right after a reply's end-of-turn token (mask 1 then 0 or end).
    ends = [i + 1 for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
    fitting = [end for end in ends if end <= limit]
    if fitting:
        return ids[: fitting[-1]], mask[: fitting[-1]], "shortened"
    if any(mask[:limit]):
        return ids[:limit], mask[:limit], "cut_mid_reply"
    return None


def encode_split(
    conversations: list[list[dict]], chat: ChatFormat, limit: int, too_long: str
) -> Encoded:
    encoded = Encoded()
    for messages in conversations:
        ids, mask = chat.conversation(messages)
        fitted = fit_to_length(ids, mask, limit, too_long)
        if fitted is None:
            encoded.counts["skipped_too_long"] += 1
            continue
        ids, mask, how = fitted
        encoded.counts[how] += 1
        encoded.ids.append(ids)
        encoded.masks.append(mask)
    return encoded


def lay_out_rows(encoded: Encoded, length: int, layout: str, pad_id: int) -> tuple:
    """Rows (n, length) of token ids and masks: conversations packed in order, or one per row."""
    rows, row_masks = [], []
    row, row_mask = [], []
    for ids, mask in zip(encoded.ids, encoded.masks):
        if row and (layout == "pad" or len(row) + len(ids) > length):
            rows.append(row)
            row_masks.append(row_mask)
            row, row_mask = [], []
        row, row_mask = row + ids, row_mask + mask
    if row:
        rows.append(row)
        row_masks.append(row_mask)
    tokens = np.full((len(rows), length), pad_id, dtype=np.int64)
    masks = np.zeros((len(rows), length), dtype=np.uint8)
    for i, (row, row_mask) in enumerate(zip(rows, row_masks)):
        tokens[i, : len(row)] = row
        masks[i, : len(row_mask)] = row_mask
    return tokens, masks


def split_conversations(
    count: int, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Indices of each split: one seeded shuffle of the conversations, cut in three."""
    order = np.random.default_rng(seed).permutation(count)
    n_val = max(1, round(count * val_fraction))
    n_test = round(count * test_fraction) if test_fraction > 0 else 0
    if test_fraction > 0:
        n_test = max(1, n_test)
    if n_val + n_test >= count:
        raise UserError(
            f"{count} conversations are too few for a val fraction of {val_fraction} and a test "
            f"fraction of {test_fraction}; use more conversations or smaller fractions"
        )
    splits = {"train": order[n_val + n_test :], "val": order[:n_val]}
    if n_test:
        splits["test"] = order[n_val : n_val + n_test]
    return splits


def chat_tokenizer(name: str, conversations: list[list[dict]]) -> tuple[Tokenizer, list[str]]:
    """The tokenizer to prepare with, in the chat format: "char" builds a character vocabulary
    from the conversations; anything else is loaded (a tokenizer, checkpoint or hub name)."""
    if name == "char":
        chars = {c for messages in conversations for m in messages for c in m["content"]}
        if not chars:
            raise UserError("the conversations hold no text")
        return add_chat_format(Tokenizer.from_chars("".join(chars)))
    return add_chat_format(Tokenizer.load(name))


def prepare_chat(
    source: str,
    tokenizer_name: str,
    out_dir: Path,
    block_size: int = 512,
    layout: str = "pack",
    too_long: str = "truncate",
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    seed: int = 0,
    hf_split: str = "train",
    overwrite: bool = False,
) -> Path:
    """Write a chat data set (see the module docstring) and print what was done to it."""
    if layout not in LAYOUTS or too_long not in TOO_LONG:
        raise UserError(f"--layout must be one of {LAYOUTS} and --too_long one of {TOO_LONG}")
    for name, value in (("--val_fraction", val_fraction), ("--test_fraction", test_fraction)):
        if not (math.isfinite(value) and 0 <= value < 1):
            raise UserError(f"{name} {value} must be at least 0 and below 1")
    if val_fraction <= 0:
        raise UserError("--val_fraction must be above 0: training scores every macro-batch on val")
    if block_size < 2:
        raise UserError(f"--block_size {block_size} must be at least 2")
    reads_from = [Path(p) for p in (source, tokenizer_name) if Path(p).exists()]
    storage.check_output_dir(out_dir, "data set", is_data_set, reads_from)  # before any reading
    if is_data_set(out_dir) and not overwrite:
        raise UserError(f"data set {out_dir} already exists; pass --overwrite to replace it")
    fmt, conversations, no_reply = read_conversations(source, hf_split)
    tokenizer, added = chat_tokenizer(tokenizer_name, conversations)
    chat = ChatFormat.of(tokenizer)
    length = block_size + 1  # a row's inputs are its first block_size tokens
    splits = split_conversations(len(conversations), val_fraction, test_fraction, seed)
    encoded = {
        split: encode_split([conversations[i] for i in indices], chat, length, too_long)
        for split, indices in splits.items()
    }
    counts = sum((e.counts for e in encoded.values()), Counter())
    if too_long == "error" and len(conversations) > counts["whole"]:
        longest = max(len(chat.conversation(m)[0]) for m in conversations)
        raise UserError(
            f"{len(conversations) - counts['whole']} conversations are longer than {length} tokens "
            f"(the longest {longest}); raise --block_size or pass --too_long truncate or skip"
        )
    if any(not e.ids for e in encoded.values()):
        raise UserError(
            f"every conversation of a split is longer than --block_size {block_size}; raise it"
        )
    dtype = token_dtype(tokenizer.vocab_size)
    summary = {
        "format": fmt,
        "conversations": len(conversations) + no_reply,
        "skipped_no_reply": no_reply,
        "skipped_too_long": counts["skipped_too_long"],
        "shortened": counts["shortened"],
        "cut_mid_reply": counts["cut_mid_reply"],
        "layout": layout,
        "added_tokens": added,
    }

    def fill(tmp_dir: Path) -> dict:
        rows, split_info = {}, {}
        for split, enc in encoded.items():
            tokens, masks = lay_out_rows(enc, length, layout, chat.end_id)
            tokens.astype(dtype).tofile(tmp_dir / f"{split}.bin")
            masks.tofile(tmp_dir / f"{split}_mask.bin")
            rows[split] = len(tokens)
            used = sum(len(ids) for ids in enc.ids)
            split_info[split] = {
                "conversations": len(enc.ids),
                "reply_tokens": int(sum(sum(m) for m in enc.masks)),
                "padding": round(1 - used / tokens.size, 4),
            }
        return {
            "format": "examples",
            "dtype": dtype,
            "example_length": length,
            "splits": rows,
            "source": str(source),
            "tokenizer": tokenizer_name,
            "chat": {**summary, "splits": split_info},
        }

    write_data_set(out_dir, tokenizer, fill, overwrite, reads_from=reads_from)
    print(describe(json.loads((out_dir / "meta.json").read_text())))
    return out_dir


def describe(meta: dict) -> str:
    """One line on what preparing a chat data set did: nothing is cut or skipped unsaid."""
    chat = meta["chat"]
    splits = ", ".join(
        f"{split} {info['conversations']} conversations in {meta['splits'][split]} rows "
        f"({info['padding']:.0%} padding)"
        for split, info in chat["splits"].items()
    )
    added = f"; added tokens {' '.join(chat['added_tokens'])}" if chat["added_tokens"] else ""
    return (
        f"chat data ({chat['format']}, {LAID_OUT[chat['layout']]} in rows of "
        f"{meta['example_length'] - 1} tokens): "
        f"{splits}; of {chat['conversations']} conversations {chat['skipped_no_reply']} skipped "
        f"without a reply, {chat['skipped_too_long']} skipped as too long, {chat['shortened']} "
        f"cut to their first turns, {chat['cut_mid_reply']} cut mid-reply{added}"
    )


# ----------------------------------------------------------------------------------------------
# prepare_data.py chat (evaluate.py --task loss scores a chat set over its reply tokens)

COMMANDS = {"chat": "conversations (ShareGPT, OpenAI messages, Alpaca) for chat fine-tuning"}
SCORES: dict[str, str] = {}
CHECKPOINT_METRIC = "val_loss"


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument(
        "--input", required=True, help=".json or .jsonl file, save_to_disk directory or hub name"
    )
    parser.add_argument(
        "--tokenizer",
        default="char",
        help="'char' (a character vocabulary of the data), or a tokenizer or checkpoint directory "
        "or hub name; the chat tokens it lacks are added",
    )
    parser.add_argument("--name", default="chat", help="data set name (directory under data/)")
    parser.add_argument(
        "--block_size", type=positive_int, default=512, help="context: tokens per row"
    )
    parser.add_argument(
        "--layout", choices=LAYOUTS, default="pack", help="pack conversations or one per row"
    )
    parser.add_argument(
        "--too_long",
        choices=TOO_LONG,
        default="truncate",
        help="a conversation longer than the context: keep the turns that fit (cutting the first "
        "reply if even it does not fit), skip it, or stop with an error",
    )
    parser.add_argument(
        "--val_fraction", type=fraction, default=0.1, help="share of conversations for val"
    )
    parser.add_argument(
        "--test_fraction", type=fraction_or_zero, default=0.0, help="for test (0: none)"
    )
    parser.add_argument("--seed", type=random_seed, default=0, help="seed of the split")
    parser.add_argument("--hf_split", default="train", help="split of a Hugging Face data set")


def prepare(command: str, args: argparse.Namespace, out_dir: Path) -> Path:
    return prepare_chat(
        args.input,
        args.tokenizer,
        out_dir,
        block_size=args.block_size,
        layout=args.layout,
        too_long=args.too_long,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        hf_split=args.hf_split,
        overwrite=args.overwrite,
    )


def score(task_name: str, model, tokenizer, meta, split, indices, accelerator, batch_size):
    raise UserError(f"no task {task_name!r} for chat data; use --task loss")


def val_metrics(meta: dict, tokenizer: Tokenizer, split, samples: int):
    """The val loss already covers only reply tokens; chat adds nothing to it."""
    return None
