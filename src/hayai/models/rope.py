"""Rotary position embeddings (RoPE, Su et al. 2021, arXiv 2104.09864) and their context-extension scalings.

For a head vector x split in halves (x1, x2) and position p, with inv_freq_i = base^(-2i/d):

    rope(x, p) = x · cos(p · inv_freq) + rotate_half(x) · sin(p · inv_freq),  rotate_half(x) = (-x2, x1)

Scalings (see `RopeScaling`):
- linear / position interpolation (Chen et al. 2023, arXiv 2306.15595): inv_freq / factor;
- dynamic NTK: for a sequence of length L > L_orig the base grows to
  base · ((factor · L / L_orig) − (factor − 1))^(d / (d − 2)); shorter sequences use the original base;
- llama3: wavelengths longer than L_orig / low_freq_factor are divided by `factor`, shorter than
  L_orig / high_freq_factor are kept, and a linear ramp blends the band between.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hayai.models.config import ModelConfig


def default_inv_freq(base: float, dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[dim/2] inverse frequencies base^(-2i/dim), in fp32."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (base**exponents)


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position: int) -> torch.Tensor:
    low_freq_wavelen = original_max_position / low_freq_factor
    high_freq_wavelen = original_max_position / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Computes (cos, sin) for given positions; the frequencies follow the config's RoPE scaling."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dim = config.head_dim
        self.base = config.rope_theta
        self.scaling = config.rope_scaling
        self.original_max_position = config.trained_window
        # Created on CPU explicitly so that building the model under torch.device("meta") keeps real frequencies.
        inv_freq = default_inv_freq(self.base, self.dim, device="cpu")
        if self.scaling.rope_type == "linear":
            inv_freq = inv_freq / self.scaling.factor
        elif self.scaling.rope_type == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, self.scaling.factor, self.scaling.low_freq_factor,
                                       self.scaling.high_freq_factor, self.original_max_position)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def frequencies_for(self, positions: torch.Tensor) -> torch.Tensor:
        """Inverse frequencies to use for a forward pass over `positions` (dynamic NTK depends on its extent)."""
        if self.scaling.rope_type != "dynamic":
            return self.inv_freq
        seq_len = int(positions.max()) + 1
        if seq_len <= self.original_max_position:
            return self.inv_freq
        factor = self.scaling.factor
        base = self.base * ((factor * seq_len / self.original_max_position) - (factor - 1)) ** (
            self.dim / (self.dim - 2)
        )
        return default_inv_freq(base, self.dim, device=self.inv_freq.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] (int) -> cos, sin [B, 1, T, head_dim] in `dtype`, ready to broadcast over heads."""
        inv_freq = self.frequencies_for(positions)
        freqs = positions[..., None].float() * inv_freq  # [B, T, dim/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [B, T, dim]
        return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] rotated by position (cos, sin [B, 1, T, D])."""
    return x * cos + rotate_half(x) * sin
