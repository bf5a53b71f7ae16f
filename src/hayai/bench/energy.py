"""Energy used while a block of code runs, where the hardware exposes it; clearly "unavailable" elsewhere.

    meter = EnergyMeter()
    with meter:
        run()
    meter.reading.joules          # None when no counter is readable
    meter.reading.note            # what was measured, or why nothing was

Sources (the survey of efficient NLP methods, Treviso et al. 2023, asks for energy next to time and memory):

- CPU: Intel RAPL through Linux powercap (AMD exposes the same interface on Zen). Each package domain
  `/sys/class/powercap/intel-rapl:N` has a cumulative counter `energy_uj` (µJ) that wraps at
  `max_energy_range_uj`; its `dram` sub-domain, where present, is counted too (package energy excludes DRAM);
  `core`/`uncore` sub-domains are inside the package and are not added. E = Σ_domains (after − before) mod range.
  Since 2020 the counters are readable only by root on most distributions, and containers rarely expose them.
- NVIDIA GPUs: `nvidia-smi --query-gpu=total_energy_consumption` (mJ since the driver loaded; Volta and newer),
  read before and after. Where that field is not supported, `power.draw` is sampled every 100 ms during the
  block and integrated with the trapezoid rule.

The figures cover the whole package / GPU, including other processes: on a shared machine they are an upper bound
for the measured code. Carbon (CO₂eq) needs the grid's intensity at the time and place and is not estimated.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

RAPL_ROOT = "/sys/class/powercap"


@dataclass
class EnergyReading:
    """Joules per source (e.g. "rapl:package-0", "rapl:dram-0", "gpu0") and their sum."""

    sources: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""

    @property
    def available(self) -> bool:
        return bool(self.sources)

    @property
    def joules(self) -> float | None:
        return sum(self.sources.values()) if self.sources else None

    @property
    def watts(self) -> float | None:
        return self.joules / self.seconds if self.sources and self.seconds > 0 else None

    def summary(self) -> str:
        if not self.available:
            return f"energy unavailable ({self.note})"
        return f"{self.joules:.1f} J ({self.watts:.0f} W average; {self.note})"

    def as_dict(self) -> dict[str, Any]:
        return {"available": self.available, "joules": self.joules, "watts": self.watts, "seconds": self.seconds,
                "sources": dict(self.sources), "note": self.note}


# ---- RAPL -----------------------------------------------------------------------------------------------------
def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def rapl_domains(root: str = RAPL_ROOT) -> dict[str, str]:
    """Readable RAPL domains to add up: {"rapl:package-0": directory, "rapl:dram-0": directory, ...}."""
    found: dict[str, str] = {}
    for directory in sorted(glob.glob(os.path.join(root, "intel-rapl:*"))):
        parts = os.path.basename(directory).split(":")
        name = _read_text(os.path.join(directory, "name"))
        top = len(parts) == 2
        if not (top or name == "dram") or _read_int(os.path.join(directory, "energy_uj")) is None:
            continue
        label = name if name.rsplit("-", 1)[-1].isdigit() else f"{name}-{parts[1]}"
        found[f"rapl:{label}"] = directory
    return found


def _rapl_snapshot(domains: dict[str, str]) -> dict[str, tuple[int, int]]:
    """(energy µJ, wrap range µJ) per domain."""
    snap = {}
    for label, directory in domains.items():
        value = _read_int(os.path.join(directory, "energy_uj"))
        limit = _read_int(os.path.join(directory, "max_energy_range_uj")) or 0
        if value is not None:
            snap[label] = (value, limit)
    return snap


def _rapl_joules(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, float]:
    out = {}
    for label, (start, limit) in before.items():
        if label not in after:
            continue
        delta = after[label][0] - start
        if delta < 0 and limit:  # the counter wrapped around once
            delta += limit + 1
        out[label] = max(0, delta) / 1e6
    return out


# ---- nvidia-smi --------------------------------------------------------------------------------------------------
def _nvidia_smi(*args: str) -> list[list[str]] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, *args, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return [[c.strip() for c in line.split(",")] for line in proc.stdout.strip().splitlines() if line.strip()]


def _gpu_energy_mj() -> dict[str, float] | None:
    """Cumulative energy per GPU in mJ, or None where unsupported."""
    rows = _nvidia_smi("--query-gpu=index,total_energy_consumption")
    if not rows:
        return None
    try:
        return {f"gpu{r[0]}": float(r[1]) for r in rows}
    except (ValueError, IndexError):
        return None


class _PowerSampler:
    """Samples `power.draw` (W) of every GPU in a background thread; integrates with the trapezoid rule."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        rows = _nvidia_smi("--query-gpu=index,power.draw")
        try:
            watts = {f"gpu{r[0]}": float(r[1]) for r in rows or []}
        except (ValueError, IndexError):
            watts = {}
        if watts:
            self.samples.append((time.monotonic(), watts))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self._sample()
        joules: dict[str, float] = {}
        for (t0, w0), (t1, w1) in zip(self.samples, self.samples[1:], strict=False):
            for gpu in w0.keys() & w1.keys():
                joules[gpu] = joules.get(gpu, 0.0) + (w0[gpu] + w1[gpu]) / 2 * (t1 - t0)
        return joules


