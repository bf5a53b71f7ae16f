"""Choosing the autocast dtype: measured, not assumed from CPU flags."""

from __future__ import annotations

import pytest
import torch

import hayai.runtime as runtime
import hayai.train.precision as precision
from hayai.errors import ConfigError


@pytest.mark.parametrize(("flag", "speedup", "expected"), [
    (False, 3.0, None),  # no native bf16: fp32
    (True, 2.0, torch.bfloat16),  # native and faster: bf16
    (True, 0.6, None),  # "native" but slower here (seen on VMs): fp32
])
def test_auto_on_cpu_needs_the_flag_and_a_measured_speedup(monkeypatch, flag, speedup, expected):
    monkeypatch.setattr(runtime, "cpu_has_bf16_instructions", lambda: flag)
    monkeypatch.setattr(runtime, "bf16_speedup", lambda m: speedup)
    assert precision.resolve_autocast("auto", torch.device("cpu")) == expected
    assert runtime.resolve_dtype("auto", torch.device("cpu")) == (expected or torch.float32)


def test_explicit_choices_and_errors():
    cpu = torch.device("cpu")
    assert precision.resolve_autocast("bf16", cpu) == torch.bfloat16
    assert precision.resolve_autocast("none", cpu) is None
    with pytest.raises(ConfigError, match="autocast must be one of"):
        precision.resolve_autocast("fp16", cpu)


def test_the_probe_measures_a_positive_ratio():
    assert runtime.bf16_speedup(m=16, k=32, n=32, rounds=2) > 0
