"""Chat data: the three formats detected and normalised, the chat template and our ids and loss
mask token for token, rows that never put padding or prompts in the loss, length limits counted,
and the embedding grown for the chat tokens."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from conftest import SHARED_DATA, run_script
from gptlab.chat_format import CHAT_TOKENS, ChatFormat, add_chat_format
from gptlab.checkpoints import grow_vocabulary
from gptlab.data import open_split, read_meta
from gptlab.errors import UserError
from gptlab.tasks import chat as chat_data
from gptlab.tokenizer import Tokenizer
from models import IGNORE_INDEX, ModelConfig, build_model

DUMMY = SHARED_DATA / "chat" / "dummy_conversation.json"
ALPACA_ZH = SHARED_DATA / "chat" / "alpaca_zh_demo.json"
GPT2_TOKENIZER = SHARED_DATA / "gpt2-tokenizer"


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return str(path)


# ----------------------------------------------------------------------------------------------
# Formats


def test_sharegpt_is_detected_and_human_gpt_become_user_assistant():
    fmt, conversations, no_reply = chat_data.read_conversations(str(DUMMY))
    assert fmt == "sharegpt" and no_reply == 0 and len(conversations) == 500
    first = conversations[0]
    assert [m["role"] for m in first] == ["user", "assistant", "user", "assistant"]
    assert first[0]["content"] == "Who are you?"
    assert first[1]["content"].startswith("I am Vicuna")
    assert sum(len(c) for c in conversations) == 2000


def test_openai_messages_are_detected_with_system_prompts(tmp_path):
    records = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Bye."},
                {"role": "user", "content": "trailing question without a reply"},
            ]
        },
        {"messages": [{"role": "user", "content": "only a question"}]},
    ]
    fmt, conversations, no_reply = chat_data.read_conversations(
        write_jsonl(tmp_path / "c.jsonl", records)
    )
    assert fmt == "openai" and no_reply == 1
    assert conversations == [records[0]["messages"][:5]]  # cut after the last reply


def test_alpaca_is_one_user_turn_and_one_reply_and_chinese_is_kept_exactly():
    fmt, conversations, _ = chat_data.read_conversations(str(ALPACA_ZH))
    records = json.loads(ALPACA_ZH.read_text(encoding="utf-8"))
    assert fmt == "alpaca" and len(conversations) == len(records) == 1000
    with_input = next(i for i, r in enumerate(records) if r["input"])
    user, reply = conversations[with_input]
    record = records[with_input]
    assert user == {"role": "user", "content": record["instruction"] + "\n\n" + record["input"]}
    assert reply == {"role": "assistant", "content": record["output"]}
    assert conversations[0][0]["content"] == records[0]["instruction"]  # no input: no blank line


def test_sharegpt_system_field_and_jsonl_and_a_saved_hugging_face_data_set(tmp_path):
    from datasets import Dataset

    record = {
        "system": "你是助手。",
        "conversations": [
            {"from": "human", "value": "你好"},
            {"from": "gpt", "value": "你好！有什么可以帮你？"},
        ],
    }
    expected = [
        {"role": "system", "content": "你是助手。"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
    ]
    from_jsonl = chat_data.read_conversations(write_jsonl(tmp_path / "a.jsonl", [record] * 3))
    Dataset.from_list([record] * 3).save_to_disk(tmp_path / "saved")
    from_disk = chat_data.read_conversations(str(tmp_path / "saved"))
    assert from_jsonl == from_disk == ("sharegpt", [expected] * 3, 0)


@pytest.mark.parametrize(
    "records, message",
    [
        (
            [{"prompt": "a", "completion": "b"}],
            "has keys ['completion', 'prompt'], which match none",
        ),
        (
            [{"conversations": [{"from": "human", "value": "a"}, {"from": "tool", "value": "b"}]}],
            "role 'tool'",
        ),
        (
            [{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}],
            "role 'bot'",
        ),
        ([{"messages": [{"role": "user", "content": "a"}]}], "none of the 1 conversations"),
        ([{"messages": [{"role": "user", "content": ["a", "b"]}, {"role": "gpt"}]}], "not text"),
    ],
)
def test_bad_conversations_are_refused_naming_the_problem(tmp_path, records, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        chat_data.read_conversations(str(path))


def test_prepare_data_refuses_a_file_in_no_format_in_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps([{"question": "a", "answer": "b"}]))
    result = run_script(
        "prepare_data.py",
        *("chat", "--input", "x.json", "--out_dir", "out"),
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2 and not (tmp_path / "out").exists()
    (line,) = result.stderr.strip().splitlines()
    assert "['answer', 'question']" in line and "ShareGPT" in line and "Alpaca" in line


# ----------------------------------------------------------------------------------------------
# The template and our ids


def hf_tokenizer(tokenizer: Tokenizer, directory):
    tokenizer.save(directory)
    return AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_our_ids_and_loss_mask_equal_the_chat_template_token_for_token(kind, tmp_path):
    """Multi-turn English (with a system prompt added to some) and Chinese Alpaca conversations:
    ids equal apply_chat_template's, and the loss mask equals its assistant mask."""
    conversations = chat_data.read_conversations(str(DUMMY))[1][::7]
    conversations += chat_data.read_conversations(str(ALPACA_ZH))[1][::50]
    for i in range(0, len(conversations), 3):
        conversations[i] = [{"role": "system", "content": "Answer as Vicuna."}, *conversations[i]]
    tokenizer, added = chat_data.chat_tokenizer(
        "char" if kind == "char" else str(GPT2_TOKENIZER), conversations
    )
    assert added == list(CHAT_TOKENS)
    chat = ChatFormat.of(tokenizer)
    theirs = hf_tokenizer(tokenizer, tmp_path)
    multi_turn = 0
    for messages in conversations:
        ids, mask = chat.conversation(messages)
        expected = theirs.apply_chat_template(messages, return_assistant_tokens_mask=True)
        assert ids == expected["input_ids"]
        assert mask == expected["assistant_masks"]
        # Non-ASCII text round-trips exactly through the ids.
        assert tokenizer.decode(ids) == theirs.apply_chat_template(messages, tokenize=False)
        multi_turn += sum(m["role"] == "assistant" for m in messages) > 1
        prompt = theirs.apply_chat_template(messages[:-1], add_generation_prompt=True)
        assert prompt["input_ids"] == chat.conversation(messages[:-1])[0] + chat.generation_prompt()
    assert multi_turn >= 40


