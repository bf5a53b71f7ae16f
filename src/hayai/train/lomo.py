"""LOMO and AdaLomo: full-parameter fine-tuning with the update fused into backward.

LOMO (Lv et al., "Full Parameter Fine-tuning for Large Language Models with Limited Resources", ACL 2024,
arXiv:2306.09782): plain SGD, but each parameter is updated as soon as its gradient is ready during
backpropagation and the gradient is freed at once, so at most one parameter's gradient is alive instead of
all of them, and there is no optimizer state:

    p ← p · (1 − lr · λ) − lr · c · g                 (λ: weight decay, c: clipping coefficient)

AdaLomo (Lv et al., "AdaLomo: Low-memory Optimization with Adaptive Learning Rate", ACL Findings 2024,
arXiv:2310.10195) adds Adafactor's factored second moment (Shazeer & Stern 2018, arXiv:1804.04235), grouped
update normalisation and a parameter-scaled step size. At step t (from 1), for a matrix G [n, m]:

    β₂ₜ = 1 − t^(−0.8)
    R ← β₂ₜ R + (1 − β₂ₜ) rowmean(G² + ε₁)              R [n]   (vectors: v ← β₂ₜ v + (1 − β₂ₜ)(g² + ε₁))
    C ← β₂ₜ C + (1 − β₂ₜ) colmean(G² + ε₁)              C [m]
    U = G / sqrt(V̂),   V̂ = (R / mean(R)) Cᵀ             (rank-1 estimate of E[G²])
    U ← U / max(1, RMS(U) / d)                          (update clipping, d = 1)
    p ← p · (1 − lrₑ λ) − lrₑ U,   lrₑ = lr · max(ε₂, RMS(p))

with ε₁ = 1e-30, ε₂ = 1e-3 (the authors' `lomo_optim` package, which this follows).

Mechanics: a `register_post_accumulate_grad_hook` on each trainable parameter runs once its gradient is fully
accumulated (after every use of a tied weight has contributed), updates it in fp32 and sets `.grad = None`
(torchtune's optimizer-in-backward uses the same hook; LOMO's original scans all parameters from tensor hooks
and needs an extra call for the last one). Optional clipping of the global gradient norm needs the norm before
any parameter changes, so it costs a first backward pass that only accumulates ‖g‖² (graph retained), then the
updating pass (LOMO §3.3). Clipping by value needs one pass. Gradient accumulation is impossible by design:
the gradient is gone before the next micro-batch. fp16 loss scaling is not implemented (train in bf16 or fp32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hayai.errors import ConfigError
from hayai.train.optim import UpdateRule


class FusedUpdate(UpdateRule):
    """Base of LOMO-style rules: hooks call `update(name, param, grad_fp32)` during backward."""

    supports_accumulation = False

    def __init__(self, named_parameters: Sequence[tuple[str, nn.Parameter]], *, weight_decay: float = 0.0,
                 max_grad_norm: float | None = None, clip_grad_value: float | None = None) -> None:
        super().__init__(named_parameters)
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ConfigError(f"max_grad_norm must be positive (or None), got {max_grad_norm}")
        if clip_grad_value is not None and clip_grad_value <= 0:
            raise ConfigError(f"clip_grad_value must be positive (or None), got {clip_grad_value}")
        self.weight_decay = weight_decay
        self.max_grad_norm = max_grad_norm
        self.clip_grad_value = clip_grad_value
        self.lr = 0.0
        self.step_num = 0
        self._gathering = False
        self._norm_sq: torch.Tensor | None = None
        self._clip_coef = 1.0
        self._last_norm: float | None = None
        self._backward_calls = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(name))
                         for name, p in self.named_parameters]

    def _hook(self, name: str):
        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            param.grad = None  # free it now: the point of LOMO
            if grad is None:
                return
            with torch.no_grad():
                if self._gathering:
                    sq = grad.float().pow(2).sum()
                    self._norm_sq = sq if self._norm_sq is None else self._norm_sq + sq
                    return
                g = grad.float()  # [same shape as param]
                if self.clip_grad_value is not None:
                    g.clamp_(-self.clip_grad_value, self.clip_grad_value)
                if self._clip_coef != 1.0:
                    g.mul_(self._clip_coef)
                self.update(name, param, g)

        return hook

    def update(self, name: str, param: nn.Parameter, grad: torch.Tensor) -> None:
        raise NotImplementedError

    @staticmethod
    def write(param: nn.Parameter, value: torch.Tensor) -> None:
        """Store an fp32 result into the parameter (bypassing autograd's version counter, as the graph that
        saved the parameter has already used it)."""
        if value.data_ptr() != param.data_ptr() or value.dtype != param.dtype:
            param.data.copy_(value)

    def begin(self, lr: float) -> None:
        self.lr = lr
        self.step_num += 1
        self._backward_calls = 0
        self._last_norm = None

    def backward(self, loss: torch.Tensor) -> None:
        self._backward_calls += 1
        if self._backward_calls > 1:
            raise ConfigError(f"{type(self).__name__} updates inside backward, so it cannot accumulate gradients "
                              "over micro-batches; use gradient accumulation 1")
        self._clip_coef = 1.0
        if self.max_grad_norm is not None:
            self._gathering, self._norm_sq = True, None
            try:
                loss.backward(retain_graph=True)  # pass 1: norms only
            finally:
                self._gathering = False
            total = float(self._norm_sq.sqrt()) if self._norm_sq is not None else 0.0
            self._last_norm = total
            self._clip_coef = min(1.0, self.max_grad_norm / (total + 1e-6))
        loss.backward()  # pass 2 (or the only pass): update as gradients arrive

    def finish(self) -> float | None:
        return self._last_norm

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        return {"step_num": self.step_num}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_num = int(state["step_num"])


class Lomo(FusedUpdate):
    """LOMO: SGD fused into backward, p ← p(1 − lr·λ) − lr·g (see the module docstring)."""

    def update(self, name: str, param: nn.Parameter, grad: torch.Tensor) -> None:
        p32 = param.data.float()  # the parameter itself when it is fp32
        if self.weight_decay:
            p32.mul_(1.0 - self.lr * self.weight_decay)
        p32.add_(grad, alpha=-self.lr)
        self.write(param, p32)


class AdaLomo(FusedUpdate):
    """AdaLomo: factored second moment, update clipping and relative step size (see the module docstring)."""

    def __init__(self, named_parameters: Sequence[tuple[str, nn.Parameter]], *, weight_decay: float = 0.0,
                 max_grad_norm: float | None = None, clip_grad_value: float | None = None,
                 eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = -0.8) -> None:
        super().__init__(named_parameters, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                         clip_grad_value=clip_grad_value)
        self.eps = eps
        self.clip_threshold = clip_threshold
        self.decay_rate = decay_rate
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        for name, p in self.named_parameters:
            zeros = lambda n, p=p: torch.zeros(n, dtype=torch.float32, device=p.device)  # noqa: E731
            if p.dim() >= 2:
                self.state[name] = {"row": zeros(p.shape[:-1]), "col": zeros(p.shape[:-2] + p.shape[-1:])}
            else:
                self.state[name] = {"v": zeros(p.shape)}

    @staticmethod
    def _rms(t: torch.Tensor) -> torch.Tensor:
        return t.norm(2) / math.sqrt(t.numel())

    def update(self, name: str, param: nn.Parameter, grad: torch.Tensor) -> None:
        state = self.state[name]
        beta2 = 1.0 - math.pow(self.step_num, self.decay_rate)
        sq = grad.pow(2).add_(self.eps[0])  # G² + ε₁
        if "row" in state:
            row, col = state["row"], state["col"]
            row.mul_(beta2).add_(sq.mean(dim=-1), alpha=1.0 - beta2)  # [..., n]
            col.mul_(beta2).add_(sq.mean(dim=-2), alpha=1.0 - beta2)  # [..., m]
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)  # [..., n, 1]
            c_factor = col.unsqueeze(-2).rsqrt()  # [..., 1, m]
            update = (r_factor * c_factor).mul_(grad)
        else:
            v = state["v"]
            v.mul_(beta2).add_(sq, alpha=1.0 - beta2)
            update = v.rsqrt().mul_(grad)
        del sq
        update.div_((self._rms(update) / self.clip_threshold).clamp_(min=1.0))
        p32 = param.data.float()
        lr = self.lr * max(self.eps[1], float(self._rms(p32)))
        if self.weight_decay:
            p32.mul_(1.0 - lr * self.weight_decay)
        p32.add_(update, alpha=-lr)
        self.write(param, p32)

    def state_dict(self) -> dict[str, Any]:
        return {"step_num": self.step_num,
                "state": {name: {k: v.clone() for k, v in s.items()} for name, s in self.state.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for name, tensors in state["state"].items():
            if name not in self.state:
                raise ConfigError(f"AdaLomo state names parameter {name!r}, which this model does not train")
            for key, value in tensors.items():
                self.state[name][key].copy_(value)

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values())
