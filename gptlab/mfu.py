"""Throughput figures of training: tokens/s, seconds per optimizer step and MFU.

MFU (model flops utilisation) is the share of the devices' peak that the model's own flops reach:
flops per token 6N + 12*L*H*Q*T (PaLM appendix B, as in nanoGPT) times tokens/s, over the peak of
every device in use. N is the parameter count without position embeddings, L layers, H heads,
Q head size, T the length of the training sequences. The peak comes from a table of datasheet
figures (dense, no sparsity); a CPU or a GPU not in the table gets no MFU rather than a wrong one.

Memory (the benchmark's --memory) is the allocator's peak on a GPU, and on a Linux CPU the
process's peak resident set size (VmHWM, which /proc/self/clear_refs resets, after glibc's
malloc_trim hands back freed memory): it counts Python and the libraries too, so compare such
figures with each other.
"""

import contextlib
import ctypes
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from models import count_parameters

# Dense peak TFLOP/s per GPU from NVIDIA's datasheets (the figures there marked with sparsity, halved).
# fp32 is the plain CUDA-core rate; tf32 is float32 matmuls on tensor cores, which PyTorch uses only
# when asked (torch.set_float32_matmul_precision("high")). GPUs without bf16 or tf32 leave them out.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6},
    "L40": {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5},
    # GeForce cards: tensor-core rates with fp32 accumulation, as PyTorch's matmuls accumulate.
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
    "RTX 3090": {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6},
    "V100 SXM2": {"fp16": 125.0, "fp32": 15.7},
    "V100 PCIe": {"fp16": 112.0, "fp32": 14.0},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}

# torch.cuda.get_device_name() -> table row; the first pattern that matches wins, so the more
# specific come first. Variants with other peaks (laptop GPUs, 3090 Ti, 4090 D, V100S) match none.
# The A10G (AWS) is left out: NVIDIA publishes no datasheet for it.
DEVICE_PATTERNS: list[tuple[str, str]] = [
    (r"H100 PCIe", "H100 PCIe"),
    (r"H100 NVL", "H100 NVL"),
    (r"H100", "H100 SXM"),
    (r"H200 NVL", "H200 NVL"),
    (r"\bG?H200\b", "H200"),  # GH200 runs its Hopper GPU at H100/H200 SXM rates
    (r"A100", "A100"),
    (r"\bA10$", "A10"),
    (r"L40S", "L40S"),
    (r"\bL40$", "L40"),
    (r"\bL4$", "L4"),
    (r"RTX 4090$", "RTX 4090"),
    (r"RTX 3090$", "RTX 3090"),
    (r"V100-SXM2", "V100 SXM2"),
    (r"V100-PCIE", "V100 PCIe"),
    (r"\bT4$", "T4"),
]


def flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> int:
    """Training flops per token: 6 per parameter (forward and backward) plus attention's scores."""
    return 6 * n_params + 12 * n_layer * n_head * head_dim * seq_len


def matmul_precision(mixed_precision: str) -> str:
    """The column of PEAK_TFLOPS that Accelerate's mixed precision mode computes matmuls in."""
    if mixed_precision in ("bf16", "fp16"):
        return mixed_precision
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of the named GPU in this precision; None when not known."""
    for pattern, row in DEVICE_PATTERNS:
        if re.search(pattern, device_name):
            peaks = PEAK_TFLOPS[row]
            if precision == "tf32" and "tf32" not in peaks:
                precision = "fp32"  # no TF32 units: float32 matmuls run at the fp32 rate
            return peaks.get(precision)
    return None


@dataclass
class Throughput:
    """Turns the tokens and optimizer steps of a stretch of training and its seconds into figures."""

    flops_per_token: int
    peak_flops: float | None
    """Peak flop/s of all processes' devices together; None: no MFU."""
    peak_source: str
    """What the peak is, or why there is none, for the log."""

    @classmethod
    def of_run(cls, model: nn.Module, seq_len: int, accelerator: Accelerator) -> "Throughput":
        """The figures of training `model` on sequences of seq_len tokens on the accelerator's devices."""
        config = model.config
        device, processes = accelerator.device, accelerator.num_processes
        per_token = flops_per_token(
            count_parameters(model), config.n_layer, config.n_head, config.head_dim, seq_len
        )
        if device.type != "cuda":
            return cls(per_token, None, f"no MFU on {device.type}")
        name = torch.cuda.get_device_name(device)
        precision = matmul_precision(accelerator.mixed_precision)
        peak = peak_tflops(name, precision)
        if peak is None:
            return cls(per_token, None, f"no MFU: no {precision} peak known for {name}")
        source = f"MFU against {processes} x {peak:g} TFLOP/s ({name}, {precision})"
        return cls(per_token, peak * 1e12 * processes, source)

    def figures(self, tokens: int, steps: int, seconds: float) -> dict:
        """tokens_per_sec, step_time (seconds per optimizer step) and, where the peak is known, mfu."""
        tokens_per_sec = tokens / seconds
        figures = {"tokens_per_sec": tokens_per_sec, "step_time": seconds / max(steps, 1)}
        if self.peak_flops:
            figures["mfu"] = tokens_per_sec * self.flops_per_token / self.peak_flops
        return figures


def _proc_status_mib(field: str) -> float | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) / 1024 if found else None


def memory_mib(device: torch.device) -> float | None:
    """Memory this process holds now: allocated on a GPU, resident on a CPU (None: unknown)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return _proc_status_mib("VmRSS")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc: give freed memory back to the system
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # peak resident size := current


def peak_memory_mib(device: torch.device) -> float | None:
    """The most this process held since reset_peak_memory (None: unknown here)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _proc_status_mib("VmHWM")
