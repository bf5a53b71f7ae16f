"""PAD-Net layers against per-example brute force; IMP scores against finite differences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hayai.nn.padnet import (
    PartiallyDynamicConv2d,
    PartiallyDynamicMoE,
    iterative_mode_partition,
    mode_scores,
    moe_aux_loss,
    parameter_counts,
    ratio_schedule,
)


def conv_layer(**kw) -> PartiallyDynamicConv2d:
    torch.manual_seed(0)
    layer = PartiallyDynamicConv2d(6, 8, 3, padding=1, num_kernels=3, temperature=2.0, **kw).double()
    with torch.no_grad():
        layer.phi.fill_(0.7)  # λ_d ≠ 1, so the scales are exercised
        if layer.kernel_bias is not None:
            layer.kernel_bias.normal_()
    return layer


def brute_force_conv(layer: PartiallyDynamicConv2d, x: torch.Tensor) -> torch.Tensor:
    """One example at a time: α from the attention, W = M·Σα_iW_i·λd + (1−M)·W_s·λs, a plain conv."""
    lam_d = 2 * torch.sigmoid(layer.phi)
    lam_s = 2 - lam_d
    outs = []
    for xi in x:
        pooled = xi.mean(dim=(1, 2))
        alpha = torch.softmax(layer.attention.fc2(F.relu(layer.attention.fc1(pooled))) / layer.temperature, -1)
        w_dyn = sum(a * k for a, k in zip(alpha, layer.kernels, strict=True))
        m = layer.dynamic_mask
        w = m * w_dyn * lam_d + (1 - m) * layer.static_weight * lam_s
        b = alpha @ layer.kernel_bias if layer.kernel_bias is not None else None
        outs.append(F.conv2d(xi[None], w, b, layer.stride, layer.padding, layer.dilation, layer.groups))
    return torch.cat(outs)


@pytest.mark.parametrize("mask_kind", ["ones", "zeros", "random"])
def test_conv_matches_per_example_brute_force(mask_kind):
    layer = conv_layer()
    if mask_kind != "ones":
        m = torch.zeros_like(layer.dynamic_mask) if mask_kind == "zeros" else \
            (torch.rand(layer.dynamic_mask.shape, generator=torch.Generator().manual_seed(1)) < 0.3).double()
        layer.set_mask(m)
    x = torch.randn(5, 6, 7, 9, dtype=torch.float64)
    torch.testing.assert_close(layer(x), brute_force_conv(layer, x))


def test_all_ones_is_fully_dynamic_and_all_zeros_is_static():
    layer = conv_layer(bias=False)
    x = torch.randn(4, 6, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        layer.phi.zero_()  # λ_d = λ_s = 1
    # fully dynamic (DY-Conv): Σ α_i W_i, nothing static
    alpha = layer.kernel_attention(x)
    dy = torch.cat([F.conv2d(x[i:i + 1], torch.einsum("k,koihw->oihw", alpha[i], layer.kernels), padding=1)
                    for i in range(4)])
    torch.testing.assert_close(layer(x), dy)
    layer.set_mask(torch.zeros_like(layer.dynamic_mask))
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.static_weight, padding=1))


def test_grouped_strided_conv_and_from_conv():
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).double()
    layer = PartiallyDynamicConv2d.from_conv(conv, num_kernels=2, reduction=2)
    x = torch.randn(3, 4, 9, 9, dtype=torch.float64)
    layer.set_mask((torch.rand(layer.dynamic_mask.shape) < 0.5).double())
    torch.testing.assert_close(layer(x), conv(x))  # all kernels equal the conv's: same function at init
    with torch.no_grad():
        layer.kernels.normal_()
    torch.testing.assert_close(layer(x), brute_force_conv(layer, x))


def moe_layer(top_k=1) -> PartiallyDynamicMoE:
    torch.manual_seed(3)
    layer = PartiallyDynamicMoE(10, 7, num_experts=4, top_k=top_k).double()
    with torch.no_grad():
        layer.phi.fill_(-0.4)
        layer.router.weight.mul_(5)
    return layer


def brute_force_moe(layer: PartiallyDynamicMoE, x: torch.Tensor) -> torch.Tensor:
    lam_d = 2 * torch.sigmoid(layer.phi)
    m = layer.dynamic_mask
    out = []
    for token in x.reshape(-1, x.shape[-1]):
        probs = torch.softmax(layer.router.weight @ token, -1)
        top_p, top_e = probs.topk(layer.top_k)
        gates = top_p / top_p.sum()
        y = 0
        for g, e in zip(gates, top_e.tolist(), strict=True):
            w = m * layer.expert_weight[e] * lam_d + (1 - m) * layer.static_weight * (2 - lam_d)
            y = y + g * (w @ token + layer.expert_bias[e])
        out.append(y)
    return torch.stack(out).view(*x.shape[:-1], -1)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("mask_kind", ["ones", "zeros", "random"])
def test_moe_matches_per_token_brute_force(top_k, mask_kind):
    layer = moe_layer(top_k)
    if mask_kind == "zeros":
        layer.set_mask(torch.zeros_like(layer.dynamic_mask))
    elif mask_kind == "random":
        layer.set_mask((torch.rand(layer.dynamic_mask.shape) < 0.5).double())
    x = torch.randn(3, 5, 10, dtype=torch.float64)
    out = layer(x)
    torch.testing.assert_close(out, brute_force_moe(layer, x))
    assert len(set(layer.route(x.reshape(-1, 10))[1][:, 0].tolist())) > 1  # the test routes to several experts
    assert float(moe_aux_loss(nn.Sequential(layer)).detach()) > 0


def test_moe_all_zeros_is_one_static_linear():
    layer = moe_layer(top_k=2)
    layer.set_mask(torch.zeros_like(layer.dynamic_mask))
    with torch.no_grad():
        layer.phi.zero_()
        layer.expert_bias.copy_(layer.expert_bias[0].expand_as(layer.expert_bias))
    x = torch.randn(6, 10, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.static_weight, layer.expert_bias[0]))


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.conv = PartiallyDynamicConv2d(3, 4, 3, padding=1, num_kernels=2, reduction=1, temperature=1.0)
        self.moe = PartiallyDynamicMoE(4, 5, num_experts=3)

    def forward(self, x):
        return self.moe(self.conv(x).mean(dim=(2, 3)))


def batches(n=3):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def test_mode_scores_are_loss_sensitivities():
    model = TinyNet().double()
    data = [(x.double(), y) for x, y in batches(2)]
    with torch.no_grad():
        model.conv.dynamic_mask.copy_((torch.rand(model.conv.dynamic_mask.shape) < 0.6).double())
    scores = mode_scores(model, data, loss_fn)
    assert model.conv.dynamic_mask.grad is None and not model.conv.dynamic_mask.requires_grad
    eps = 1e-6
    for name, layer in [("conv", model.conv), ("moe", model.moe)]:
        flat = layer.dynamic_mask.view(-1)
        for j in [0, 7, flat.numel() - 1]:
            total = 0.0
            for batch in data:
                with torch.no_grad():
                    flat[j] += eps
                    up = float(loss_fn(model, batch))
                    flat[j] -= 2 * eps
                    down = float(loss_fn(model, batch))
                    flat[j] += eps
                total += abs((up - down) / (2 * eps))
            assert float(scores[name].view(-1)[j]) == pytest.approx(total, rel=1e-4, abs=1e-9)
    assert all(p.grad is None for p in model.parameters())  # scoring leaves parameter gradients alone


def test_imp_keeps_the_highest_scores_at_each_types_default_ratio():
    model = TinyNet()
    data = batches()
    scores = mode_scores(model, data, loss_fn)
    report = iterative_mode_partition(model, data, loss_fn)
    assert report.schedule == {0.3: [0.3], 0.5: [0.5]}
    for name, layer, ratio in [("conv", model.conv, 0.3), ("moe", model.moe, 0.5)]:
        n = layer.dynamic_mask.numel()
        assert int(layer.dynamic_mask.sum()) == round(ratio * n)  # alone in its group: exactly κ·N
        kept = scores[name][layer.dynamic_mask.bool()]
        dropped = scores[name][~layer.dynamic_mask.bool()]
        assert float(kept.min()) >= float(dropped.max())


def test_iterative_schedule_and_static_positions_stay_static():
    model = TinyNet()
    layers = [model.conv, model.moe]
    total = sum(m.dynamic_mask.numel() for m in layers)
    masks = [torch.cat([m.dynamic_mask.flatten() for m in layers])]

    def after_iteration(done, iterations):
        masks.append(torch.cat([m.dynamic_mask.flatten() for m in layers]))

    report = iterative_mode_partition(model, batches(), loss_fn, dynamic_ratio=0.2, iterations=3,
                                      progress=after_iteration)
    assert report.schedule == {0.2: pytest.approx([0.2 ** (1 / 3), 0.2 ** (2 / 3), 0.2])}
    for before, after, ratio in zip(masks[:-1], masks[1:], report.schedule[0.2], strict=True):
        assert int(after.sum()) == round(ratio * total)  # one global threshold across both layers
        assert torch.all(after <= before)  # nothing static becomes dynamic again
    assert ratio_schedule(0.5, 2, "linear") == pytest.approx([0.75, 0.5])
    assert set(report.layers) == {"conv", "moe"}


def test_parameter_counts():
    model = TinyNet()
    full = parameter_counts(model)
    assert full.static == 0
    assert full.dynamic == full.fully_dynamic == 2 * 4 * 3 * 9 + 3 * 5 * 4
    iterative_mode_partition(model, batches(), loss_fn)
    part = parameter_counts(model)
    conv_dyn = int(model.conv.dynamic_mask.sum())
    moe_dyn = int(model.moe.dynamic_mask.sum())
    assert part.dynamic == 2 * conv_dyn + 3 * moe_dyn
    assert part.static == (4 * 3 * 9 - conv_dyn) + (5 * 4 - moe_dyn)
    assert part.total < full.total and part.other == full.other
