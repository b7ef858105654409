"""Training throughput of a config, and the overhead of train.py over a bare PyTorch loop.

    python benchmark.py --config configs/shakespeare_cpu.json [--steps 40] [--rounds 9] [--key=value ...]
    python benchmark.py --config configs/gpt2_124m.json          # random tokens: no data set needed
    python benchmark.py --config configs/shakespeare_cpu.json --generate 48 [--checkpoint out/shakespeare_cpu]
    accelerate launch --config_file configs/accelerate/fsdp.yaml benchmark.py --config configs/llama_303m.json --memory
    python benchmark.py --prepare corpus.jsonl --tokenizer ../shared/data/gpt2-tokenizer --nanogpt

Both loops train identical copies of the model on the same batches with the same optimizer. The
train.py side runs its whole step: schedule lookup, reading the micro-batches through the sampler
and the background reader, and `train_step` under Accelerate (real-token loss normalisation,
gradient clipping). The bare side runs forward (with the loss), backward, clipping and the
optimizer step on batches already on the device. Rounds alternate between the two so drift in
machine speed hits both; the median step time of each is reported, with MFU on GPUs whose peak
is known and the peak memory of one training (GPU memory allocated; on a CPU the process's
resident memory). Without the config's data set, or with --random_tokens, both train on random
tokens of the model's vocabulary (model.vocab_size must be set then).

With --generate N it measures sampling instead: greedy generation of N tokens after a 16-token
prompt, batch 1, with our key-value cache, without it (every step reruns the whole context), and
with transformers' `generate` on the same model exported as a checkpoint (the model of
--checkpoint, or a fresh one of the config). The model's context must hold prompt + N.

With --prepare CORPUS it measures data preparation instead: `prepare_data.py text` on a .jsonl
corpus with the tokenizer of --tokenizer, in tokens/s and peak resident memory, and with
--nanogpt also nanoGPT's way on the same file (tiktoken through datasets.map; needs tiktoken).

With --memory it measures memory per process instead, set up as train.py sets it up (DDP or
FSDP): the weights and optimizer state the process holds (its shards under FSDP), and the peak
memory of one optimizer step with activation checkpointing on and off (see gptlab/mfu.py for
what peak means on a CPU).
"""

import copy
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

import models
from gptlab import sharding
from gptlab.checkpoints import load_checkpoint, save_checkpoint
from gptlab.cli import ArgumentParser, check_output_file, positive_int
from gptlab.config import load_config
from gptlab.data import EpochSampler, is_data_set
from gptlab.errors import UserError, run_cli
from gptlab.mfu import Throughput, memory_mib, peak_memory_mib, reset_peak_memory
from gptlab.optimizers import check_optimizer_supported
from gptlab.scheduler import RunSchedules
from gptlab.tokenizer import Tokenizer
from gptlab.training import (
    BatchReader,
    apply_settings,
    build_model,
    data_vocabulary,
    make_optimizer,
    mixed_precision_mode,
    open_training_data,
    padded_vocab_size,
    train_step,
    use_cpu_cores,
    use_fast_matmuls,
)
from models import count_parameters, generate

PROMPT_TOKENS = 16


