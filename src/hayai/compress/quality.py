"""Quality callbacks for `deep_compress`: perplexity of a causal LM, accuracy of a classifier.

Perplexity over token ids x_1..x_N, scored in consecutive windows of W tokens (each window conditions only on
itself, so the first token of a window is not scored):

    PPL = exp( − (1/M) Σ_windows Σ_{t=2..|w|} log p(x_t | x_<t within the window) ),   M = tokens scored
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hayai.errors import ConfigError


@torch.no_grad()
def perplexity(model: nn.Module, ids: Sequence[int] | torch.Tensor, window: int = 256,
               progress: Callable[[int, int], None] | None = None) -> float:
    """Perplexity of `model` (ids [1, T] -> logits [1, T, V]) on `ids`, in windows of `window` tokens."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if ids.numel() < 2:
        raise ConfigError("perplexity needs at least 2 tokens of text")
    if window < 2:
        raise ConfigError(f"perplexity window must be >= 2 tokens, got {window}")
    device = next(model.parameters()).device
    starts = [s for s in range(0, ids.numel(), window) if ids.numel() - s >= 2]
    nll, count = 0.0, 0
    for i, start in enumerate(starts):
        chunk = ids[start:start + window].to(device)[None]  # [1, W]
        logits = model(chunk)[0, :-1].float()  # [W-1, V]
        nll += float(F.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
        count += chunk.shape[1] - 1
        if progress is not None:
            progress(i + 1, len(starts))
    return math.exp(nll / count)


@torch.no_grad()
def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    """Fraction of `inputs` whose argmax logit is the label."""
    correct = 0
    for start in range(0, len(inputs), batch_size):
        logits = model(inputs[start:start + batch_size])
        correct += int((logits.argmax(-1) == labels[start:start + batch_size]).sum())
    return correct / max(1, len(inputs))
