"""MFU: the flops-per-token formula, the peak table lookup and the figures of a log event."""

import pytest
import torch

from gptlab.mfu import Throughput, flops_per_token, matmul_precision, peak_tflops
from models import ModelConfig, build_model, count_parameters


def test_flops_per_token_of_gpt2_124m_at_context_1024_by_hand():
    # GPT-2 small: 12 layers, 12 heads of 64, width 768, vocabulary 50257, biases, tied embeddings.
    config = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)
    with torch.device("meta"):  # shapes only: no 500 MB of weights
        model = build_model(config)
    d = 768
    layer_norms = 2 * (2 * d)  # ln_1, ln_2: weight and bias
    attention_params = (d * 3 * d + 3 * d) + (d * d + d)  # qkv, output projection
    mlp = (d * 4 * d + 4 * d) + (4 * d * d + d)  # up, down
    per_layer = layer_norms + attention_params + mlp
    n_params = 12 * per_layer + 50257 * d + 2 * d  # blocks, token embedding (tied), ln_f
    assert n_params == 123_653_376  # nanoGPT's "123.65M" (position embeddings left out)
    assert count_parameters(model) == n_params
    attention = 12 * 12 * 12 * 64 * 1024  # 12 * L * H * Q * T
    assert attention == 113_246_208
    assert flops_per_token(n_params, 12, 12, 64, 1024) == 6 * 123_653_376 + attention
    assert flops_per_token(n_params, 12, 12, 64, 1024) == 855_166_464


def test_mfu_of_gpt2_124m_on_one_h100_in_bf16():
    throughput = Throughput(855_166_464, 989.5e12, "H100 SXM bf16")
    figures = throughput.figures(tokens=400_000, steps=4, seconds=2.0)
    assert figures["tokens_per_sec"] == 200_000
    assert figures["step_time"] == 0.5
    assert figures["mfu"] == pytest.approx(200_000 * 855_166_464 / 989.5e12)  # 17.3%
    assert figures["mfu"] == pytest.approx(0.17285, abs=1e-5)


def test_no_peak_means_no_mfu_key():
    figures = Throughput(1000, None, "no MFU on cpu").figures(tokens=10, steps=2, seconds=1.0)
    assert figures == {"tokens_per_sec": 10.0, "step_time": 0.5}


@pytest.mark.parametrize(
    "name, precision, peak",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.5),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H100 NVL", "fp16", 835.5),
        ("NVIDIA H200", "bf16", 989.5),
        ("NVIDIA H200 NVL", "bf16", 835.5),
        ("NVIDIA GH200 480GB", "bf16", 989.5),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100 80GB PCIe", "tf32", 156.0),
        ("NVIDIA A100-SXM4-40GB", "fp32", 19.5),
        ("NVIDIA A10", "bf16", 125.0),
        ("NVIDIA L4", "bf16", 121.0),
        ("NVIDIA L40S", "fp16", 362.0),
        ("NVIDIA L40", "bf16", 181.0),
        ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
        ("NVIDIA GeForce RTX 3090", "fp16", 71.0),
        ("Tesla V100-SXM2-16GB", "fp16", 125.0),
        ("Tesla V100-SXM2-32GB", "tf32", 15.7),  # no TF32 units: the fp32 rate
        ("Tesla V100-PCIE-32GB", "fp16", 112.0),
        ("Tesla T4", "fp16", 65.0),
        ("Tesla T4", "fp32", 8.1),
    ],
)
def test_peak_of_known_gpus(name, precision, peak):
    assert peak_tflops(name, precision) == peak


@pytest.mark.parametrize(
    "name, precision",
    [
        ("NVIDIA GeForce RTX 4090 Laptop GPU", "bf16"),  # a much smaller chip than the desktop card
        ("NVIDIA GeForce RTX 3090 Ti", "bf16"),
        ("NVIDIA A10G", "bf16"),  # no datasheet
        ("Tesla V100S-PCIE-32GB", "fp16"),
        ("Tesla T4", "bf16"),  # no bf16 units: emulated, no meaningful peak
        ("NVIDIA B200", "bf16"),
        ("AMD Instinct MI300X", "bf16"),
    ],
)
def test_unknown_gpus_and_precisions_have_no_peak(name, precision):
    assert peak_tflops(name, precision) is None


def test_float32_matmuls_count_as_tf32_only_when_pytorch_allows_it():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert matmul_precision("no") == "fp32"
        torch.set_float32_matmul_precision("high")
        assert matmul_precision("no") == "tf32"
        assert matmul_precision("bf16") == "bf16" and matmul_precision("fp16") == "fp16"
    finally:
        torch.set_float32_matmul_precision(before)


def test_cpu_runs_get_no_mfu():
    class FakeAccelerator:
        device, num_processes, mixed_precision = torch.device("cpu"), 1, "no"

    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11))
    throughput = Throughput.of_run(model, 8, FakeAccelerator())
    assert throughput.peak_flops is None and "no MFU" in throughput.peak_source
    expected = 6 * count_parameters(model) + 12 * 1 * 2 * 8 * 8
    assert throughput.flops_per_token == expected
