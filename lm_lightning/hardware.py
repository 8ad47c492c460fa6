"""What the hardware can do: the precision to train in, and the peak FLOP/s that model FLOPs utilisation
(MFU) is measured against."""

from __future__ import annotations

import json
import platform
import time

import torch

from lm_lightning.files import atomic_write_text, cache_root, file_lock

PEAKS_FILE = "peak_flops.json"
# Narrowest model for which bf16 autocast trains faster than fp32 on a CPU with bf16 units
# (benchmarks/precision_width.py): below it the casts cost more than the bf16 matmuls save.
BF16_MIN_WIDTH = 256


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_bf16() -> bool:
    """Whether the CPU multiplies bf16 matrices natively (AMX or AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def auto_precision(accelerator: str | None, n_embd: int | None = None) -> str:
    """bf16 autocast where the hardware runs bf16 matmuls natively (recent GPUs; CPUs with AMX or
    AVX512-BF16 for models at least ``BF16_MIN_WIDTH`` wide), full fp32 elsewhere: emulated bf16 is
    slower than fp32, and so is native bf16 on a CPU for narrow models."""
    if accelerator in (None, "auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    wide = n_embd is None or n_embd >= BF16_MIN_WIDTH
    return "bf16-mixed" if cpu_has_bf16() and wide else "32-true"


def precision_dtype(precision: str | None) -> torch.dtype:
    """The matmul dtype a Lightning precision setting computes in."""
    precision = str(precision or "32-true")
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def measured_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 0.5) -> float:
    """FLOP/s of back-to-back ``n x n`` matmuls on this device: the practical peak of this machine."""
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


def _cached_measured_peak(device: torch.device, dtype: torch.dtype, achieved: float = 0.0) -> float:
    """``measured_peak_flops``, measured once per machine, dtype and thread count and kept in the cache folder,
    so every run on a machine divides by the same peak and MFU compares across runs; measured again when a run
    has ``achieved`` more, and then the highest of the figures is kept."""
    name = cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)
    key = f"{name} | {device.type} | {str(dtype).removeprefix('torch.')} | {torch.get_num_threads()} threads"
    path = cache_root() / PEAKS_FILE
    with file_lock(path.with_name(PEAKS_FILE + ".lock")):
        try:
            peaks = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            peaks = {}
        if key not in peaks or peaks[key] < achieved:
            peaks[key] = max(measured_peak_flops(device, dtype), achieved, peaks.get(key, 0.0))
            atomic_write_text(path, json.dumps(peaks, indent=1), "peak FLOP/s cache")
    return peaks[key]


def peak_flops(device: torch.device, dtype: torch.dtype, achieved: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for ``device`` computing in ``dtype``: Lightning's datasheet
    table for the GPUs it knows, else this machine's matmul peak, measured once and cached. ``achieved``: FLOP/s
    a run has reached; a cached peak below it was measured while the machine was busy, and is measured again."""
    if device.type == "cuda":
        from lightning.fabric.utilities.throughput import get_available_flops

        if flops := get_available_flops(device, dtype):
            return float(flops), "datasheet (Lightning's table)"
    peak = _cached_measured_peak(device, dtype, achieved)
    return peak, f"measured {device.type} matmul, cached in {cache_root() / PEAKS_FILE}"
