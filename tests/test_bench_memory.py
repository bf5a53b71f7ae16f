"""hayai.bench.memory: peak RSS of a function in a fresh process, on allocations of known size.

The worker functions are module-level (the child imports them by name) and this module imports nothing heavy
at the top, so a child running a pure-Python worker starts small.
"""

from __future__ import annotations

import os

import pytest

from hayai.bench.memory import IsolatedRunError, PeakRSS, rss_bytes, run_isolated
from hayai.errors import ConfigError

MB = 1024**2


def allocate_and_free(nbytes: int) -> int:
    """Touch every page of an nbytes buffer, free it, and return the RSS afterwards."""
    buffer = bytearray(b"\x01") * nbytes  # repetition writes every byte (bytearray(n) alone maps zero pages)
    assert buffer[-1] == 1
    del buffer
    return rss_bytes()


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def report_progress(n: int, progress=None) -> str:
    for i in range(n):
        progress("step", i + 1, n)
    return "done"


def die_by_signal() -> None:
    os.kill(os.getpid(), 9)


def sleep_forever() -> None:
    import time

    time.sleep(60)


def test_peak_of_a_known_allocation_in_a_fresh_process():
    size = 256 * MB
    result = run_isolated(allocate_and_free, size)
    assert result.peak_increase_bytes >= size - MB  # the peak, although the buffer was freed before returning
    # (less a few pages the baseline already held and the buffer reused)
    assert result.peak_increase_bytes < size + 48 * MB  # the interpreter adds little
    assert result.value < result.peak_rss_bytes - size / 2  # RSS after freeing is far below the peak
    assert result.exact == os.path.exists("/proc/self/clear_refs")
    assert result.seconds > 0


def test_a_bigger_allocation_reads_proportionally_bigger():
    small = run_isolated(allocate_and_free, 64 * MB).peak_increase_bytes
    big = run_isolated(allocate_and_free, 192 * MB).peak_increase_bytes
    assert big - small == pytest.approx(128 * MB, rel=0.15)


def test_errors_in_the_child_come_back_with_type_message_and_traceback():
    with pytest.raises(IsolatedRunError) as info:
        run_isolated(raise_value_error, "bad input on line 3")
    assert info.value.error_type == "ValueError"
    assert "bad input on line 3" in str(info.value)
    assert "raise_value_error" in info.value.child_traceback


def test_a_child_that_dies_or_hangs_is_reported():
    with pytest.raises(IsolatedRunError, match="killed by signal 9"):
        run_isolated(die_by_signal)
    with pytest.raises(IsolatedRunError, match="limit"):
        run_isolated(sleep_forever, timeout=3)


def test_progress_is_forwarded_from_the_child():
    seen = []
    result = run_isolated(report_progress, 3, progress=lambda *args: seen.append(args))
    assert result.value == "done" and seen == [("step", 1, 3), ("step", 2, 3), ("step", 3, 3)]


def test_local_functions_are_refused():
    def local():
        return 1

    with pytest.raises(ConfigError, match="module-level"):
        run_isolated(local)


def test_in_process_phase_probe():
    import mmap

    probe = PeakRSS()
    fresh = mmap.mmap(-1, 64 * MB)  # anonymous pages, never resident before: RSS must grow once they are written
    fresh.write(b"\x01" * (64 * MB))
    grown = rss_bytes() - probe.baseline
    fresh.close()
    if grown < 32 * MB:
        pytest.skip(f"this platform's RSS accounting did not see 64 MiB of fresh pages (grew {grown} bytes)")
    assert probe.increase() >= grown - MB  # the peak outlives the pages it saw
