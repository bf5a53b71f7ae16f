"""hayai.bench.energy (RAPL and nvidia-smi counters, faked on disk), bandwidth and hardware probes."""

from __future__ import annotations

import os
import stat

import pytest

from hayai.bench.bandwidth import (
    BandwidthLimit,
    achieved_fraction,
    decode_bandwidth,
    measure_read_bandwidth,
    roofline_tokens_per_second,
)
from hayai.bench.energy import EnergyMeter, energy_sources, rapl_domains
from hayai.bench.hardware import _parse_size, cache_bytes
from hayai.bench.timing import timing_from
from hayai.errors import ConfigError


def _domain(root, name, directory, energy, limit=2**32):
    d = root / directory
    d.mkdir()
    (d / "name").write_text(name + "\n")
    (d / "energy_uj").write_text(f"{energy}\n")
    (d / "max_energy_range_uj").write_text(f"{limit}\n")
    return d


@pytest.fixture
def no_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))


def test_rapl_package_and_dram_are_summed_core_is_not(tmp_path, no_gpu):
    pkg = _domain(tmp_path, "package-0", "intel-rapl:0", 1_000_000)
    core = _domain(tmp_path, "core", "intel-rapl:0:0", 500_000)
    dram = _domain(tmp_path, "dram", "intel-rapl:0:1", 2_000_000)
    assert set(rapl_domains(str(tmp_path))) == {"rapl:package-0", "rapl:dram-0"}
    meter = EnergyMeter(rapl_root=str(tmp_path))
    with meter:
        (pkg / "energy_uj").write_text("4000000\n")  # +3 J
        (core / "energy_uj").write_text("2500000\n")  # inside the package: not added
        (dram / "energy_uj").write_text("2500000\n")  # +0.5 J
    r = meter.reading
    assert r.available and r.joules == pytest.approx(3.5)
    assert r.sources == {"rapl:package-0": pytest.approx(3.0), "rapl:dram-0": pytest.approx(0.5)}
    assert "RAPL" in r.summary()


def test_rapl_counter_wraparound(tmp_path, no_gpu):
    pkg = _domain(tmp_path, "package-0", "intel-rapl:0", 999_000, limit=999_999)
    meter = EnergyMeter(rapl_root=str(tmp_path))
    with meter:
        (pkg / "energy_uj").write_text("1000\n")  # wrapped: 999_999 − 999_000 + 1 + 1000 µJ
    assert meter.reading.joules == pytest.approx(2000 / 1e6)


def test_unavailable_is_said_clearly(tmp_path, no_gpu):
    meter = EnergyMeter(rapl_root=str(tmp_path / "none"))
    with meter:
        pass
    r = meter.reading
    assert not r.available and r.joules is None and r.watts is None
    assert "unavailable" in r.summary() and "no RAPL counters" in r.note and "no nvidia-smi" in r.note
    assert energy_sources(str(tmp_path / "none")) == []


def _fake_nvidia_smi(bin_dir, counter_file):
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text(f"""#!/bin/sh
case "$1" in
  *total_energy_consumption*) echo "0, $(cat {counter_file})";;
  *power.draw*) echo "0, 100.0";;
esac
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_nvidia_smi_energy_counter(tmp_path, monkeypatch):
    counter = tmp_path / "mj"
    counter.write_text("5000")
    _fake_nvidia_smi(tmp_path / "bin", counter)
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + os.environ["PATH"])
    meter = EnergyMeter(rapl_root=str(tmp_path / "none"))
    with meter:
        counter.write_text("12500")  # +7.5 J
    assert meter.reading.sources == {"gpu0": pytest.approx(7.5)}
    assert "nvidia-smi energy counter" in meter.reading.note


def test_bandwidth_arithmetic():
    limit = BandwidthLimit(20e9, 1 << 30, "cpu", 2, timing_from([0.05]))
    assert decode_bandwidth(50.0, 2e8) == 1e10
    assert achieved_fraction(1e10, limit) == 0.5 and achieved_fraction(1.0, 0.0) == 0.0
    assert roofline_tokens_per_second(2e8, limit) == 100.0
    assert "20.0 GB/s" in limit.summary()


def test_measured_read_bandwidth_is_bytes_over_median_time():
    limit = measure_read_bandwidth(buffer_bytes=64 * 1024**2, repeats=3)
    assert limit.buffer_bytes == 64 * 1024**2
    assert limit.bytes_per_second == pytest.approx(limit.buffer_bytes / limit.timing.median)
    assert 1e8 < limit.bytes_per_second < 1e13  # between a slow disk and a fast HBM stack
    with pytest.raises(ConfigError):
        measure_read_bandwidth(buffer_bytes=1024)


def test_cache_sizes_from_sysfs(tmp_path):
    for i, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "2048K"),
                                             (3, "Unified", "260M")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(kind + "\n")
        (d / "size").write_text(size + "\n")
    assert cache_bytes(str(tmp_path)) == {"L1d": 48 * 1024, "L1i": 32 * 1024, "L2": 2 * 1024**2, "L3": 260 * 1024**2}
    assert cache_bytes(str(tmp_path / "missing")) == {}
    assert _parse_size("512") == 512


def test_nvidia_smi_power_is_sampled_where_the_counter_is_unsupported(tmp_path, monkeypatch):
    import time

    counter = tmp_path / "mj"
    counter.write_text("[N/A]")
    _fake_nvidia_smi(tmp_path / "bin", counter)
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + os.environ["PATH"])
    meter = EnergyMeter(rapl_root=str(tmp_path / "none"))
    with meter:
        time.sleep(0.4)
    r = meter.reading
    assert "power.draw sampled" in r.note
    assert r.joules == pytest.approx(100.0 * r.seconds, rel=0.3)  # 100 W throughout
