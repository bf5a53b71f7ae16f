"""The machine's weight-read limit, measured, and how close a decode loop gets to it.

Decoding one token reads every weight once and does ~2 FLOPs per weight, far too little arithmetic to hide the
memory traffic, so at batch size 1 decode speed is bounded by

    tokens/s ≤ B / W          B = bytes/s memory delivers, W = weight bytes read per token

(the roofline argument, Williams et al. 2009; gpt-fast prints the achieved bandwidth for this reason).
`measure_read_bandwidth` measures B the way a decode step reads weights: a streaming reduction (`sum`) over a
buffer several times larger than the last-level cache, so every byte comes from memory, with torch's threads,
warm-up, and the median of repeats:

    B = buffer bytes / median seconds per pass

`achieved_fraction(tokens/s · W, B)` is then how much of the limit a decode loop uses (1.0 = at the limit;
Python and kernel-launch overhead, attention over the KV cache and activations make up the rest). The buffer is
`max(4 × LLC, 256 MiB)` on CPU (capped at 1/8 of RAM) and 1 GiB on CUDA, unless given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hayai.bench.hardware import last_level_cache_bytes, total_memory_bytes
from hayai.bench.timing import Timing, time_callable
from hayai.errors import ConfigError

MIB = 1024**2


@dataclass
class BandwidthLimit:
    """A measured read bandwidth."""

    bytes_per_second: float
    buffer_bytes: int
    device: str
    threads: int
    timing: Timing

    @property
    def gb_per_second(self) -> float:
        return self.bytes_per_second / 1e9

    def summary(self) -> str:
        return (f"{self.gb_per_second:.1f} GB/s read ({self.buffer_bytes / MIB:.0f} MiB buffer, {self.device}, "
                f"{self.threads} thread{'s' if self.threads != 1 else ''}, IQR {self.timing.relative_spread:.0%})")

    def as_dict(self) -> dict[str, Any]:
        return {"bytes_per_second": self.bytes_per_second, "buffer_bytes": self.buffer_bytes, "device": self.device,
                "threads": self.threads, "timing": self.timing.as_dict()}


def default_buffer_bytes(device_type: str = "cpu") -> int:
    """A buffer big enough that no cache holds it."""
    if device_type == "cuda":
        return 1024 * MIB
    llc = last_level_cache_bytes() or 32 * MIB
    return int(min(max(4 * llc, 256 * MIB), total_memory_bytes() // 8))


def measure_read_bandwidth(device: Any = "cpu", buffer_bytes: int | None = None, *, warmup: int = 1,
                           repeats: int = 5) -> BandwidthLimit:
    """Stream a buffer larger than the caches through a sum; bytes per second at the median pass."""
    import torch

    device = torch.device(device)
    size = buffer_bytes or default_buffer_bytes(device.type)
    if size < 4 * MIB:
        raise ConfigError(f"a bandwidth buffer of {size} bytes fits in cache; use at least 4 MiB")
    buffer = torch.ones(size // 4, dtype=torch.float32, device=device)  # [N] fp32; ones touches every page
    sink: list[torch.Tensor] = []

    def read() -> None:
        sink[:] = [buffer.sum()]

    timing = time_callable(read, warmup=warmup, repeats=repeats, device=device)
    nbytes = buffer.numel() * buffer.element_size()
    return BandwidthLimit(timing.rate(nbytes), nbytes, str(device), torch.get_num_threads(), timing)


def decode_bandwidth(tokens_per_second: float, weight_bytes_per_token: float) -> float:
    """Weight bytes read per second while decoding at `tokens_per_second` (one full read per token)."""
    return tokens_per_second * weight_bytes_per_token


def achieved_fraction(achieved_bytes_per_second: float, limit: BandwidthLimit | float) -> float:
    """Achieved / limit (0 when the limit is unknown)."""
    limit_value = limit.bytes_per_second if isinstance(limit, BandwidthLimit) else float(limit)
    return achieved_bytes_per_second / limit_value if limit_value > 0 else 0.0


def roofline_tokens_per_second(weight_bytes_per_token: float, limit: BandwidthLimit | float) -> float:
    """The decode speed the bandwidth limit allows at batch size 1: B / W."""
    limit_value = limit.bytes_per_second if isinstance(limit, BandwidthLimit) else float(limit)
    return limit_value / weight_bytes_per_token if weight_bytes_per_token > 0 else 0.0
