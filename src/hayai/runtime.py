"""Process-level runtime settings and probes: threads, devices, dtypes and peak memory.

This is the bottom layer: tensors and the operating system only, no models.
"""

from __future__ import annotations

import functools
import os
import resource
import sys
import time

import torch

_threads_configured = False


def physical_core_count() -> int:
    """Physical cores available to this process (hyper-threads do not help matmul-bound decode)."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False) or 0
    except Exception:  # psutil missing or unable to read the topology
        cores = 0
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores or allowed, allowed))


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op thread count once: the given number, else OMP_NUM_THREADS, else physical cores."""
    global _threads_configured
    if num_threads is None and _threads_configured:
        return torch.get_num_threads()
    if num_threads is None:
        env = os.environ.get("OMP_NUM_THREADS")
        num_threads = int(env) if env and env.isdigit() else physical_core_count()
    torch.set_num_threads(max(1, num_threads))
    _threads_configured = True
    return torch.get_num_threads()


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo (empty set where unavailable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16_instructions() -> bool:
    """True where the CPU reports native bf16 instructions (AVX512-BF16 or AMX). A flag, not a promise of speed:
    on some virtual machines that report AVX512-BF16, oneDNN's bf16 kernels run well below their fp32 speed, so
    `bf16_speedup` measures before bf16 is chosen for speed."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


@functools.cache
def bf16_speedup(m: int = 256, k: int = 576, n: int = 1536, rounds: int = 7) -> float:
    """How many times faster a bf16 [m, k] x [k, n] linear runs than an fp32 one on this CPU (m=1 is the decode
    shape, larger m the prefill/training shape). The two are timed alternately `rounds` times and the fastest of
    each is compared, which is robust to interference from other processes. About 10-50 ms; cached."""
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=generator), torch.randn(n, k, generator=generator)
    xb, wb = x.bfloat16(), w.bfloat16()
    best = {"fp32": float("inf"), "bf16": float("inf")}
    torch.nn.functional.linear(x, w), torch.nn.functional.linear(xb, wb)  # warm-up (oneDNN primitive creation)
    for _ in range(rounds):
        for name, (a, b) in (("fp32", (x, w)), ("bf16", (xb, wb))):
            start = time.perf_counter()
            torch.nn.functional.linear(a, b)
            best[name] = min(best[name], time.perf_counter() - start)
    return best["fp32"] / best["bf16"]


def cpu_bf16_pays(m: int = 256, min_ratio: float = 0.95) -> bool:
    """bf16 on this CPU is worth it for [m, ·] matmuls: native instructions and measured at least `min_ratio`
    times the fp32 speed (bf16 halves the bytes, so parity is already a memory win)."""
    return cpu_has_bf16_instructions() and bf16_speedup(m=m) >= min_ratio


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on GPUs (fp16 where bf16 is unsupported); on CPU bf16 where a decode-shaped bf16 matmul
    is measured at least as fast as fp32 (`cpu_bf16_pays(m=1)`), fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_bf16_pays(m=1) else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        from hayai.errors import ConfigError

        raise ConfigError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(sorted(_DTYPES))}") from None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int:
    """Resident set size now."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory relevant to `device`: CUDA allocator peak on GPUs, process peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()
