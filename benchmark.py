"""Training throughput of a config, and the overhead of train.py over a bare PyTorch loop.

    python benchmark.py --config configs/shakespeare_cpu.json [--steps 40] [--rounds 9] [--key=value ...]
    python benchmark.py --config configs/shakespeare_cpu.json --generate 512 --model.block_size=528
    python benchmark.py --prepare corpus.jsonl --tokenizer ../shared/data/gpt2-tokenizer --nanogpt

With --prepare CORPUS it measures data preparation instead: `prepare_data.py text` on a .jsonl
corpus with the tokenizer of --tokenizer, in tokens/s and peak resident memory, and with
--nanogpt also nanoGPT's way on the same file (tiktoken through datasets.map; needs tiktoken).

With --generate N it measures sampling instead: greedy generation of N tokens after a 16-token
prompt, batch 1, with the key-value cache and without it (every step reruns the whole context).
The model's context must hold prompt + N, so both paths attend to the same tokens.

Both loops train identical copies of the model on the same batches with the same optimizer. The
train.py side runs its whole step: schedule lookup, reading the micro-batches from the memmap
through the sampler, and `train_step` under Accelerate (real-token loss normalisation, gradient
clipping). The bare side runs forward, mean loss, backward, clipping and the optimizer step on
batches already in memory. Rounds alternate between the two so drift in machine speed hits both;
the median step time of each is reported.
"""

import copy
import json
import statistics
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.nn import functional as F

from gptlab import preparation_speed
from gptlab.cli import ArgumentParser, check_output_file, positive_int
from gptlab.config import load_config
from gptlab.errors import UserError, run_cli
from gptlab.scheduler import RunSchedules
from gptlab.training import (
    apply_settings,
    build_model,
    data_vocabulary,
    fetch_micro_batches,
    mixed_precision_mode,
    open_training_data,
    train_step,
)
from models import count_parameters, generate, optimizer_groups

PROMPT_TOKENS = 16


def generation_speed(model: torch.nn.Module, new_tokens: int, device: torch.device) -> dict:
    """Tokens/s of greedy generation with and without the cache (each after a short warm-up)."""
    model.eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT_TOKENS), device=device)
    rates, outputs = {}, {}
    for use_cache in (True, False):
        generate(model, prompt, 8, temperature=0.0, use_cache=use_cache)  # warm up
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs[use_cache] = generate(model, prompt, new_tokens, 0.0, use_cache=use_cache)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        rates[use_cache] = new_tokens / (time.perf_counter() - start)
    return {
        "cache_tokens_per_sec": rates[True],
        "no_cache_tokens_per_sec": rates[False],
        "speedup": rates[True] / rates[False],
        "same_tokens": torch.equal(outputs[True], outputs[False]),
    }


def write_figures(output: str | None, result: dict) -> None:
    if not output:
        return
    try:
        Path(output).write_text(json.dumps(result, indent=2) + "\n")
    except OSError as error:
        raise UserError(f"could not write --output {output} ({error.strerror})") from None