def test_the_template_and_the_markers_travel_with_the_tokenizer(tmp_path):
    tokenizer, _ = add_chat_format(Tokenizer.from_chars("abc"))
    tokenizer.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.chat_template == tokenizer.chat_template
    # a, b, c, then end-of-text (every tokenizer of ours has one), then the chat markers
    assert loaded.eos_token_id == 3
    assert [loaded.backend.token_to_id(t) for t in CHAT_TOKENS] == [4, 5, 6, 7]
    again, added = add_chat_format(loaded)
    assert added == [] and again.vocab_size == 8 and again.eos_token_id == 3
    with pytest.raises(UserError, match="no chat template; fine-tune it on chat data first"):
        ChatFormat.of(Tokenizer.from_chars("abc"), "out/x")


# ----------------------------------------------------------------------------------------------
# Rows: split, packing, padding, length limits


@pytest.fixture(scope="module")
def dummy_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {
        layout: chat_data.prepare_chat(str(DUMMY), "char", root / layout, 400, layout)
        for layout in ("pack", "pad")
    }


def row_contents(directory, split: str) -> list[list[int]]:
    """Each row's tokens up to its last reply token (what follows is padding)."""
    rows = open_split(directory, read_meta(directory), split, 512, 0)
    tokens = rows.rows(np.arange(rows.num_samples))
    mask = np.fromfile(directory / f"{split}_mask.bin", dtype=np.uint8).reshape(tokens.shape)
    return [row[: np.flatnonzero(m)[-1] + 1].tolist() for row, m in zip(tokens, mask)]


def test_split_is_by_conversation_seeded_and_keeps_every_conversation(dummy_sets):
    meta = read_meta(dummy_sets["pack"])
    info = meta["chat"]["splits"]
    assert info["train"]["conversations"] == 450 and info["val"]["conversations"] == 50
    splits = chat_data.split_conversations(500, 0.1, 0.0, seed=0)
    again = chat_data.split_conversations(500, 0.1, 0.0, seed=0)
    other = chat_data.split_conversations(500, 0.1, 0.0, seed=1)
    assert np.array_equal(splits["val"], again["val"])
    assert not np.array_equal(splits["val"], other["val"])
    assert sorted([*splits["val"], *splits["train"]]) == list(range(500))
    with_test = chat_data.split_conversations(500, 0.1, 0.1, seed=0)
    assert [len(with_test[s]) for s in ("train", "val", "test")] == [400, 50, 50]


