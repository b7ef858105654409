"""Sample text from a trained model.

    python generate.py --checkpoint out/shakespeare_cpu --prompt "ROMEO:" --max_new_tokens 300
    python generate.py --checkpoint out/adder --prompt "123+456=" --max_new_tokens 4 --temperature 0
    python generate.py --checkpoint out/chat_cpu --chat [--system "You are ..."]
    printf 'What is up?\nWho are you?\n' | python generate.py --checkpoint out/chat_cpu --chat

--checkpoint takes a checkpoint directory or a run directory (meaning its best checkpoint), or a
Hugging Face GPT-2 or Llama model directory or hub name (`gpt2`, `gpt2-medium`, ...).
--temperature 0 decodes greedily, which is deterministic.

--chat talks with a model fine-tuned on chat data (prepare_data.py chat): the history is kept
(with its KV cache) across turns, each reply streams until the end-of-turn token, and the oldest
exchanges are dropped, with a notice, when the context is full. Type /clear to forget the
conversation, /quit or Ctrl-D to leave. When standard input is not a terminal, each line is one
user message and each reply is printed as one line (its own line breaks written as \\n).
"""

import argparse
import sys

import torch

from gptlab.chat import ChatSession, Sampling, run_chat, terminal_lines
from gptlab.checkpoints import load_checkpoint
from gptlab.cli import (
    ArgumentParser,
    device,
    non_negative_float,
    non_negative_int,
    positive_int,
    probability,
    random_seed,
)
from gptlab.errors import UserError, run_cli
from models import generate


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="generate.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint or run directory, or a Hugging Face GPT-2/Llama directory or hub name",
    )
    parser.add_argument("--prompt", default="", help="text to continue (default: start fresh)")
    parser.add_argument("--num_samples", type=positive_int, default=1, help="samples to draw")
    parser.add_argument(
        "--max_new_tokens", type=non_negative_int, default=200, help="tokens per sample"
    )
    parser.add_argument(
        "--temperature", type=non_negative_float, default=0.8, help="0 means greedy"
    )
    parser.add_argument(
        "--top_k", type=non_negative_int, default=0, help="keep the k likeliest tokens; 0: all"
    )
    parser.add_argument(
        "--top_p", type=probability, default=1.0, help="nucleus sampling mass in (0, 1]; 1: off"
    )
    parser.add_argument(
        "--seed", type=random_seed, default=1337, help="random seed of the sampling"
    )
    parser.add_argument(
        "--device", type=device, default="auto", help="auto, cpu, cuda, cuda:1, mps, ..."
    )
    parser.add_argument("--no_cache", action="store_true", help="recompute without a KV cache")
    parser.add_argument("--chat", action="store_true", help="talk with a chat model (see above)")
    parser.add_argument("--system", help="--chat: the system prompt")
    args = parser.parse_args(argv)
    if args.chat and (args.prompt or args.num_samples != 1):
        raise UserError(
            "--chat reads the messages from the terminal or stdin: drop --prompt/--num_samples"
        )
    if args.system is not None and not args.chat:
        raise UserError("--system sets the system prompt of --chat; add --chat")
    return args


def start_tokens(tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens; an empty prompt starts from end-of-text or a newline."""
    if prompt:
        return tokenizer.encode(prompt)
    if tokenizer.eos_token_id is not None:
        return [tokenizer.eos_token_id]
    if "\n" in tokenizer.backend.get_vocab():
        return tokenizer.encode("\n")
    raise UserError("this model's vocabulary has no start token; give a --prompt")


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    checkpoint = load_checkpoint(args.checkpoint)
    if checkpoint.model.config.labels:
        raise UserError(
            f"{args.checkpoint} is a classifier; it predicts labels, not text (score it with "
            "evaluate.py --task classify); generate from a language model"
        )
    device = args.device
    model = checkpoint.model.to(device)
    if args.chat:
        chat(args, checkpoint, model, device)
        return
    prompt = start_tokens(checkpoint.tokenizer, args.prompt)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=device)
    out = generate(
        model,
        idx,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        use_cache=not args.no_cache,
        generator=generator,
    )
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(checkpoint.tokenizer.decode(row))


def chat(args: argparse.Namespace, checkpoint, model: torch.nn.Module, device) -> None:
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    session = ChatSession(
        model,
        checkpoint.tokenizer,
        system=args.system,
        sampling=sampling,
        use_cache=not args.no_cache,
        generator=torch.Generator(device=device).manual_seed(args.seed),
        source=args.checkpoint,
    )
    interactive = sys.stdin.isatty()
    run_chat(session, terminal_lines() if interactive else sys.stdin, interactive)


if __name__ == "__main__":
    run_cli(main)
