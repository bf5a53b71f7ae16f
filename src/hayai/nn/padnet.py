"""PAD-Net: partially dynamic convolution and Mixture-of-Experts layers, and Iterative Mode Partition.

He, Ding, Dong, Liu, Yu & Tao, "PAD-Net: An Efficient Framework for Dynamic Networks", ACL 2023
(arXiv:2211.05528); official code github.com/Shwai-He/PAD-Net (`dyconv/model/layer/dyconv.py`,
`moe/transformers/models/layers.py`, `dyconv/pruners.py`).

A fully dynamic layer makes every weight input-dependent: dynamic convolution (DY-Conv, Chen et al. 2020)
mixes k kernels with per-example attention, an MoE layer routes each token to its own expert's weights.
PAD-Net keeps only a fraction κ of the weight positions dynamic; the others use one static tensor shared by
all inputs. With a binary mask M (1 = dynamic) and one learnable scalar φ per layer (initialised to 0):

    λ_d = 2·sigmoid(φ),   λ_s = 2 − λ_d
    W(x) = M ⊙ W_dyn(x) · λ_d + (1 − M) ⊙ W_static · λ_s

    convolution:  W_dyn(x) = Σ_i α_i(x) W_i,  α(x) = softmax(fc2(relu(fc1(avgpool(x)))) / T)   (k kernels)
    MoE:          W_e      = M ⊙ W_e · λ_d + (1 − M) ⊙ W_static · λ_s  for every expert e; a token routed
                  to experts E(x) with gates g gives y = Σ_{e ∈ E(x)} g_e (W_e x + b_e)

So M = 1 everywhere is the fully dynamic layer (scaled by λ_d, which is 1 at φ = 0) and M = 0 the static one.
The mask is shared by the k kernels / E experts: one entry per scalar weight position. Biases stay dynamic
(mixed by α, or per expert), as in the official code.

Iterative Mode Partition (IMP) decides M before training, from the loss. The SNIP-like score of a position is
the magnitude of the loss's first-order sensitivity to its mode, accumulated over a few batches:

    s = Σ_batches |∂L/∂M|,   ∂L/∂M = ∂L/∂W ⊙ (W_dyn λ_d − W_static λ_s)   (summed over the batch, and for MoE
                                                                          over experts)

Over t = 0..T−1 the kept dynamic fraction follows κ_t = κ^((t+1)/T) (exponential; linear is
1 − (1 − κ)(t+1)/T), and one global threshold over all layers of the same target ratio keeps the κ_t·N
highest-scoring positions dynamic. A position made static stays static. Defaults from the paper: κ = 0.3 for
dynamic convolution, 0.5 for MoE.

Parameter accounting: a layer stores (1 − κ)·P static and κ·k·P dynamic weights (P = one kernel's size);
`parameter_counts` reports both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from hayai.errors import ConfigError


class _PartiallyDynamic(nn.Module):
    """What both layers share: the mask buffer, the scale φ and the static/dynamic mixing."""

    default_dynamic_ratio: float = 1.0
    dynamic_mask: torch.Tensor
    num_dynamic: int  # k kernels or E experts

    def lambdas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(λ_d, λ_s) with λ_d = 2·sigmoid(φ) and λ_s = 2 − λ_d."""
        lam_d = 2 * torch.sigmoid(self.phi)
        return lam_d, 2 - lam_d

    def mix(self, dynamic: torch.Tensor, static: torch.Tensor) -> torch.Tensor:
        """M ⊙ dynamic · λ_d + (1 − M) ⊙ static · λ_s (broadcasting over leading batch/expert dims)."""
        lam_d, lam_s = self.lambdas()
        return self.dynamic_mask * dynamic * lam_d + (1 - self.dynamic_mask) * static * lam_s

    @property
    def dynamic_ratio(self) -> float:
        """Fraction of weight positions in dynamic mode."""
        return float(self.dynamic_mask.mean())

    def set_mask(self, mask: torch.Tensor) -> None:
        if mask.shape != self.dynamic_mask.shape:
            raise ConfigError(f"PAD-Net mask of shape {tuple(mask.shape)} for a layer whose mask is "
                              f"{tuple(self.dynamic_mask.shape)}")
        self.dynamic_mask.copy_(mask.to(self.dynamic_mask.dtype))