def main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="benchmark.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive_int, default=40, help="optimizer steps per round")
    parser.add_argument("--rounds", type=positive_int, default=9, help="timed rounds of each loop")
    parser.add_argument("--output", help="write the figures as JSON to this file")
    parser.add_argument(
        "--generate", type=positive_int, help="time generating N tokens instead of training"
    )
    parser.add_argument("--prepare", help="time preparing this .jsonl corpus instead of training")
    parser.add_argument("--tokenizer", help="--prepare: a GPT-2 tokenizer directory")
    parser.add_argument("--nanogpt", action="store_true", help="--prepare: nanoGPT's way too")
    args, config_args = parser.parse_known_args(argv)
    check_output_file(args.output)
    if args.prepare:
        if not args.tokenizer or config_args:
            raise UserError("--prepare takes --tokenizer DIR (and --nanogpt, --output) only")
        corpus, repo = Path(args.prepare), Path(__file__).resolve().parent
        results = preparation_speed.compare(corpus, Path(args.tokenizer), args.nanogpt, repo)
        preparation_speed.report(corpus, results, args.output)
        return
    config, name, overrides = load_config(config_args)
    if args.generate and config.model.block_size < PROMPT_TOKENS + args.generate:
        raise UserError(
            f"--generate {args.generate} needs a context of {PROMPT_TOKENS + args.generate} "
            f"tokens; add --model.block_size={PROMPT_TOKENS + args.generate}"
        )
    accelerator = Accelerator(
        mixed_precision=mixed_precision_mode(config),
        dynamo_backend="inductor" if config.compile else "no",
    )
    set_seed(config.seed)
    meta, tokenizer = data_vocabulary(config, accelerator)
    model_overrides = {k[6:]: v for k, v in overrides.items() if k.startswith("model.")}
    model = build_model(config, meta, tokenizer, model_overrides)
    if args.generate:
        result = {"config": name, "device": str(accelerator.device), "new_tokens": args.generate}
        result.update(
            generation_speed(model.to(accelerator.device), args.generate, accelerator.device)
        )
        print(
            f"{name} on {result['device']}: {args.generate} new tokens, KV cache "
            f"{result['cache_tokens_per_sec']:,.0f} tok/s, no cache "
            f"{result['no_cache_tokens_per_sec']:,.0f} tok/s ({result['speedup']:.1f}x), "
            f"same tokens: {result['same_tokens']}"
        )
        write_figures(args.output, result)
        return
    bare_model = copy.deepcopy(model).to(accelerator.device)
    data = open_training_data(config, accelerator)
    split, sampler = data.train_split, data.sampler
    accum = round(config.grad_accum.peak)
    step_samples = config.batch_size * accum * accelerator.num_processes
    step_tokens = step_samples * split.fetch([0])[0].size(1)
    schedules = RunSchedules(config.lr, config.weight_decay, config.grad_accum, 10**15)

    def new_optimizer(m):
        return torch.optim.AdamW(
            optimizer_groups(m, config.weight_decay.peak),
            lr=config.lr.peak,
            betas=(config.optim.beta1, config.optim.beta2),
            fused=torch.cuda.is_available(),
        )

    model, optimizer = accelerator.prepare(model, new_optimizer(model))
    bare_optimizer = new_optimizer(bare_model)
    if config.compile:
        bare_model = torch.compile(bare_model)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    bare_scaler = torch.amp.GradScaler(enabled=dtype is torch.float16)

    def ours(position: int) -> None:
        settings = schedules.at(position * step_tokens)
        apply_settings(optimizer, settings)
        batches = fetch_micro_batches(
            sampler, split, position, accum, config.batch_size, accelerator
        )
        train_step(model, optimizer, accelerator, batches, config.optim.grad_clip)

    bare_batches = [
        [
            (x.to(accelerator.device), y.to(accelerator.device))
            for x, y in fetch_micro_batches(
                sampler, split, p, accum, config.batch_size, accelerator
            )
        ]
        for p in range(0, args.steps * step_samples, step_samples)
    ]

    def bare(position: int) -> None:
        for x, y in bare_batches[position // step_samples % len(bare_batches)]:
            with torch.autocast(accelerator.device.type, dtype=dtype, enabled=dtype is not None):
                logits = bare_model(x)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1)) / accum
            bare_scaler.scale(loss).backward()
        bare_scaler.unscale_(bare_optimizer)
        torch.nn.utils.clip_grad_norm_(bare_model.parameters(), config.optim.grad_clip)
        bare_scaler.step(bare_optimizer)
        bare_scaler.update()
        bare_optimizer.zero_grad(set_to_none=True)

    def timed_round(step_fn) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(args.steps):
            step_fn(i * step_samples)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps

    timed_round(ours), timed_round(bare)  # warm up (and compile, if on)
    times = {"train.py": [], "bare": []}
    for _ in range(args.rounds):
        times["train.py"].append(timed_round(ours))
        times["bare"].append(timed_round(bare))
    ours_s, bare_s = statistics.median(times["train.py"]), statistics.median(times["bare"])
    result = {
        "config": name,
        "device": str(accelerator.device),
        "precision": accelerator.mixed_precision,
        "parameters": count_parameters(accelerator.unwrap_model(model)),
        "tokens_per_step": step_tokens,
        "train_py_tokens_per_sec": step_tokens / ours_s,
        "bare_tokens_per_sec": step_tokens / bare_s,
        # Each round of ours is compared with the bare round right after it, so slow drifts of
        # the machine's speed cancel; the median of those ratios is the overhead.
        "overhead_percent": 100
        * (statistics.median(o / b for o, b in zip(times["train.py"], times["bare"])) - 1),
    }
    print(
        f"{name} on {result['device']} ({result['precision']}), {step_tokens} tokens/step: "
        f"train.py {result['train_py_tokens_per_sec']:,.0f} tok/s, bare PyTorch "
        f"{result['bare_tokens_per_sec']:,.0f} tok/s, overhead {result['overhead_percent']:+.1f}%"
    )
    write_figures(args.output, result)


if __name__ == "__main__":
    run_cli(main)
