"""Iterative magnitude pruning with retraining (Deep Compression, stage 1).

Han, Pool, Tran & Dally, "Learning both Weights and Connections for Efficient Neural Networks", NIPS 2015
(arXiv:1506.02626), as used in Han, Mao & Dally, "Deep Compression", ICLR 2016 (arXiv:1510.00149): train,
remove the connections of smallest magnitude, retrain the survivors, and repeat with a higher sparsity.

For a weight W with n entries and target sparsity s, the mask keeps the n − round(s·n) entries of largest
|W| (ties broken by position, so the count is exact):

    M = 1[|W| ranks among the n − round(s·n) largest],    W ← W ⊙ M

The ranking is per layer (``scope="layer"``: every layer loses the same fraction, or the fraction a per-layer
mapping gives it) or over all target weights at once (``scope="global"``: one threshold, so layers with many
small weights lose more). Pruned entries stay pruned: later steps rank only the survivors.

Retraining keeps the pruned entries at exactly zero: a gradient hook multiplies ∂L/∂W by M, so a fresh
optimizer never moves them (SGD, momentum, Adam and weight decay all leave a zero weight with zero gradient and
zero state at zero); `MagnitudePruner.attach(optimizer)` re-applies M after every step for optimizers that
already carry state, and `apply_masks()` does it by hand.

Iterative schedule over T steps to the target s (`sparsity_schedule`):
  geometric  s_t = 1 − (1 − s)^(t/T)        (the kept fraction shrinks by the same factor each step)
  linear     s_t = s·t/T
  cubic      s_t = s·(1 − (1 − t/T)^3)       (Zhu & Gupta 2017, arXiv:1710.01878: prune fast, then slowly)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

from hayai.compress.targets import COMPRESSIBLE_TYPES, TargetWeight, compressible_weights
from hayai.errors import ConfigError

Sparsity = float | Mapping[str, float]
SCHEDULES = ("geometric", "linear", "cubic")


def sparsity_schedule(target: float, steps: int, kind: str = "geometric") -> list[float]:
    """The sparsity after each of `steps` pruning steps, ending exactly at `target`."""
    _check_fraction(target, "sparsity")
    if steps < 1:
        raise ConfigError(f"pruning steps must be >= 1, got {steps}")
    if kind not in SCHEDULES:
        raise ConfigError(f"sparsity schedule {kind!r}: expected one of {', '.join(SCHEDULES)}")
    out = []
    for t in range(1, steps + 1):
        f = t / steps
        if kind == "geometric":
            out.append(1.0 - (1.0 - target) ** f)
        elif kind == "linear":
            out.append(target * f)
        else:
            out.append(target * (1.0 - (1.0 - f) ** 3))
    out[-1] = target
    return out


def _check_fraction(value: float, what: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{what} must be in [0, 1), got {value}")


def sparsity_for(name: str, sparsity: Sparsity) -> float:
    """A layer's sparsity: the float itself, or the first matching glob pattern of a mapping (0 if none)."""
    if isinstance(sparsity, Mapping):
        for pattern, value in sparsity.items():
            if fnmatchcase(name, pattern):
                return float(value)
        return 0.0
    return float(sparsity)