class RandomTokens:
    """A stand-in for a token-stream split: windows of uniformly random tokens, held in memory."""

    def __init__(self, vocab_size: int, block_size: int, num_samples: int, seed: int):
        rng = np.random.default_rng(seed)
        self.windows = torch.from_numpy(rng.integers(0, vocab_size, (num_samples, block_size + 1)))
        self.num_samples, self.block_size = num_samples, block_size

    def fetch(self, indices: np.ndarray, epochs=None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.windows[torch.as_tensor(indices)]
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def target_count(self, indices: np.ndarray) -> int:
        return len(indices) * self.block_size


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def generation_speed(model: torch.nn.Module, tokenizer: Tokenizer, new_tokens: int) -> dict:
    """Tokens/s of greedy generation with and without our cache, and with transformers' generate
    on the same weights (each after a short warm-up), and whether all give the same tokens."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    device = next(model.parameters()).device
    model.eval()
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, tokenizer.vocab_size, (1, PROMPT_TOKENS), generator=generator)
    prompt = prompt.to(device)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / "model", model, tokenizer, {}, {})
        theirs = AutoModelForCausalLM.from_pretrained(Path(tmp) / "model").to(device).eval()

    def hf_generate(count: int) -> torch.Tensor:
        with torch.no_grad():
            return theirs.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=count,
                min_new_tokens=count,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )

    ways = {
        "cache": lambda n: generate(model, prompt, n, temperature=0.0, use_cache=True),
        "no_cache": lambda n: generate(model, prompt, n, temperature=0.0, use_cache=False),
        "transformers": hf_generate,
    }
    rates, outputs = {}, {}
    for name, run in ways.items():
        run(8)  # warm up
        synchronize()
        start = time.perf_counter()
        outputs[name] = run(new_tokens)
        synchronize()
        rates[name] = new_tokens / (time.perf_counter() - start)
    return {
        "cache_tokens_per_sec": rates["cache"],
        "no_cache_tokens_per_sec": rates["no_cache"],
        "transformers_tokens_per_sec": rates["transformers"],
        "speedup": rates["cache"] / rates["no_cache"],
        "speedup_over_transformers": rates["cache"] / rates["transformers"],
        "same_tokens": torch.equal(outputs["cache"], outputs["no_cache"]),
        "same_tokens_as_transformers": torch.equal(outputs["cache"], outputs["transformers"]),
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
        "--random_tokens", action="store_true", help="train on random tokens, not the data set"
    )
    parser.add_argument(
        "--generate", type=positive_int, help="time generating N tokens instead of training"
    )
    parser.add_argument("--checkpoint", help="with --generate: time this checkpoint's model")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="measure memory per process (weights, optimizer, peak of a step) instead of speed",
    )
    parser.add_argument("--prepare", help="time preparing this .jsonl corpus instead of training")
    parser.add_argument("--tokenizer", help="--prepare: a GPT-2 tokenizer directory")
    parser.add_argument("--nanogpt", action="store_true", help="--prepare: nanoGPT's way too")
    args, config_args = parser.parse_known_args(argv)
    check_output_file(args.output)
    if args.checkpoint and not args.generate:
        raise UserError("--checkpoint only goes with --generate N")
    if sum(map(bool, (args.memory, args.generate, args.prepare))) > 1:
        raise UserError("--memory, --generate and --prepare each measure something else: give one")
    if args.prepare:
        if not args.tokenizer or config_args:
            raise UserError("--prepare takes --tokenizer DIR (and --nanogpt, --output) only")
        from gptlab import preparation_speed  # needs datasets and tiktoken, as training does not

        corpus, repo = Path(args.prepare), Path(__file__).resolve().parent
        results = preparation_speed.compare(corpus, Path(args.tokenizer), args.nanogpt, repo)
        preparation_speed.report(corpus, results, args.output)
        return
    config, name, overrides = load_config(config_args)
    use_fast_matmuls()
    accelerator = Accelerator(
        mixed_precision=mixed_precision_mode(config),
        dynamo_backend="inductor" if config.compile else "no",
    )
    sharding.configure(accelerator, config)
    if accelerator.is_fsdp2 and not (args.memory or args.generate):
        raise UserError(
            "the comparison with a bare PyTorch loop needs the whole model on every process, "
            "which FSDP does not keep; measure FSDP with --memory, or read tokens_per_sec in "
            "train.py's metrics.jsonl"
        )
    check_optimizer_supported(config, accelerator)
    threads = use_cpu_cores(accelerator)
    set_seed(config.seed)
    if args.generate:
        result = benchmark_generation(config, overrides, args, accelerator)
        print(
            f"{name} on {result['device']}: {args.generate} new tokens, KV cache "
            f"{result['cache_tokens_per_sec']:,.0f} tok/s, no cache "
            f"{result['no_cache_tokens_per_sec']:,.0f} tok/s ({result['speedup']:.1f}x), "
            f"transformers {result['transformers_tokens_per_sec']:,.0f} tok/s "
            f"(ours {result['speedup_over_transformers']:.2f}x); same tokens: "
            f"{result['same_tokens']}, as transformers: {result['same_tokens_as_transformers']}"
        )
        write_figures(args.output, result)
    elif args.memory:  # prints and writes its own report, gathered from every process
        benchmark_memory(config, name, overrides, args, accelerator)
    else:
        result = benchmark_training(config, name, overrides, args, accelerator)
        mfu = f", MFU {result['mfu']:.1%}" if "mfu" in result else ""
        print(
            f"{name} on {result['device']} ({result['precision']}, {threads}), "
            f"{result['tokens_per_step']} tokens/step{' of random tokens' * result['random_tokens']}: "
            f"train.py {result['train_py_tokens_per_sec']:,.0f} tok/s{mfu}, bare PyTorch "
            f"{result['bare_tokens_per_sec']:,.0f} tok/s, overhead "
            f"{result['overhead_percent']:+.1f}%, peak memory {result['peak_memory_gb']:.2f} GB "
            f"({result['peak_memory_of']})"
        )
        write_figures(args.output, result)
    accelerator.wait_for_everyone()  # all processes leave the process group together
    accelerator.end_training()


def benchmark_generation(config, overrides: dict, args, accelerator: Accelerator) -> dict:
    if args.checkpoint:
        checkpoint = load_checkpoint(args.checkpoint)
        model, tokenizer = checkpoint.model, checkpoint.tokenizer
        check_context(model.config.block_size, args.generate, "")
    else:
        check_context(config.model.block_size, args.generate, "add --model.block_size=")
        meta, tokenizer = data_vocabulary(config, accelerator)
        model_overrides = {k[6:]: v for k, v in overrides.items() if k.startswith("model.")}
        model = build_model(config, meta, tokenizer, model_overrides)
    result = {"device": str(accelerator.device), "new_tokens": args.generate}
    result.update(generation_speed(model.to(accelerator.device), tokenizer, args.generate))
    return result


def check_context(block_size: int, new_tokens: int, fix: str) -> None:
    """Refuse a generation longer than the model's context (past it, the cache is rebuilt)."""
    needed = PROMPT_TOKENS + new_tokens
    if block_size < needed:
        if not fix:
            room = block_size - PROMPT_TOKENS
            fix = f"generate at most {room}" if room > 0 else "benchmark a model with a longer one"
        else:
            fix = f"{fix}{needed}"
        raise UserError(
            f"--generate {new_tokens} needs a context of {needed} tokens (a {PROMPT_TOKENS}-token "
            f"prompt and {new_tokens} new ones), the model has {block_size}; {fix}"
        )


def model_and_data(config, overrides: dict, args, accelerator: Accelerator) -> tuple:
    """The config's model and its training split and sampler (random tokens without a data set)."""
    has_data = config.data.mixture or is_data_set(config.data.path)
    random_tokens = args.random_tokens or not has_data
    if random_tokens:
        if config.model.vocab_size < 1:
            raise UserError(
                f"no data set in {config.data.path} to take the vocabulary from: set "
                "--model.vocab_size (the benchmark then trains on random tokens)"
            )
        config.model.vocab_size = padded_vocab_size(config.model)
        model = models.build_model(config.model)
        split = RandomTokens(config.model.vocab_size, config.model.block_size, 4096, config.seed)
        sampler = EpochSampler(split.num_samples, config.seed)
    else:
        meta, tokenizer = data_vocabulary(config, accelerator)
        model_overrides = {k[6:]: v for k, v in overrides.items() if k.startswith("model.")}
        model = build_model(config, meta, tokenizer, model_overrides)
        data = open_training_data(config, accelerator)
        split, sampler = data.train_split, data.sampler
    return model, split, sampler, random_tokens


def train_py_step(
    model,
    optimizer,
    accelerator: Accelerator,
    reader: BatchReader,
    config,
    schedules: RunSchedules | None = None,
    sample_length: int = 0,
):
    """train.py's optimizer step at a sampler position: the schedules' settings (when given),
    this process's micro-batches from the reader, and train_step."""
    accum = round(config.grad_accum.peak)

    def step(position: int) -> None:
        if schedules is not None:
            apply_settings(optimizer, schedules.at(position * sample_length))
        batches = reader(position, accum)
        train_step(
            model,
            optimizer,
            accelerator,
            batches.micro_batches,
            config.optim.grad_clip,
            step_targets=batches.targets,
        )

    return step


def benchmark_memory(config, name: str, overrides: dict, args, accelerator: Accelerator) -> None:
    config.activation_checkpointing = True  # the wrappers, switched off and on below
    model, split, sampler, _ = model_and_data(config, overrides, args, accelerator)
    accum = round(config.grad_accum.peak)
    step_samples = config.batch_size * accum * accelerator.num_processes
    step_tokens = step_samples * split.fetch(np.array([0]))[0].size(1)
    reader = BatchReader(sampler, split, config.batch_size, accelerator)
    model, optimizer = sharding.prepare(accelerator, model, make_optimizer(model, config), config)

    ours = train_py_step(model, optimizer, accelerator, reader, config)
    figures = memory_figures(ours, model, optimizer, accelerator, step_samples)
    reader.close()
    report_memory(name, step_tokens, figures, accelerator, args.output)


def benchmark_training(config, name: str, overrides: dict, args, accelerator: Accelerator) -> dict:
    model, split, sampler, random_tokens = model_and_data(config, overrides, args, accelerator)
    bare_model = copy.deepcopy(model)  # on the CPU until the train.py side's peak memory is known
    accum = round(config.grad_accum.peak)
    step_samples = config.batch_size * accum * accelerator.num_processes
    sample_length = split.fetch(np.array([0]))[0].size(1)
    step_tokens = step_samples * sample_length
    schedules = RunSchedules(config.lr, config.weight_decay, config.grad_accum, 10**15)
    reader = BatchReader(sampler, split, config.batch_size, accelerator)
    throughput = Throughput.of_run(model, sample_length, accelerator)

    model, optimizer = sharding.prepare(accelerator, model, make_optimizer(model, config), config)

    ours = train_py_step(model, optimizer, accelerator, reader, config, schedules, sample_length)

    def timed_round(step_fn) -> float:
        synchronize()
        start = time.perf_counter()
        for i in range(args.steps):
            step_fn(i * step_samples)
        synchronize()
        return (time.perf_counter() - start) / args.steps

    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    timed_round(ours)  # warm up (and compile, if on)
    peak_memory = peak_memory_gb(accelerator.device)

    bare_model = bare_model.to(accelerator.device)
    if config.activation_checkpointing:
        sharding.checkpoint_activations(bare_model)  # recomputes as much as train.py's side
    bare_optimizer = make_optimizer(bare_model, config)
    apply_settings(bare_optimizer, schedules.at(0))
    if config.compile:
        bare_model = torch.compile(bare_model)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    bare_scaler = torch.amp.GradScaler(enabled=dtype is torch.float16)
    bare_batches = [
        [
            (x.to(accelerator.device), y.to(accelerator.device))
            for x, y in reader.read(p, accum).micro_batches
        ]
        for p in range(0, args.steps * step_samples, step_samples)
    ]

    def bare(position: int) -> None:
        for x, y in bare_batches[position // step_samples % len(bare_batches)]:
            with torch.autocast(accelerator.device.type, dtype=dtype, enabled=dtype is not None):
                loss = bare_model(x, y) / (y.numel() * accum)
            bare_scaler.scale(loss).backward()
        bare_scaler.unscale_(bare_optimizer)
        torch.nn.utils.clip_grad_norm_(bare_model.parameters(), config.optim.grad_clip)
        bare_scaler.step(bare_optimizer)
        bare_scaler.update()
        bare_optimizer.zero_grad(set_to_none=True)

    timed_round(bare)  # warm up (and compile, if on)
    times = {"train.py": [], "bare": []}
    for _ in range(args.rounds):
        times["train.py"].append(timed_round(ours))
        times["bare"].append(timed_round(bare))
    reader.close()
    ours_s, bare_s = statistics.median(times["train.py"]), statistics.median(times["bare"])
    result = {
        "config": name,
        "device": str(accelerator.device),
        "precision": accelerator.mixed_precision,
        "optimizer": config.optim.name,
        "random_tokens": random_tokens,
        "parameters": count_parameters(accelerator.unwrap_model(model)),
        "tokens_per_step": step_tokens,
        "train_py_tokens_per_sec": step_tokens / ours_s,
        "bare_tokens_per_sec": step_tokens / bare_s,
        # Each round of ours is compared with the bare round right after it, so slow drifts of
        # the machine's speed cancel; the median of those ratios is the overhead.
        "overhead_percent": 100
        * (statistics.median(o / b for o, b in zip(times["train.py"], times["bare"])) - 1),
        "peak_memory_gb": peak_memory,
        "peak_memory_of": "GPU memory allocated"
        if accelerator.device.type == "cuda"
        else "process resident memory",
    }
    figures = throughput.figures(step_tokens, 1, ours_s)
    if "mfu" in figures:
        result["mfu"] = figures["mfu"]
    return result


def memory_figures(step_fn, model, optimizer, accelerator: Accelerator, step_samples: int) -> dict:
    """This process's memory in MiB: weights and optimizer state it holds (its shards under
    FSDP), and the peak of one optimizer step with activation checkpointing on and off."""
    device = accelerator.device
    step_fn(0)  # creates the optimizer state
    inner = getattr(optimizer, "optimizer", optimizer)
    held = [sharding.local(t) for state in inner.state.values() for t in state.values()]
    figures = {
        "weights_mib": sum(sharding.local(p).nbytes for p in model.parameters()) / 2**20,
        "optimizer_mib": sum(t.nbytes for t in held if torch.is_tensor(t)) / 2**20,
    }
    # Checkpointing on first: memory the allocator keeps after a bigger step would hide a smaller one.
    for checkpointing, key in ((True, "step_peak_checkpointing_mib"), (False, "step_peak_mib")):
        with sharding.activation_checkpointing(model, checkpointing):
            figures[key.replace("peak", "start")] = memory_mib(device)
            reset_peak_memory(device)
            step_fn(step_samples)
            figures[key] = peak_memory_mib(device)
    return figures


def report_memory(
    name: str, step_tokens: int, figures: dict, accelerator: Accelerator, output: str | None
) -> None:
    """Print every process's memory figures (main process) and write them to `output`."""
    processes = gather_object([{"process": accelerator.process_index, **figures}])
    if not accelerator.is_main_process:
        return
    layout = (
        "FSDP2" if accelerator.is_fsdp2 else "DDP" if accelerator.num_processes > 1 else "1 process"
    )

    def mib(value):
        return "unknown" if value is None else f"{value:,.0f} MiB"

    print(f"{name} on {accelerator.device}, {layout}, {step_tokens} tokens/step, per process:")
    for f in processes:
        saved = None
        if f["step_peak_mib"] is not None:
            saved = f["step_peak_mib"] - f["step_peak_checkpointing_mib"]
        print(
            f"  process {f['process']}: weights {mib(f['weights_mib'])}, optimizer state "
            f"{mib(f['optimizer_mib'])}, peak of a step {mib(f['step_peak_mib'])} "
            f"(from {mib(f['step_start_mib'])}), with activation checkpointing "
            f"{mib(f['step_peak_checkpointing_mib'])} (saves {mib(saved)})"
        )
    if output:
        result = {"config": name, "device": str(accelerator.device), "layout": layout}
        write_figures(output, {**result, "processes": processes})


if __name__ == "__main__":
    run_cli(main)