class KernelAttention(nn.Module):
    """DY-Conv's kernel attention: α = softmax(fc2(relu(fc1(avgpool(x)))) / T), [B, C, H, W] -> [B, k]."""

    def __init__(self, in_channels: int, num_kernels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, in_channels // reduction)
        self.fc1 = nn.Linear(in_channels, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, num_kernels)
        nn.init.normal_(self.fc1.weight, 0, math.sqrt(2.0 / hidden))
        nn.init.normal_(self.fc2.weight, 0, math.sqrt(2.0 / num_kernels))
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor, temperature: float) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))  # [B, C]
        return torch.softmax(self.fc2(F.relu(self.fc1(pooled))) / temperature, dim=-1)  # [B, k]


class PartiallyDynamicConv2d(_PartiallyDynamic):
    """A Conv2d whose weight mixes k input-dependent kernels (DY-Conv) on the positions the mask marks dynamic
    and one static kernel elsewhere. The mask starts all ones (fully dynamic); `iterative_mode_partition` or
    `set_mask` makes part of it static. `temperature` is the attention softmax temperature (DY-Conv anneals it
    from 30 to 1 over the first epochs; see `set_temperature`)."""

    default_dynamic_ratio = 0.3

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, ...],
                 stride: int | tuple[int, ...] = 1, padding: int | tuple[int, ...] = 0,
                 dilation: int | tuple[int, ...] = 1, groups: int = 1, bias: bool = True,
                 num_kernels: int = 4, reduction: int = 16, temperature: float = 30.0):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ConfigError(f"channels {in_channels}->{out_channels} are not divisible by groups={groups}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.num_dynamic = num_kernels
        self.temperature = temperature
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        std = math.sqrt(2.0 / (self.kernel_size[0] * self.kernel_size[1] * out_channels))  # He, fan-out
        self.attention = KernelAttention(in_channels, num_kernels, reduction)
        self.kernels = nn.Parameter(torch.randn(num_kernels, *shape) * std)  # [k, out, in/g, kh, kw]
        self.static_weight = nn.Parameter(torch.randn(*shape) * std)  # [out, in/g, kh, kw]
        self.kernel_bias = nn.Parameter(torch.zeros(num_kernels, out_channels)) if bias else None  # [k, out]
        self.phi = nn.Parameter(torch.zeros(1))
        self.register_buffer("dynamic_mask", torch.ones(shape))  # [out, in/g, kh, kw], 1 = dynamic

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, num_kernels: int = 4, reduction: int = 16, temperature: float = 30.0,
                  noise: float = 0.0) -> PartiallyDynamicConv2d:
        """A drop-in replacement for a (trained) Conv2d: every kernel and the static kernel start at its weight
        (plus optional relative noise so the kernels can diverge), so the layer starts computing the same
        function whatever the attention and the mask."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ConfigError("PartiallyDynamicConv2d.from_conv supports numeric zero padding only")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, num_kernels, reduction, temperature)
        layer = layer.to(conv.weight)  # same device and dtype
        with torch.no_grad():
            w = conv.weight.detach()
            layer.static_weight.copy_(w)
            layer.kernels.copy_(w.expand_as(layer.kernels) * (1 + noise * torch.randn_like(layer.kernels)))
            if conv.bias is not None:
                assert layer.kernel_bias is not None
                layer.kernel_bias.copy_(conv.bias.detach().expand_as(layer.kernel_bias))
        return layer

    def kernel_attention(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, self.temperature)  # [B, k]

    def weight_for(self, alphas: torch.Tensor) -> torch.Tensor:
        """Per-example kernels [B, out, in/g, kh, kw] for attention weights α [B, k]."""
        dynamic = torch.einsum("bk,koihw->boihw", alphas, self.kernels)  # [B, out, in/g, kh, kw]
        return self.mix(dynamic, self.static_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        alphas = self.kernel_attention(x)  # [B, k]
        weight = self.weight_for(alphas).reshape(b * self.out_channels, *self.static_weight.shape[1:])
        bias = (alphas @ self.kernel_bias).reshape(-1) if self.kernel_bias is not None else None  # [B·out]
        # one grouped convolution runs every example with its own kernel: [1, B·C, H, W] -> [1, B·out, H', W']
        out = F.conv2d(x.reshape(1, b * c, h, w), weight, bias, self.stride, self.padding, self.dilation,
                       groups=b * self.groups)
        return out.view(b, self.out_channels, *out.shape[-2:])

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, kernels={self.num_dynamic}, dynamic_ratio={self.dynamic_ratio:.3f}")


class PartiallyDynamicMoE(_PartiallyDynamic):
    """A linear layer with E experts and top-k routing per token, each expert's weight partially dynamic:
    W_e = M ⊙ W_e · λ_d + (1 − M) ⊙ W_static · λ_s. Input [..., in] -> output [..., out].

    After each forward `aux_loss` holds the Switch-Transformer load-balancing loss E · Σ_e f_e · P_e
    (Fedus et al. 2021; f_e: fraction of tokens whose first choice is e, P_e: mean router probability of e);
    add ``coef · aux_loss`` (e.g. 0.01) to the training loss to keep the experts used.
    """

    default_dynamic_ratio = 0.5

    def __init__(self, in_features: int, out_features: int, num_experts: int = 4, top_k: int = 1,
                 bias: bool = True):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ConfigError(f"top_k must be in 1..{num_experts}, got {top_k}")
        self.in_features, self.out_features, self.top_k = in_features, out_features, top_k
        self.num_dynamic = num_experts
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default range
        self.router = nn.Linear(in_features, num_experts, bias=False)
        self.expert_weight = nn.Parameter(torch.empty(num_experts, out_features, in_features).uniform_(-bound, bound))
        self.expert_bias = (nn.Parameter(torch.empty(num_experts, out_features).uniform_(-bound, bound))
                            if bias else None)
        self.static_weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.phi = nn.Parameter(torch.zeros(1))
        self.register_buffer("dynamic_mask", torch.ones(out_features, in_features))  # 1 = dynamic
        self.aux_loss: torch.Tensor = torch.zeros(())

    def expert_weights(self) -> torch.Tensor:
        """The effective weights of all experts [E, out, in]."""
        return self.mix(self.expert_weight, self.static_weight)

    def route(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, in] -> (gates [N, top_k], experts [N, top_k], router probabilities [N, E])."""
        probs = torch.softmax(self.router(x2d), dim=-1)  # [N, E]
        top_p, top_e = probs.topk(self.top_k, dim=-1)  # [N, top_k]
        return top_p / top_p.sum(-1, keepdim=True), top_e, probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)  # [N, in]
        gates, experts, probs = self.route(x2d)
        weights = self.expert_weights()  # [E, out, in]
        out = x2d.new_zeros(x2d.shape[0], self.out_features)  # [N, out]
        for e in range(self.num_dynamic):
            token, slot = torch.nonzero(experts == e, as_tuple=True)  # tokens routed to e, and in which slot
            if token.numel() == 0:
                continue
            bias = self.expert_bias[e] if self.expert_bias is not None else None
            y = F.linear(x2d[token], weights[e], bias)  # [n_e, out]
            out = out.index_add(0, token, y * gates[token, slot, None])
        first_choice = F.one_hot(experts[:, 0], self.num_dynamic).float().mean(0)  # f_e [E]
        self.aux_loss = self.num_dynamic * (first_choice * probs.mean(0)).sum()
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, experts={self.num_dynamic}, top_k={self.top_k}, "
                f"dynamic_ratio={self.dynamic_ratio:.3f}")