def test_targets_are_the_replies_and_their_end_token_and_never_padding(dummy_sets):
    for layout, directory in dummy_sets.items():
        meta = read_meta(directory)
        chat = ChatFormat.of(Tokenizer.load(directory))
        split = open_split(directory, meta, "train", 400, 0)
        everything = np.arange(split.num_samples)
        rows, (_, targets) = split.rows(everything), split.fetch(everything)
        reply_targets = 0
        for row, y in zip(rows.tolist(), targets.tolist()):
            in_loss, inside = [], False  # a reply: after the assistant marker, to its end token
            for token in row:
                in_loss.append(inside)
                if inside and token == chat.end_id:
                    inside = False
                elif token == chat.role_ids["assistant"]:
                    inside = True
            assert y == [t if keep else IGNORE_INDEX for t, keep in zip(row[1:], in_loss[1:])]
            reply_targets += sum(in_loss)
        assert reply_targets == meta["chat"]["splits"]["train"]["reply_tokens"]
        padding = meta["chat"]["splits"]["train"]["padding"]
        assert padding > 0.5 if layout == "pad" else padding < 0.25


def test_packing_keeps_conversations_whole_and_pad_puts_one_per_row(dummy_sets):
    conversations = chat_data.read_conversations(str(DUMMY))[1]
    chat = ChatFormat.of(Tokenizer.load(dummy_sets["pad"]))
    order = chat_data.split_conversations(500, 0.1, 0.0, seed=0)["train"]
    padded = row_contents(dummy_sets["pad"], "train")
    assert padded == [chat.conversation(conversations[i])[0] for i in order]
    # Packed rows are runs of whole conversations, in the same order.
    remaining = iter(padded)
    for row in row_contents(dummy_sets["pack"], "train"):
        joined = []
        while len(joined) < len(row):
            joined += next(remaining)
        assert joined == row
    assert next(remaining, None) is None


def test_conversations_longer_than_the_context_are_cut_at_turns_counted_or_refused(tmp_path):
    short = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "short"}]
    long_turn = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x" * 50}]
    records = [{"messages": short + long_turn}] * 8 + [{"messages": long_turn}] * 2
    records += [{"messages": short}] * 10
    path = write_jsonl(tmp_path / "c.jsonl", records)
    meta = read_meta(chat_data.prepare_chat(path, "char", tmp_path / "t", 30, "pad", "truncate"))
    chat = meta["chat"]
    assert (chat["shortened"], chat["cut_mid_reply"], chat["skipped_too_long"]) == (8, 2, 0)
    meta = read_meta(chat_data.prepare_chat(path, "char", tmp_path / "s", 30, "pad", "skip"))
    assert meta["chat"]["skipped_too_long"] == 10
    assert sum(s["conversations"] for s in meta["chat"]["splits"].values()) == 10
    with pytest.raises(UserError, match="10 conversations are longer than 31 tokens"):
        chat_data.prepare_chat(path, "char", tmp_path / "e", 30, "pad", "error")
    assert not (tmp_path / "e").exists()


# ----------------------------------------------------------------------------------------------
# Fine-tuning a model that lacks the chat tokens


@pytest.mark.parametrize("tie", [True, False])
def test_growing_the_vocabulary_keeps_old_logits_and_starts_new_rows_at_the_mean(tie):
    old = Tokenizer.from_chars("abcdef")  # 6 characters and end-of-text
    new, added = add_chat_format(old)
    torch.manual_seed(0)
    arch = "gpt" if tie else "llama"
    model = build_model(
        ModelConfig(arch=arch, vocab_size=7, n_layer=1, n_head=2, n_embd=16, tie_embeddings=tie)
    ).eval()
    grown, note = grow_vocabulary(model, old, new, "ckpt")
    assert grown.config.vocab_size == 11 and "grew the token embedding" in note
    assert ("tied output layer" in note) == tie
    ids = torch.tensor([[0, 1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(grown(ids)[..., :7], model(ids), atol=1e-6)
    for name in ("wte.weight",) if tie else ("wte.weight", "lm_head.weight"):
        table = grown.state_dict()[name]
        assert torch.allclose(table[7:], table[:7].mean(0).expand(4, -1))
    assert (grown.lm_head.weight is grown.wte.weight) == tie
    same, nothing = grow_vocabulary(model, old, old, "ckpt")
    assert same is model and nothing is None
    with pytest.raises(UserError, match="different tokenizer"):
        grow_vocabulary(model, old, Tokenizer.from_chars("abcdeg"), "ckpt")


def test_a_padded_vocabulary_gives_its_unused_rows_to_the_chat_tokens():
    old = Tokenizer.from_chars("abcdef")
    new, _ = add_chat_format(old)
    model = build_model(ModelConfig(vocab_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    grown, note = grow_vocabulary(model, old, new, "ckpt")
    assert grown.config.vocab_size == 16 and "unused rows of its padded embedding" in note
    table = grown.wte.weight.detach()
    assert torch.allclose(table[7:11], table[:7].mean(0).expand(4, -1))
    assert torch.equal(table[11:], model.wte.weight.detach()[11:])
