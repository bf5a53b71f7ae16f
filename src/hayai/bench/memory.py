"""Peak memory, measured honestly: peak RSS of a function in a fresh process, in-process phases, CUDA peaks.

Why a fresh process. The kernel keeps one high-water mark of resident memory per process (`VmHWM` in
/proc/PID/status, `ru_maxrss` in getrusage). In a long-lived process that mark belongs to whatever ran first
and biggest, and memory freed by Python or torch often stays mapped in the allocator, so "peak RSS after
running X" says little about X. `run_isolated(fn, ...)` runs `fn` in a newly spawned interpreter (not a fork,
which would start with the parent's pages) and reports

    peak_rss_bytes      = VmHWM of the child after fn returns       (whole process: interpreter, torch, fn)
    baseline_rss_bytes  = RSS of the child just before fn starts   (interpreter + modules fn's pickle imported)
    peak_increase_bytes = peak_rss_bytes − baseline_rss_bytes      (what fn itself added at its worst moment)

Where Linux allows it, the high-water mark is reset to the current RSS just before `fn` starts
(`echo 5 > /proc/self/clear_refs`), so `peak_increase_bytes` excludes transient peaks of interpreter start-up;
`exact` says whether that reset happened. `PeakRSS` uses the same reset to measure phases inside one process
(e.g. generation after loading), which is exact where the reset works and an upper bound elsewhere.

CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` is exact for tensors from torch's caching
allocator (not the CUDA context or other libraries' allocations); `cuda_peak_memory(fn)` measures that.

This module imports torch only when CUDA is asked about, so a child running a pure-Python function stays small.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import resource
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hayai.errors import ConfigError

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# ---- in-process probes ---------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """The kernel's high-water mark of this process's resident memory (since start or the last reset)."""
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Set the high-water mark to the current RSS (Linux `clear_refs` 5); False where the OS does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak RSS of a phase of this process: `probe = PeakRSS()` ... `probe.peak()`, `probe.increase()`.

    `exact` is False where the high-water mark could not be reset: the peak then covers the whole process life."""

    def __init__(self) -> None:
        self.exact = reset_peak_rss()
        self.baseline = rss_bytes()

    def peak(self) -> int:
        return max(peak_rss_bytes(), rss_bytes())

    def increase(self) -> int:
        return max(0, self.peak() - self.baseline)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise), so the RSS after a
    setup phase reflects what is still in use."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def cuda_peak_memory(fn: Callable[[], Any], device: Any = None) -> tuple[Any, int, int]:
    """Run `fn()` and return (its value, peak CUDA bytes allocated during it, peak minus the bytes held before)."""
    import torch

    device = torch.device(device or "cuda")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    value = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return value, peak, peak - before


# ---- a function in a fresh process -------------------------------------------------------------------------------
@dataclass
class IsolatedResult:
    """What `run_isolated` measured; see the module docstring for the definitions."""

    value: Any
    peak_rss_bytes: int
    baseline_rss_bytes: int
    exact: bool
    seconds: float
    cuda_peak_bytes: int | None = None
    cpu_seconds: float | None = None  # user + system CPU time of the child, all threads, start-up included

    @property
    def peak_increase_bytes(self) -> int:
        return max(0, self.peak_rss_bytes - self.baseline_rss_bytes)


class IsolatedRunError(RuntimeError):
    """The function failed in the child process (or the child died); carries the child's error and traceback."""

    def __init__(self, message: str, error_type: str = "", child_traceback: str = "") -> None:
        super().__init__(message)
        self.error_type = error_type
        self.child_traceback = child_traceback


def _send_progress(conn: Any) -> Callable[..., None]:
    def send(*args: Any) -> None:
        conn.send(("progress", args))

    return send


def _die_with_parent() -> None:
    """Linux: have the kernel kill this process when its parent dies, so a killed run leaves no orphans."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _child(conn: Any, fn: Callable, args: tuple, kwargs: dict, threads: int | None, progress: bool) -> None:
    _die_with_parent()
    try:
        if threads:
            import torch

            torch.set_num_threads(threads)
        if progress:
            kwargs = {**kwargs, "progress": _send_progress(conn)}
        exact = reset_peak_rss()
        baseline = rss_bytes()
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        seconds = time.perf_counter() - start
        peak = max(peak_rss_bytes(), rss_bytes())
        cuda_peak = None
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            cuda_peak = int(torch.cuda.max_memory_allocated())
        usage = resource.getrusage(resource.RUSAGE_SELF)
        conn.send(("result", value, peak, baseline, exact, seconds, cuda_peak, usage.ru_utime + usage.ru_stime))
    except BaseException as exc:  # everything goes back to the parent, which decides
        with contextlib.suppress(pickle.PicklingError, OSError, ValueError):
            conn.send(("error", type(exc).__name__, str(exc), traceback.format_exc()))
    finally:
        conn.close()


def run_isolated(fn: Callable[..., Any], *args: Any, timeout: float | None = None, threads: int | None = None,
                 progress: Callable[..., None] | None = None, **kwargs: Any) -> IsolatedResult:
    """Run `fn(*args, **kwargs)` in a fresh Python process and return its value with its peak RSS.

    `fn` must be importable by name (a module-level function) and its arguments and value picklable. As with
    any spawned process, a script calling this must guard its top level with `if __name__ == "__main__":`.
    `threads` sets torch's thread count in the child (default: torch's default there). With `progress`, the
    child calls `fn(..., progress=callback)` and every call of that callback is forwarded to `progress` here.
    Raises `IsolatedRunError` with the child's exception type, message and traceback when `fn` raises, when the
    child dies (e.g. killed for memory) or when it runs past `timeout` seconds (it is then killed).
    """
    if getattr(fn, "__qualname__", "").count("<locals>") or getattr(fn, "__name__", "") == "<lambda>":
        raise ConfigError(f"run_isolated needs a module-level function, not {fn!r} (it is pickled by name)")
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(send, fn, args, kwargs, threads, progress is not None), daemon=True)
    process.start()
    send.close()
    deadline = None if timeout is None else time.monotonic() + timeout
    message = None
    try:
        while message is None:
            if deadline is not None and time.monotonic() > deadline:
                process.kill()
                raise IsolatedRunError(f"{_name(fn)} ran past its {timeout:g} s limit and was stopped", "Timeout")
            if not receive.poll(0.05):
                if not process.is_alive() and not receive.poll(0):
                    break
                continue
            try:
                item = receive.recv()
            except EOFError:
                break
            if item[0] == "progress":
                if progress is not None:
                    progress(*item[1])
            else:
                message = item
    finally:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
        receive.close()
    if message is None:
        code = process.exitcode
        why = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
        hint = " (out of memory?)" if code == -9 else ""
        raise IsolatedRunError(f"the process running {_name(fn)} {why}{hint} before returning", "ProcessDied")
    if message[0] == "error":
        _, kind, text, tb = message
        raise IsolatedRunError(f"{kind}: {text}" if text else kind, kind, tb)
    _, value, peak, baseline, exact, seconds, cuda_peak, cpu = message
    return IsolatedResult(value, peak, baseline, exact, seconds, cuda_peak, cpu)


def _name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