PAD_LAYERS = (PartiallyDynamicConv2d, PartiallyDynamicMoE)


def pad_layers(model: nn.Module) -> list[tuple[str, _PartiallyDynamic]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _PartiallyDynamic)]


def set_temperature(model: nn.Module, temperature: float) -> None:
    """Set the kernel-attention temperature of every PartiallyDynamicConv2d in `model`."""
    for _, layer in pad_layers(model):
        if isinstance(layer, PartiallyDynamicConv2d):
            layer.temperature = temperature


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the load-balancing losses of every PartiallyDynamicMoE after the last forward."""
    losses = [m.aux_loss for _, m in pad_layers(model) if isinstance(m, PartiallyDynamicMoE)]
    return torch.stack(losses).sum() if losses else torch.zeros(())


# ---- Iterative Mode Partition ----------------------------------------------------------------------------------
def ratio_schedule(target: float, iterations: int, kind: str = "exponential") -> list[float]:
    """Kept dynamic fraction after each IMP iteration: κ^((t+1)/T) or 1 − (1 − κ)(t+1)/T."""
    if not 0.0 <= target <= 1.0:
        raise ConfigError(f"dynamic ratio must be in [0, 1], got {target}")
    if iterations < 1:
        raise ConfigError(f"mode-partition iterations must be >= 1, got {iterations}")
    if kind == "exponential":
        return [target ** ((t + 1) / iterations) for t in range(iterations)]
    if kind == "linear":
        return [1 - (1 - target) * (t + 1) / iterations for t in range(iterations)]
    raise ConfigError(f"mode-partition schedule {kind!r}: expected 'exponential' or 'linear'")


def mode_scores(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """SNIP-like scores Σ_batches |∂L/∂M| for every PAD-Net layer's mask (parameters' .grad untouched)."""
    layers = pad_layers(model)
    if not layers:
        raise ConfigError("iterative mode partition: the model has no PartiallyDynamicConv2d/MoE layers")
    scores = {name: torch.zeros_like(layer.dynamic_mask) for name, layer in layers}
    masks = [layer.dynamic_mask for _, layer in layers]
    try:
        for mask in masks:
            mask.requires_grad_(True)
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(model, batch), masks, allow_unused=True)
            for (name, _), g in zip(layers, grads, strict=True):
                if g is not None:
                    scores[name] += g.detach().abs()
    finally:
        for mask in masks:
            mask.requires_grad_(False)
    return scores


@dataclass
class PartitionReport:
    schedule: dict[float, list[float]]  # per target ratio κ: the κ_t applied at each iteration
    layers: dict[str, float]  # final dynamic ratio per layer


@torch.no_grad()
def _keep_top(layers: list[tuple[str, _PartiallyDynamic]], scores: dict[str, torch.Tensor], ratio: float) -> None:
    flat = torch.cat([torch.where(m.dynamic_mask > 0, scores[n], torch.full_like(scores[n], -1.0)).reshape(-1)
                      for n, m in layers])  # static positions rank last and stay static
    keep = round(ratio * flat.numel())
    chosen = torch.zeros_like(flat)
    if keep > 0:
        chosen[torch.topk(flat, keep).indices] = 1.0
    offset = 0
    for _, m in layers:
        n = m.dynamic_mask.numel()
        m.set_mask(chosen[offset:offset + n].view_as(m.dynamic_mask))
        offset += n


def iterative_mode_partition(model: nn.Module, batches: Iterable[Any],
                             loss_fn: Callable[[nn.Module, Any], torch.Tensor], *,
                             dynamic_ratio: float | None = None, iterations: int = 1,
                             schedule: str = "exponential",
                             progress: Callable[[int, int], None] | None = None) -> PartitionReport:
    """Set the masks of all PAD-Net layers in `model` by IMP (in place) and return the ratios reached.

    batches: a few training batches (re-read every iteration; a list is fine); loss_fn(model, batch) -> loss.
    dynamic_ratio: the target κ for every layer, or None for each layer type's default (0.3 conv, 0.5 MoE);
    layers with the same target share one global threshold.
    """
    batches = list(batches)
    layers = pad_layers(model)
    groups: dict[float, list[tuple[str, _PartiallyDynamic]]] = {}
    for name, layer in layers:
        target = layer.default_dynamic_ratio if dynamic_ratio is None else dynamic_ratio
        groups.setdefault(float(target), []).append((name, layer))
    plans = {target: ratio_schedule(target, iterations, schedule) for target in groups}
    for t in range(iterations):
        scores = mode_scores(model, batches, loss_fn)
        for target, members in groups.items():
            _keep_top(members, scores, plans[target][t])
        if progress is not None:
            progress(t + 1, iterations)
    return PartitionReport(plans, {name: layer.dynamic_ratio for name, layer in layers})


@dataclass
class ParameterCounts:
    """Parameters of a model with PAD-Net layers, counted the way the paper does."""

    dynamic: int  # Σ k·|M = 1| over PAD layers (each dynamic position has one weight per kernel/expert)
    static: int  # Σ |M = 0|
    other: int  # everything else (attention/router, biases, φ, non-PAD layers)
    fully_dynamic: int  # what the PAD layers' weights would be if fully dynamic: Σ k·|M|

    @property
    def total(self) -> int:
        return self.dynamic + self.static + self.other


def parameter_counts(model: nn.Module) -> ParameterCounts:
    dynamic = static = full = 0
    mixed: set[int] = set()
    for _, layer in pad_layers(model):
        dyn_positions = int(layer.dynamic_mask.sum())
        dynamic += layer.num_dynamic * dyn_positions
        static += layer.dynamic_mask.numel() - dyn_positions
        full += layer.num_dynamic * layer.dynamic_mask.numel()
        big = layer.kernels if isinstance(layer, PartiallyDynamicConv2d) else layer.expert_weight
        mixed.update({id(big), id(layer.static_weight)})
    other = sum(p.numel() for p in model.parameters() if id(p) not in mixed)
    return ParameterCounts(dynamic, static, other, full)
