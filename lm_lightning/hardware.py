"""Peak FLOP/s of the device, for model FLOPs utilisation (MFU)."""

from __future__ import annotations

import time
from functools import lru_cache

import torch

# Dense (no sparsity) tensor-core peaks from the vendors' datasheets, in FLOP/s, by device-name
# substring. Unknown devices are measured instead (a large matmul), which understates the datasheet
# peak a little and so overstates MFU a little.
DATASHEET_PEAKS = {
    "H200": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 494e12},  # SXM, TF32 for fp32
    "H100": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 494e12},  # SXM
    "A100": {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 156e12},
    "L4": {torch.bfloat16: 121e12, torch.float16: 121e12, torch.float32: 60e12},
    "RTX 4090": {torch.bfloat16: 165e12, torch.float16: 165e12, torch.float32: 83e12},
}


def precision_dtype(precision: str | None) -> torch.dtype:
    """The matmul dtype a Lightning precision setting computes in."""
    precision = str(precision or "32-true")
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


@lru_cache(maxsize=None)
def measured_peak_flops(device_type: str, dtype: torch.dtype, n: int = 2048, seconds: float = 0.5) -> float:
    """FLOP/s of back-to-back ``n x n`` matmuls on this device: the practical peak of this machine."""
    device = torch.device(device_type)
    generator = torch.Generator(device).manual_seed(0)  # its own: the global RNG state belongs to training
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=generator) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        if device.type == "cuda" and count % 10:
            continue
        sync()
    sync()
    return 2 * n**3 * count / (time.perf_counter() - start)


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for ``device`` computing in ``dtype``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in DATASHEET_PEAKS.items():
            if key in name:
                return peaks[dtype], f"datasheet {key}"
    return measured_peak_flops(device.type, dtype), f"measured {device.type} matmul"
