"""The interactive chat: the KV cache kept across turns gives what rerunning the history gives,
each turn runs only its new tokens, old turns are dropped with a notice, byte-level replies stay
valid UTF-8, and the chat driven through a pipe answers one line per line."""

import io
import json

import pytest
import torch

from conftest import SHARED_DATA, run_script
from gptlab.chat import ChatSession, Sampling, run_chat
from gptlab.chat_format import ChatFormat, add_chat_format
from gptlab.checkpoints import save_checkpoint
from gptlab.errors import UserError
from gptlab.tokenizer import Tokenizer
from models import ModelConfig, build_model

CHARS = "abcdefghijklmnopqrstuvwxyz ?!.,'-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
MESSAGES = ["What is up?", "Who are you?", "Are you GPT-4?", "Goodbye", "Tell me more."]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second thread only adds contention on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chat_tokenizer(source: str = "chars") -> Tokenizer:
    base = Tokenizer.from_chars(CHARS) if source == "chars" else Tokenizer.load(source)
    return add_chat_format(base)[0]


def random_model(tokenizer: Tokenizer, arch: str = "gpt", block_size: int = 96, seed: int = 0):
    torch.manual_seed(seed)
    config = ModelConfig(
        arch=arch,
        vocab_size=tokenizer.vocab_size,
        n_layer=2,
        n_head=2,
        n_embd=32,
        block_size=block_size,
    )
    return build_model(config).eval()


def converse(session: ChatSession, messages: list[str]) -> list[str]:
    return ["".join(session.reply(message)) for message in messages]


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_kv_cache_across_turns_gives_the_tokens_of_rerunning_the_whole_history(arch):
    tokenizer = chat_tokenizer()
    model = random_model(tokenizer, arch)
    notices = {True: [], False: []}
    sessions = {
        cached: ChatSession(
            model,
            tokenizer,
            system="Be brief.",
            sampling=Sampling(temperature=0.0, max_new_tokens=20),
            use_cache=cached,
            notify=notices[cached].append,
        )
        for cached in (True, False)
    }
    replies = {cached: converse(session, MESSAGES) for cached, session in sessions.items()}
    assert replies[True] == replies[False] and any(replies[True])
    assert sessions[True].tokens == sessions[False].tokens
    # Five turns outgrow the 96-token context: the oldest exchanges went, with a notice.
    assert notices[True] == notices[False] and "dropped the oldest" in notices[True][0]
    assert sessions[True].tokens_run < sessions[False].tokens_run / 3


def test_each_turn_runs_the_model_over_its_new_tokens_only():
    tokenizer = chat_tokenizer()
    session = ChatSession(
        random_model(tokenizer, block_size=512),
        tokenizer,
        sampling=Sampling(temperature=0.0, max_new_tokens=10),
    )
    for message in MESSAGES:
        before = len(session.tokens)
        "".join(session.reply(message))
        # A turn runs the tokens the cache lacks: the last turn's closing tokens (sampled, or
        # added at max_new_tokens), the user's message, the generation prompt, and then each
        # sampled token; the last one or two wait for the next turn. Nothing runs twice.
        assert session.tokens_run == session.cache.length
        assert len(session.tokens) - 2 <= session.cache.length < len(session.tokens)
        assert session.cache.length > before
    session.clear()
    assert session.tokens == [] and session.cache is None


def test_replies_stream_token_by_token_and_clear_keeps_the_system_prompt():
    tokenizer = chat_tokenizer()
    session = ChatSession(
        random_model(tokenizer),
        tokenizer,
        system="Hi",
        sampling=Sampling(temperature=1.0, max_new_tokens=15),
        generator=torch.Generator().manual_seed(0),
    )
    start = len(session.tokens) + len("hello") + 3
    pieces = list(session.reply("hello"))
    reply = [t for t in session.tokens[start:] if t != session.format.end_id]
    assert len(pieces) >= 5 and pieces == [tokenizer.decode([t]) for t in reply]
    system = session.format.message("system", "Hi")[0]
    assert session.tokens[: len(system)] == system and len(session.tokens) > len(system)
    session.clear()
    assert session.tokens == system


def test_end_of_text_also_ends_a_reply_and_the_history_closes_it_with_end_of_turn(monkeypatch):
    """transformers stops at both (generation_config.json), so our chat must too."""
    tokenizer = chat_tokenizer()
    session = ChatSession(
        random_model(tokenizer), tokenizer, sampling=Sampling(temperature=0.0, max_new_tokens=9)
    )
    assert session.format.stop_ids == [session.format.end_id, tokenizer.eos_token_id]
    o, k = tokenizer.encode("ok")
    said = iter([o, k, tokenizer.eos_token_id, o])
    monkeypatch.setattr(session, "_sample", lambda logits: torch.tensor(next(said)))
    assert "".join(session.reply("hi")) == "ok"
    assert session.tokens[-3:] == [o, k, session.format.end_id]


