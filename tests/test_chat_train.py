"""End to end: chat data prepared, a model fine-tuned on it with train.py, and then talked to
through generate.py --chat, transformers and evaluate.py, which must all agree."""

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from conftest import REPO, SHARED_DATA, read_metrics, run_script
from gptlab.chat import ChatSession, Sampling
from gptlab.checkpoints import load_checkpoint
from gptlab.data import open_split, read_meta
from models import IGNORE_INDEX

pytestmark = pytest.mark.slow

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: a second thread only adds contention
TINY_CHAT = [
    "--model.n_layer=2",
    "--model.n_head=4",
    "--model.n_embd=64",
    "--model.block_size=256",
    "--batch_size=8",
    "--data.eval_samples=16",
    "--lr.peak=3e-3",
]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """The identity conversations, characters, rows of 256; a tiny GPT trained from scratch."""
    work = tmp_path_factory.mktemp("chat_run")
    run_script(
        "prepare_data.py",
        *("chat", "--input", str(SHARED_DATA / "chat" / "dummy_conversation.json")),
        *("--block_size", "256", "--out_dir", "data"),
        cwd=work,
    )
    run_script(
        "train.py",
        *("--config", str(REPO / "configs" / "chat_cpu.json"), *TINY_CHAT),
        *("--data.dir=data", "--out_dir=out", "--max_steps=200", "--macro_batch_steps=100"),
        cwd=work,
        env=ONE_THREAD,
    )
    return work


def test_the_trained_chat_answers_through_a_pipe_and_stops_at_end_of_turn(chat_run):
    events = read_metrics(chat_run / "out")
    assert any("cut to their first turns" in e.get("message", "") for e in events)
    evals = [e["val_loss"] for e in events if "val_loss" in e]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.15  # after 100 and 200 steps
    result = run_script(
        "generate.py",
        *("--checkpoint", "out", "--chat", "--temperature", "0", "--max_new_tokens", "150"),
        cwd=chat_run,
        env=ONE_THREAD,
        input_text="What is up?\nGoodbye\n",
    )
    replies = result.stdout.splitlines()
    assert replies[0] == "Hello! How can I help you today?"  # 167 conversations say so
    assert len(replies) == 2 and len(replies[1]) < 150  # ended by the end-of-turn token


def test_transformers_gives_our_chat_reply_from_the_checkpoint_and_its_template(chat_run):
    checkpoint = load_checkpoint(chat_run / "out")
    session = ChatSession(
        checkpoint.model,
        checkpoint.tokenizer,
        sampling=Sampling(temperature=0.0, max_new_tokens=120),
    )
    first = "".join(session.reply("What is up?"))
    second = "".join(session.reply("Are you GPT-4?"))
    messages = [
        {"role": "user", "content": "What is up?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Are you GPT-4?"},
    ]
    best = (chat_run / "out" / "best").resolve()
    model = AutoModelForCausalLM.from_pretrained(best).eval()
    tokenizer = AutoTokenizer.from_pretrained(best)
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    assert prompt[0].tolist() == session.tokens[: prompt.size(1)]  # the ids our chat fed
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=120, do_sample=False)
    reply = out[0, prompt.size(1) :].tolist()
    assert reply[-1] == tokenizer.convert_tokens_to_ids("<|end|>")  # generation_config stops it
    assert tokenizer.decode(reply[:-1]) == second


def test_evaluate_loss_on_a_chat_set_covers_reply_tokens_only(chat_run):
    result = run_script(
        "evaluate.py",
        *("--task", "loss", "--checkpoint", "out", "--split", "val", "--output", "val.json"),
        cwd=chat_run,
        env=ONE_THREAD,
    )
    reported = json.loads((chat_run / "val.json").read_text())["loss"]
    # The same loss by hand: cross-entropy over the positions whose next token is in a reply.
    model = load_checkpoint(chat_run / "out").model
    directory = chat_run / "data"
    split = open_split(directory, read_meta(directory), "val", 256, 0)
    rows = torch.from_numpy(split.rows(np.arange(split.num_samples)))
    mask = np.fromfile(directory / "val_mask.bin", dtype=np.uint8).reshape(rows.shape)
    with torch.no_grad():
        logits = model(rows[:, :-1])
    losses = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), rows[:, 1:], reduction="none"
    )
    in_reply = torch.from_numpy(mask[:, 1:].astype(bool))
    assert reported == pytest.approx(losses[in_reply].mean().item(), rel=1e-4)
    everything = losses.mean().item()
    assert abs(everything - reported) > 0.05  # prompts and padding would change it
    inputs, targets = split.fetch(np.arange(split.num_samples))
    assert torch.equal(targets != IGNORE_INDEX, in_reply)
    assert "loss" in result.stdout


def test_chinese_alpaca_fine_tune_of_a_transformers_gpt2_grows_its_vocabulary_and_replies_in_utf8(
    tmp_path,
):
    """Hugging Face's GPT-2 (architecture and tokenizer; a small random one, as tests never
    download) lacks the chat tokens: training grows it, and its Chinese replies are valid UTF-8."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=128, n_embd=32, n_layer=2, n_head=4)
    source = tmp_path / "gpt2"
    GPT2LMHeadModel(config).save_pretrained(source)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(SHARED_DATA / "gpt2-tokenizer" / name, source / name)
    run_script(
        "prepare_data.py",
        *("chat", "--input", str(SHARED_DATA / "chat" / "alpaca_zh_demo.json")),
        *("--tokenizer", str(source), "--block_size", "128", "--out_dir", "zh"),
        cwd=tmp_path,
    )
    run_script(
        "train.py",
        *("--config", str(REPO / "configs" / "chat_cpu.json"), f"--init_from={source}"),
        *("--data.dir=zh", "--out_dir=run", "--max_steps=10", "--macro_batch_steps=10"),
        *("--batch_size=4", "--data.eval_samples=8", "--lr.peak=3e-3"),
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    messages = [e.get("message", "") for e in read_metrics(tmp_path / "run")]
    assert any(
        "grew the token embedding (the tied output layer with it) from 50257 to 50261" in m
        for m in messages
    )
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint.model.config.vocab_size == 50261
    result = run_script(
        "generate.py",
        *("--checkpoint", "run", "--chat", "--temperature", "1.0", "--max_new_tokens", "40"),
        cwd=tmp_path,
        env=ONE_THREAD,
        input_text="介绍一下你自己。\n写一首关于春天的诗。\n",
    )
    replies = result.stdout.splitlines()
    assert len(replies) == 2 and all(replies)
    assert not any("\ufffd" in reply for reply in replies)
