"""Wall-clock timing with warm-up and repeats, summarised by the median and a robust spread.

    t = time_callable(fn, warmup=1, repeats=5)      # fn() is called 1 + 5 times; the first run is discarded
    t.median, t.iqr, t.mad                          # seconds
    t.rate(tokens)                                  # tokens / median seconds

The median of the repeats is the estimate: on a shared or throttling machine the distribution of run times has a
long right tail (other processes, page faults, frequency changes), which moves the mean but not the median.
The spread is reported two ways, both insensitive to that tail:

    IQR = Q3 − Q1                      (quartiles by linear interpolation, `statistics.quantiles(method="inclusive")`)
    MAD = median_i |t_i − median(t)|   (the median absolute deviation, unscaled)

Warm-up runs are discarded: the first call pays for lazy initialisation (kernel selection, weight repacking,
allocator growth, page faults on fresh memory). On CUDA, kernels run asynchronously, so the clock is read only
after `torch.cuda.synchronize()` (pass `device=`); this is what `torch.utils.benchmark` and gpt-fast do.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hayai.errors import ConfigError


def synchronizer(device: Any = None) -> Callable[[], None]:
    """A function that waits for queued work on `device` (CUDA), or does nothing (CPU and None)."""
    if device is None:
        return lambda: None
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass(frozen=True)
class Timing:
    """Seconds of each measured repeat (warm-up runs excluded)."""

    samples: tuple[float, ...]
    warmup: int = 0

    def __post_init__(self) -> None:
        if not self.samples:
            raise ConfigError("a Timing needs at least one sample")

    @property
    def repeats(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def quartiles(self) -> tuple[float, float]:
        """(Q1, Q3); both equal the sample when there is only one."""
        if len(self.samples) == 1:
            return self.samples[0], self.samples[0]
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q1, q3

    @property
    def iqr(self) -> float:
        q1, q3 = self.quartiles
        return q3 - q1

    @property
    def mad(self) -> float:
        m = self.median
        return statistics.median(abs(s - m) for s in self.samples)

    @property
    def relative_spread(self) -> float:
        """IQR / median: 0.05 means the middle half of the runs lie within a 5% band."""
        return self.iqr / self.median if self.median > 0 else 0.0

    def rate(self, work: float) -> float:
        """`work` units (tokens, bytes, FLOPs) per second at the median time."""
        return work / self.median if self.median > 0 else 0.0

    def summary(self, unit: str = "s") -> str:
        """'12.3 ms (IQR 0.4 ms, 5 runs)'."""
        scale, name = _time_unit(self.median) if unit == "s" else (1.0, unit)
        return (f"{self.median * scale:.3g} {name} (IQR {self.iqr * scale:.2g} {name}, "
                f"{self.repeats} run{'s' if self.repeats != 1 else ''})")

    def as_dict(self) -> dict[str, Any]:
        q1, q3 = self.quartiles
        return {"median_s": self.median, "iqr_s": self.iqr, "mad_s": self.mad, "q1_s": q1, "q3_s": q3,
                "min_s": self.min, "max_s": self.max, "mean_s": self.mean, "repeats": self.repeats,
                "warmup": self.warmup, "samples_s": list(self.samples)}


def _time_unit(seconds: float) -> tuple[float, str]:
    for scale, name in ((1.0, "s"), (1e3, "ms"), (1e6, "µs")):
        if seconds * scale >= 1.0:
            return scale, name
    return 1e9, "ns"


def time_callable(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5, min_seconds: float = 0.0,
                  max_repeats: int | None = None, device: Any = None,
                  clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Call `fn()` `warmup` times unmeasured, then at least `repeats` times measured.

    With `min_seconds`, measuring continues until the measured runs add up to that long (at most `max_repeats`
    runs, default 10x `repeats`), so fast functions get enough samples. `device`: synchronize CUDA around each run.
    """
    if warmup < 0 or repeats < 1:
        raise ConfigError(f"time_callable needs warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    limit = max(repeats, max_repeats if max_repeats is not None else 10 * repeats)
    sync = synchronizer(device)
    for _ in range(warmup):
        fn()
    sync()
    samples: list[float] = []
    while len(samples) < repeats or (sum(samples) < min_seconds and len(samples) < limit):
        start = clock()
        fn()
        sync()
        samples.append(clock() - start)
    return Timing(tuple(samples), warmup)


def timing_from(samples: Sequence[float], warmup: int = 0) -> Timing:
    """A Timing from durations measured elsewhere (e.g. per-prompt decode times)."""
    return Timing(tuple(float(s) for s in samples), warmup)


class Stopwatch:
    """Times one block: `with Stopwatch(device) as sw: ...` then `sw.seconds`."""

    def __init__(self, device: Any = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self._sync = synchronizer(device)
        self._clock = clock
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self._sync()
        self._start = self._clock()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.seconds = self._clock() - self._start