def test_byte_level_replies_are_always_valid_utf8():
    """A random model over GPT-2's byte-level vocabulary spells out broken characters freely;
    the guard only lets through tokens that keep the reply valid UTF-8."""
    tokenizer = chat_tokenizer(str(SHARED_DATA / "gpt2-tokenizer"))
    model = random_model(tokenizer, block_size=256)
    session = ChatSession(
        model,
        tokenizer,
        sampling=Sampling(temperature=3.0, max_new_tokens=40),
        generator=torch.Generator().manual_seed(0),
    )
    assert session.guard is not None
    table = session.bytes_table
    broken = 0
    for _ in range(6):
        start = len(session.tokens) + len(tokenizer.encode("你好")) + 3
        "".join(session.reply("你好"))
        reply = [t for t in session.tokens[start:] if t != session.format.end_id]
        reply_bytes = b"".join(table[t] for t in reply)
        reply_bytes.decode("utf-8")  # strict: raises on any broken character
        session.clear()
    # Without the guard the same model breaks characters.
    session.guard = None
    for _ in range(6):
        start = len(session.tokens) + len(tokenizer.encode("你好")) + 3
        "".join(session.reply("你好"))
        reply = [t for t in session.tokens[start:] if t != session.format.end_id]
        try:
            b"".join(table[t] or b"" for t in reply).decode("utf-8")
        except UnicodeDecodeError:
            broken += 1
        session.clear()
    assert broken > 0


def test_the_pipe_loop_answers_one_line_per_message_and_obeys_commands():
    tokenizer = chat_tokenizer()
    session = ChatSession(
        random_model(tokenizer), tokenizer, sampling=Sampling(temperature=0.0, max_new_tokens=8)
    )
    out, err = io.StringIO(), io.StringIO()
    lines = ["What is up?\n", "\n", "/clear\n", "What is up?\n", "héllo\n", "/quit\n", "Goodbye\n"]
    run_chat(session, lines, interactive=False, out=out, err=err)
    replies = out.getvalue().split("\n")
    assert len(replies) == 4 and replies[-1] == ""  # three messages, three lines
    assert replies[0] == replies[1]  # /clear: the same question gets the same greedy answer
    assert replies[2] == "" and "characters outside the vocabulary: 'é'" in err.getvalue()
    assert "(conversation cleared)" in err.getvalue()


def test_a_message_longer_than_the_context_is_refused_for_that_turn_only():
    tokenizer = chat_tokenizer()
    session = ChatSession(
        random_model(tokenizer, block_size=64),
        tokenizer,
        sampling=Sampling(temperature=0.0, max_new_tokens=16),
    )
    with pytest.raises(UserError, match="the message is 63 tokens"):
        "".join(session.reply("a" * 60))
    assert session.tokens == []
    assert "".join(session.reply("hi")) is not None


def chat_checkpoint(directory, tokenizer: Tokenizer, block_size: int = 128):
    save_checkpoint(
        directory, random_model(tokenizer, block_size=block_size), tokenizer, {}, {"step": 1}
    )
    return directory


def test_generate_chat_through_a_pipe_prints_one_reply_per_line(tmp_path):
    checkpoint = chat_checkpoint(tmp_path / "ckpt", chat_tokenizer())
    result = run_script(
        "generate.py",
        *("--checkpoint", str(checkpoint), "--chat", "--temperature", "0"),
        *("--max_new_tokens", "12", "--system", "Be brief."),
        cwd=tmp_path,
        env=ONE_THREAD,
        input_text="What is up?\nWho are you?\n/clear\nWhat is up?\n",
    )
    lines = result.stdout.split("\n")
    assert len(lines) == 4 and lines[-1] == "" and lines[0] == lines[2]
    session = ChatSession(
        random_model(chat_tokenizer(), block_size=128),
        chat_tokenizer(),
        system="Be brief.",
        sampling=Sampling(temperature=0.0, max_new_tokens=12),
    )
    assert lines[:2] == [reply.replace("\n", "\\n") for reply in converse(session, MESSAGES[:2])]
    info = json.loads((checkpoint / "generation_config.json").read_text())
    tokenizer = Tokenizer.load(checkpoint)  # transformers stops where our chat does
    assert info["eos_token_id"] == ChatFormat.of(tokenizer).stop_ids
    assert info["eos_token_id"] == [tokenizer_end(checkpoint), tokenizer.eos_token_id]


def tokenizer_end(checkpoint) -> int:
    return Tokenizer.load(checkpoint).backend.token_to_id("<|end|>")


def test_chat_refuses_a_checkpoint_without_a_chat_template_in_one_line(tmp_path):
    tokenizer = Tokenizer.from_chars(CHARS)
    save_checkpoint(tmp_path / "plain", random_model(tokenizer), tokenizer, {}, {"step": 1})
    result = run_script(
        "generate.py",
        *("--checkpoint", str(tmp_path / "plain"), "--chat"),
        cwd=tmp_path,
        check=False,
        input_text="hello\n",
    )
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert "no chat template" in line and "prepare_data.py chat" in line
