"""int4 group-wise linear: error bound, the tinygemm kernel conventions, kernel vs reference, layouts.

Tolerances: fp32 activations (reference path) equal ``F.linear(x, Ŵ)`` to 1e-5 relative; the kernel forced
in fp32 equals it to 1e-5 (this pins the ``(q − 8) · scale + zero`` convention and the scales layout);
bf16 activations through the kernel are within 1e-2 relative (Frobenius) of the bf16 reference.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hayai.errors import ConfigError
from hayai.quant import kernels
from hayai.quant.int4 import Int4Linear, dequantize_int4_groups, quantize_int4_groups

needs_cpu_kernel = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
                                      reason="this torch build has no CPU int4 kernel")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make_linear(in_features: int, out_features: int, bias: bool = True, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_dequantized_weight_within_half_a_step(dtype, group_size):
    linear = make_linear(320, 24, dtype=dtype)  # 320 = 2.5 groups of 128: a ragged last group
    with torch.no_grad():
        linear.weight[2, :group_size] = 0.25  # a constant group is exact
        linear.weight[4] += 3.0  # groups far from zero: the float zero point handles them
    layer = Int4Linear.from_linear(linear, group_size=group_size)
    groups = layer.padded_in_features // group_size
    w = linear.weight.float()
    w_hat = layer.dequantize_weight(torch.float32)
    assert w_hat.shape == w.shape
    scale = layer.scales_and_zeros[..., 0].t().float().repeat_interleave(group_size, 1)[:, :320]  # [N, K]
    zero = layer.scales_and_zeros[..., 1].t().float().repeat_interleave(group_size, 1)[:, :320]
    eps = torch.finfo(dtype).eps  # rounding of the stored scale and zero
    assert torch.all((w_hat - w).abs() <= scale / 2 + eps * (zero.abs() + 8 * scale) + 1e-7)
    assert torch.equal(w_hat[2, :group_size], w[2, :group_size])
    codes = kernels.unpack_nibbles(layer.qweight).view(24, groups, group_size)
    assert codes.max() <= 15
    assert layer.scales_and_zeros.shape == (groups, 24, 2) and layer.scales_and_zeros.dtype == dtype


def test_ragged_group_is_padded_with_an_in_range_value():
    w = torch.randn(16, 40)
    codes, sz = quantize_int4_groups(w, 32, torch.float32)
    assert codes.shape == (16, 32)  # 64 padded columns / 2
    last = w[:, 32:]
    scale, zero = sz[1, :, 0], sz[1, :, 1]
    assert torch.allclose(zero - 8 * scale, last.amin(1), atol=1e-6)  # code 0 = min of the real columns
    assert torch.allclose(zero + 7 * scale, last.amax(1), atol=1e-6)  # code 15 = max
    assert torch.allclose(dequantize_int4_groups(codes, sz, 40, torch.float32), w, atol=sz[..., 0].max().item())


@pytest.mark.parametrize("shape", [(1, 96), (6, 96), (2, 3, 96), (1, 1, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_fp32_forward_equals_dequantized_matmul(shape, bias):
    layer = Int4Linear.from_linear(make_linear(96, 40, bias), group_size=32)
    x = torch.randn(*shape)
    y = layer(x)
    assert y.shape == (*shape[:-1], 40) and y.dtype == torch.float32
    assert rel_err(y, layer.forward_reference(x)) < 1e-5


@needs_cpu_kernel
@pytest.mark.parametrize("in_features, out_features, group_size",
                         [(128, 64, 32), (256, 48, 64), (384, 250, 128), (100, 40, 32), (576, 192, 64)])
@pytest.mark.parametrize("shape", [(1,), (5,), (2, 3)])
def test_bf16_kernel_matches_reference(in_features, out_features, group_size, shape):
    """Covers rows not a multiple of 16 (padded) and in_features not a multiple of the group (ragged)."""
    layer = Int4Linear.from_linear(make_linear(in_features, out_features, dtype=torch.bfloat16), group_size=group_size)
    x = torch.randn(*shape, in_features, dtype=torch.bfloat16)
    assert layer.uses_kernel(x.device, x.dtype)
    y = layer(x)
    assert layer.uses_kernel_layout, "the kernel layout should be in use"
    assert y.dtype == torch.bfloat16 and y.shape == (*shape, out_features)
    assert rel_err(y, layer.forward_reference(x)) < 1e-2


@needs_cpu_kernel
@pytest.mark.parametrize("out_features, group_size", [(64, 64), (250, 32), (576, 128)])
def test_kernel_convention_in_fp32(out_features, group_size):
    """The same codes through the kernel (forced, fp32) and through our dequantize agree to fp32 rounding."""
    layer = Int4Linear.from_linear(make_linear(256, out_features, bias=False), group_size=group_size)
    rows = -(-out_features // 16) * 16
    codes = torch.cat([layer.qweight, layer.qweight.new_full((rows - out_features, 128), 0x88)])
    sz = torch.nn.functional.pad(layer.scales_and_zeros, (0, 0, 0, rows - out_features))
    x = torch.randn(4, 256)
    y = kernels.int4_mm(x, kernels.int4_pack(codes, 256), group_size, sz)[:, :out_features]
    assert rel_err(y, x @ layer.dequantize_weight().t()) < 1e-5


def test_kernel_probe_on_cpu():
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch build has no CPU int4 kernel")
    assert kernels.int4_kernel_usable("cpu", torch.bfloat16)
    assert not kernels.int4_kernel_usable("cpu", torch.float32)  # correct but scalar: slower than F.linear


@needs_cpu_kernel
@pytest.mark.parametrize("rows, cols", [(16, 64), (48, 256), (64, 128), (208, 96), (320, 64), (1024, 32)])
def test_unpack_recovers_portable_codes(rows, cols):
    codes = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8)
    packed = kernels.int4_pack(codes, cols)
    assert torch.equal(kernels.unpack_int4(packed, rows, cols), codes)


@needs_cpu_kernel
def test_kernel_layout_is_invisible_to_state_dict_dequantize_and_moves():
    layer = Int4Linear.from_linear(make_linear(160, 72, dtype=torch.bfloat16), group_size=32)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    weight = layer.dequantize_weight()
    x = torch.randn(3, 160, dtype=torch.bfloat16)
    with torch.inference_mode():
        y = layer(x)
    assert layer.uses_kernel_layout and layer.qweight is None  # one copy of the codes
    assert "packed_weight" in dict(layer.named_buffers()) and "packed_weight" not in layer.state_dict()
    after = layer.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(layer.dequantize_weight(), weight)
    layer.to(torch.float32)  # .to() goes back to the portable layout first
    assert not layer.uses_kernel_layout and torch.equal(layer.qweight, before["qweight"])
    layer.to(torch.bfloat16)
    assert torch.equal(layer(x), y)
    fresh = Int4Linear.from_config(160, 72, True, layer.config())
    fresh(x)  # packs its (empty) codes, then loads over the kernel layout
    fresh.load_state_dict(after)
    assert torch.equal(fresh(x), y)


def test_backward_matches_autograd_through_dequantized_weight():
    layer = Int4Linear.from_linear(make_linear(64, 32), group_size=32)
    for dtype in (torch.float32, torch.bfloat16):
        layer.to(dtype)
        x = torch.randn(4, 64, dtype=dtype, requires_grad=True)
        grad = torch.randn(4, 32, dtype=dtype)
        layer(x).backward(grad)
        x_ref = x.detach().clone().requires_grad_()
        torch.nn.functional.linear(x_ref, layer.dequantize_weight(dtype), layer.bias).backward(grad)
        assert rel_err(x.grad, x_ref.grad) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_group_size_validation_and_skip_reason():
    with pytest.raises(ConfigError, match="group_size"):
        Int4Linear(64, 32, group_size=33)
    assert "group_size" in Int4Linear.unsupported_reason(nn.Linear(16, 8), group_size=32)
    assert Int4Linear.unsupported_reason(nn.Linear(48, 8), group_size=32) is None


def test_storage_is_about_four_and_a_half_bits():
    layer = Int4Linear.from_linear(make_linear(1024, 256, bias=False, dtype=torch.bfloat16), group_size=64)
    assert layer.bits_per_weight() == pytest.approx(4 + 2 * 16 / 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_matches_reference_and_unpacks():
    layer = Int4Linear.from_linear(make_linear(384, 250, dtype=torch.bfloat16), group_size=128).cuda()
    codes = layer.qweight.clone()
    x = torch.randn(5, 384, dtype=torch.bfloat16, device="cuda")
    y = layer(x)
    assert layer.uses_kernel_layout
    assert rel_err(y, layer.forward_reference(x)) < 1e-2
    assert torch.equal(layer.portable_codes(), codes)
