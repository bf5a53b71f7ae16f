"""What machine is this? CPU model and ISA, memory, torch build, BLAS/oneDNN, threads, GPUs.

Used by `hayai doctor` and printed with every benchmark so results name the hardware that produced them.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from hayai.runtime import cpu_flags, physical_core_count

_ISA_FLAGS = {
    "AVX2": "avx2",
    "AVX-512": "avx512f",
    "AVX-512 BF16": "avx512_bf16",
    "AVX-512 FP16": "avx512_fp16",
    "AVX-512 VNNI": "avx512_vnni",
    "AVX-VNNI": "avx_vnni",
    "AMX tile": "amx_tile",
    "AMX BF16": "amx_bf16",
    "AMX INT8": "amx_int8",
}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_memory_bytes() -> int:
    try:
        import psutil

        return psutil.virtual_memory().total
    except Exception:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_isa() -> dict[str, bool]:
    flags = cpu_flags()
    return {name: flag in flags for name, flag in _ISA_FLAGS.items()}


def _parse_size(text: str) -> int:
    """'48K', '2048K', '260M' -> bytes."""
    text = text.strip().upper()
    scale = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
    return int(text.rstrip("KMGB") or 0) * scale


def cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> dict[str, int]:
    """CPU cache sizes seen by core 0, e.g. {"L1d": 49152, "L1i": 32768, "L2": 2097152, "L3": 272629760}."""
    found: dict[str, int] = {}
    try:
        entries = sorted(e for e in os.listdir(root) if e.startswith("index"))
    except OSError:
        return found
    for entry in entries:
        try:
            with open(f"{root}/{entry}/level") as f:
                level = f.read().strip()
            with open(f"{root}/{entry}/type") as f:
                kind = f.read().strip()
            with open(f"{root}/{entry}/size") as f:
                size = _parse_size(f.read())
        except (OSError, ValueError):
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        found[f"L{level}{suffix}"] = size
    return found


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache (what a buffer must exceed for a read to come from memory), or None if unknown."""
    sizes = cache_bytes()
    return max(sizes.values()) if sizes else None


def blas_summary() -> str:
    config = torch.__config__.show()
    for item in config.replace("\n", ",").split(","):
        key, _, value = item.strip().partition("=")
        if key == "BLAS_INFO":
            return value.strip()
    return "mkl" if torch.backends.mkl.is_available() else "unknown"


def gpus() -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    found = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        found.append({"index": i, "name": props.name, "memory_bytes": props.total_memory,
                      "capability": f"{props.major}.{props.minor}"})
    return found


def describe() -> dict[str, Any]:
    """A JSON-serialisable description of the hardware and software stack."""
    isa = cpu_isa()
    return {
        "cpu": cpu_model(),
        "cpu_cores_physical": physical_core_count(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa": [name for name, present in isa.items() if present],
        "memory_bytes": total_memory_bytes(),
        "caches": cache_bytes(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "blas": blas_summary(),
        "mkl": torch.backends.mkl.is_available(),
        "onednn": torch.backends.mkldnn.is_available(),
        "openmp": torch.backends.openmp.is_available(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "gpus": gpus(),
    }


def one_line(info: dict[str, Any] | None = None) -> str:
    """'Intel Xeon ... (2 cores, AVX-512 BF16), 24 GB, torch 2.13.0+cpu, 2 threads' for benchmark headers."""
    info = info or describe()
    isa = ", ".join(i for i in info["isa"] if i in ("AVX2", "AVX-512", "AVX-512 BF16", "AMX BF16"))
    gpu = "; ".join(f"{g['name']} ({g['memory_bytes'] / 2**30:.0f} GiB)" for g in info["gpus"])
    threads = f"{info['threads']} thread{'s' if info['threads'] != 1 else ''}"
    parts = [f"{info['cpu']} ({info['cpu_cores_physical']} cores, {isa or 'no AVX'})",
             f"{info['memory_bytes'] / 1e9:.0f} GB RAM", f"torch {info['torch']}", threads]
    if gpu:
        parts.append(gpu)
    return ", ".join(parts)
