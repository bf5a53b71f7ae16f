"""Helpers shared by tests/test_decode_*.py: tiny peaked models and a strategy driver without a tokenizer."""

from __future__ import annotations

import math

import torch
from tinymodels import hf_llama, native_from

from hayai.decode.engine import Autoregressive, DecodeStrategy, GenerationStats
from hayai.decode.sampling import SamplingParams


def tiny_lm(seed: int = 0, scale: float = 3.0, **overrides):
    """A tiny native Llama (vocab 97 unless overridden) whose weights are scaled up so that next-token
    distributions are peaked (greedy decoding then has no near-ties for rounding to flip)."""
    hf = hf_llama(seed=seed, **overrides)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return native_from(hf)


def decode(model, prompt: list[int], n: int, strategy: DecodeStrategy | None = None,
           sampling: SamplingParams | None = None, seed: int | None = None) -> tuple[list[int], GenerationStats]:
    """Exactly `n` tokens after `prompt` (no end-of-sequence), driving a strategy the way the engine does."""
    strategy = strategy or Autoregressive()
    sampling = sampling or SamplingParams()
    cache = model.new_cache(1, len(prompt) + n + strategy.extra_cache_slots)
    stats = GenerationStats()
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    out: list[int] = []
    with torch.inference_mode():
        strategy.start(model, cache, torch.tensor([prompt]), sampling, generator, stats)
        while len(out) < n:
            new = strategy.step(n - len(out))
            assert 1 <= len(new) <= n - len(out)
            out += new
    return out, stats


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Upper critical value of χ²(df) at the one-sided normal quantile z (3.09: α = 0.001), Wilson–Hilferty."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """(statistic, degrees of freedom) of observed counts against expected probabilities (cells with
    probability > 0; observed mass in a zero-probability cell makes the statistic infinite)."""
    n = counts.sum()
    expected = probs.double() * n
    if bool((counts[probs <= 0] > 0).any()):
        return math.inf, 1
    keep = probs > 0
    stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    return stat, int(keep.sum()) - 1
