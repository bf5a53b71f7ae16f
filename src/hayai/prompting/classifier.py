"""A small binary classifier on sentence embeddings: L2-regularised logistic regression (Cox 1958).

    p(y = 1 | x) = σ(wᵀx + b),   minimise  mean_i c_{y_i} · BCE(σ(wᵀx_i + b), y_i) + λ/2 · ||w||²

with class weights c_y = N / (2 · N_y) ("balanced") so a rare class still counts. Fitted full-batch with L-BFGS
(deterministic, a few milliseconds for a few thousand 384/768-dim points). Used by the Skeleton-of-Thought
router (does this question suit SoT?) and by FrugalGPT's answer scorer (is this answer reliable?).

When the training labels are all equal there is nothing to separate; the classifier then returns the smoothed
base rate (n_pos + 1) / (n + 2) for every input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hayai.errors import ConfigError


@dataclass
class LogisticClassifier:
    weight: torch.Tensor  # [D]
    bias: float

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-3, balanced: bool = True,
            max_iter: int = 200) -> LogisticClassifier:
        """x [N, D] float features, y [N] labels in {0, 1}."""
        if x.ndim != 2 or y.shape != (x.shape[0],):
            raise ConfigError(f"features must be [N, D] and labels [N]; got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[0] == 0:
            raise ConfigError("cannot train a classifier on no examples")
        x, y = x.double(), y.double()
        positives = float(y.sum())
        n = y.shape[0]
        if positives in (0.0, float(n)):
            rate = (positives + 1) / (n + 2)
            return cls(torch.zeros(x.shape[1]), float(torch.logit(torch.tensor(rate))))
        weights = torch.ones_like(y)
        if balanced:
            weights = torch.where(y > 0, n / (2 * positives), n / (2 * (n - positives)))
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

        def loss_fn() -> torch.Tensor:
            optimizer.zero_grad()
            logits = x @ w + b  # [N]
            loss = (weights * torch.nn.functional.binary_cross_entropy_with_logits(
                logits, y, reduction="none")).mean() + 0.5 * l2 * (w * w).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(loss_fn)
        return cls(w.detach().float(), float(b.detach()))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.weight + self.bias  # [N]

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> p(y = 1) [N]."""
        return torch.sigmoid(self.logits(x))

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight.tolist(), "bias": self.bias}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> LogisticClassifier:
        try:
            return cls(torch.tensor(data["weight"], dtype=torch.float32), float(data["bias"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: a classifier needs 'weight' (a list of numbers) and 'bias' ({exc})") \
                from None