def keep_largest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """A bool mask with True at exactly `keep` entries of largest score (ties: lower flat index first)."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    if keep <= 0:
        return mask.view(scores.shape)
    if keep >= flat.numel():
        return mask.fill_(True).view(scores.shape)
    threshold = torch.kthvalue(flat.float(), flat.numel() - keep + 1).values  # the keep-th largest score
    above = flat > threshold
    ties = torch.nonzero(flat == threshold).squeeze(1)
    mask |= above
    mask[ties[: keep - int(above.sum())]] = True
    return mask.view(scores.shape)


class MagnitudePruner:
    """Magnitude masks for the weights of a model's Linear/Conv/Embedding layers, kept through retraining.

    ``include``/``exclude`` are glob patterns over module names (see `hayai.compress.targets`). The pruner
    registers gradient hooks when created; `remove()` detaches them (the zeros stay in the weights).
    """

    def __init__(self, model: nn.Module, *, include: str | Sequence[str] | None = None,
                 exclude: str | Sequence[str] | None = None, scope: str = "layer",
                 types: tuple[type[nn.Module], ...] = COMPRESSIBLE_TYPES):
        if scope not in ("layer", "global"):
            raise ConfigError(f"pruning scope {scope!r}: expected 'layer' or 'global'")
        self.scope = scope
        self.targets: list[TargetWeight] = compressible_weights(model, include, exclude, types)
        if not self.targets:
            raise ConfigError("pruning: no Linear/Conv/Embedding weights match the include/exclude patterns")
        self.masks: dict[str, torch.Tensor] = {
            t.name: torch.ones(t.weight.shape, dtype=torch.bool, device=t.weight.device) for t in self.targets}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for t in self.targets:
            if t.weight.requires_grad:
                self._handles.append(t.weight.register_hook(self._grad_hook(t.name)))

    def _grad_hook(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return grad * self.masks[name].to(grad.dtype)

        return hook

    @torch.no_grad()
    def prune(self, sparsity: Sparsity) -> dict[str, float]:
        """Zero the smallest-magnitude weights so each layer (or all, globally) reaches `sparsity`; returns the
        achieved sparsity per weight. Already-pruned weights count towards the target and stay pruned."""
        if self.scope == "global":
            if isinstance(sparsity, Mapping):
                raise ConfigError("global pruning takes one sparsity, not a per-layer mapping")
            self._prune_global(float(sparsity))
        else:
            for t in self.targets:
                s = sparsity_for(t.name, sparsity)
                _check_fraction(s, f"sparsity of {t.name}")
                self._prune_layer(t, s)
        self.apply_masks()
        return self.sparsity()

    def _scores(self, t: TargetWeight) -> torch.Tensor:
        # pruned entries rank below every survivor, so they stay pruned
        return torch.where(self.masks[t.name], t.weight.detach().abs().float(), torch.full_like(
            t.weight, -1.0, dtype=torch.float32))

    def _prune_layer(self, t: TargetWeight, s: float) -> None:
        n = t.weight.numel()
        keep = min(n - round(s * n), int(self.masks[t.name].sum()))
        self.masks[t.name] = keep_largest(self._scores(t), keep)

    def _prune_global(self, s: float) -> None:
        _check_fraction(s, "sparsity")
        scores = torch.cat([self._scores(t).reshape(-1) for t in self.targets])  # [Σ n]
        total = scores.numel()
        keep = min(total - round(s * total), int(sum(int(m.sum()) for m in self.masks.values())))
        kept = keep_largest(scores, keep)
        offset = 0
        for t in self.targets:
            n = t.weight.numel()
            self.masks[t.name] = kept[offset:offset + n].view(t.weight.shape)
            offset += n

    @torch.no_grad()
    def apply_masks(self) -> None:
        """W ← W ⊙ M for every target (call after an optimizer step if the optimizer had state)."""
        for t in self.targets:
            t.weight.mul_(self.masks[t.name].to(t.weight.dtype))

    def attach(self, optimizer: torch.optim.Optimizer) -> torch.utils.hooks.RemovableHandle:
        """Re-apply the masks after every `optimizer.step()`."""
        handle = optimizer.register_step_post_hook(lambda *_: self.apply_masks())
        self._handles.append(handle)
        return handle

    def sparsity(self) -> dict[str, float]:
        """Fraction of zero entries in each target weight (what is actually in the tensor, not the mask)."""
        return {t.name: float((t.weight == 0).sum()) / t.weight.numel() for t in self.targets}

    def overall_sparsity(self) -> float:
        zeros = sum(int((t.weight == 0).sum()) for t in self.targets)
        return zeros / sum(t.weight.numel() for t in self.targets)

    def remove(self) -> None:
        """Detach the gradient (and optimizer) hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


Retrain = Callable[[nn.Module, MagnitudePruner, int], None]


def iterative_prune(model: nn.Module, sparsity: Sparsity, *, steps: int = 1, schedule: str = "geometric",
                    scope: str = "layer", include: str | Sequence[str] | None = None,
                    exclude: str | Sequence[str] | None = None, retrain: Retrain | None = None,
                    progress: Callable[[int, int], None] | None = None) -> MagnitudePruner:
    """Prune `model` in place to `sparsity` over `steps` steps, calling ``retrain(model, pruner, step)`` after
    each (train there as usual; masked gradients keep pruned weights at zero). Returns the pruner with its
    hooks attached, so later fine-tuning also keeps the zeros; call ``pruner.remove()`` when done."""
    pruner = MagnitudePruner(model, include=include, exclude=exclude, scope=scope)
    if isinstance(sparsity, Mapping):
        plans = {k: sparsity_schedule(float(v), steps, schedule) for k, v in sparsity.items()}
        per_step: list[Sparsity] = [{k: plan[i] for k, plan in plans.items()} for i in range(steps)]
    else:
        per_step = list(sparsity_schedule(float(sparsity), steps, schedule))
    for step, target in enumerate(per_step):
        pruner.prune(target)
        if retrain is not None:
            retrain(model, pruner, step)
            pruner.apply_masks()
        if progress is not None:
            progress(step + 1, steps)
    return pruner