def gpu_power_readable() -> bool:
    rows = _nvidia_smi("--query-gpu=index,power.draw")
    try:
        return bool(rows) and all(float(r[1]) >= 0 for r in rows)
    except (ValueError, IndexError):
        return False


# ---- the meter ---------------------------------------------------------------------------------------------------
class EnergyMeter:
    """Context manager measuring energy over its block from every readable source; `.reading` after exit."""

    def __init__(self, rapl_root: str = RAPL_ROOT, gpus: bool = True) -> None:
        self.rapl_root = rapl_root
        self.gpus = gpus
        self.reading = EnergyReading(note="not measured yet")

    def __enter__(self) -> EnergyMeter:
        self._domains = rapl_domains(self.rapl_root)
        self._rapl = _rapl_snapshot(self._domains)
        self._gpu = _gpu_energy_mj() if self.gpus else None
        self._sampler = None
        if self.gpus and self._gpu is None and gpu_power_readable():
            self._sampler = _PowerSampler()
            self._sampler.start()
        self._start = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        seconds = time.monotonic() - self._start
        sources = _rapl_joules(self._rapl, _rapl_snapshot(self._domains))
        notes = []
        if sources:
            notes.append("RAPL " + ", ".join(s.removeprefix("rapl:") for s in sources))
        if self._gpu is not None:
            after = _gpu_energy_mj() or {}
            gpu = {k: (after[k] - v) / 1e3 for k, v in self._gpu.items() if k in after}
            sources.update(gpu)
            notes.append("nvidia-smi energy counter " + ", ".join(gpu))
        elif self._sampler is not None:
            gpu = self._sampler.stop()
            sources.update(gpu)
            notes.append("nvidia-smi power.draw sampled " + ", ".join(gpu))
        self.reading = EnergyReading(sources, seconds, "; ".join(notes) if sources else unavailable_reason(
            self.rapl_root, self.gpus))


def unavailable_reason(rapl_root: str = RAPL_ROOT, gpus: bool = True) -> str:
    """Why no energy counter can be read here."""
    if glob.glob(os.path.join(rapl_root, "intel-rapl:*")):
        cpu = f"RAPL counters under {rapl_root} are not readable (root only on most systems)"
    else:
        cpu = f"no RAPL counters under {rapl_root} (not exposed on this machine or container)"
    gpu = "no nvidia-smi" if shutil.which("nvidia-smi") is None else "nvidia-smi reports no energy or power"
    return f"{cpu}; {gpu}" if gpus else cpu


def energy_sources(rapl_root: str = RAPL_ROOT) -> list[str]:
    """The sources an `EnergyMeter` would read here (empty: energy is unavailable)."""
    found = list(rapl_domains(rapl_root))
    energy = _gpu_energy_mj()
    if energy is not None:
        found += list(energy)
    elif gpu_power_readable():
        found.append("gpu power.draw (sampled)")
    return found
