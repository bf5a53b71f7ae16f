"""How gradients become parameter updates: the `UpdateRule` interface and its standard implementation.

An update rule sees one optimizer step as

    begin(lr)                          set the learning rate for this step
    backward(loss_k)  for k = 1..K     one call per micro-batch; loss_k = (summed token loss of micro-batch k) / N
    finish() -> grad norm | None       apply the update

where N is the number of loss tokens of all K micro-batches together, so the accumulated gradient is exactly
the gradient of the mean token loss of one large batch of K micro-batches (torchtune's token-normalised
accumulation; the HF Trainer bug fixed in transformers PR #34191 came from averaging per-micro-batch means).

`OptimizerUpdate` wraps a torch optimizer (AdamW by default: Loshchilov & Hutter, ICLR 2019,
arXiv:1711.05101): gradients accumulate in `.grad`, `finish` clips the global norm and steps. `hayai.train.lomo`
provides rules that update inside backward instead (LOMO, AdaLomo).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hayai.errors import ConfigError


class UpdateRule(ABC):
    """See the module docstring. `named_parameters` are the trainable parameters, by canonical name."""

    supports_accumulation: bool = True

    def __init__(self, named_parameters: Sequence[tuple[str, nn.Parameter]]) -> None:
        if not named_parameters:
            raise ConfigError("nothing to train: the model has no parameter with requires_grad=True")
        self.named_parameters = list(named_parameters)

    @abstractmethod
    def begin(self, lr: float) -> None: ...

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def finish(self) -> float | None: ...

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def state_bytes(self) -> int:
        """Bytes of optimizer state (for memory reports)."""
        return 0


class OptimizerUpdate(UpdateRule):
    """Accumulate gradients in `.grad`, then clip the global L2 norm to `max_grad_norm` (if set) and step.

    `optimizer` defaults to AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay) over the given parameters.
    """

    def __init__(self, named_parameters: Sequence[tuple[str, nn.Parameter]], *, weight_decay: float = 0.0,
                 max_grad_norm: float | None = 1.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, optimizer: torch.optim.Optimizer | None = None) -> None:
        super().__init__(named_parameters)
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ConfigError(f"max_grad_norm must be positive (or None), got {max_grad_norm}")
        self.max_grad_norm = max_grad_norm
        params = [p for _, p in self.named_parameters]
        self.optimizer = optimizer or torch.optim.AdamW(params, lr=1e-3, betas=betas, eps=eps,
                                                        weight_decay=weight_decay, foreach=True)

    def begin(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def finish(self) -> float | None:
        params = [p for _, p in self.named_parameters if p.grad is not None]
        if not params:
            return None
        limit = self.max_grad_norm if self.max_grad_norm is not None else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(params, limit, foreach=True))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))
