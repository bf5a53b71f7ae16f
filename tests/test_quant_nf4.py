"""NF4 + double quantization against their definitions and against bitsandbytes itself.

Oracles:
- the code book regenerated from its definition (bitsandbytes ``create_normal_map(offset=0.9677083,
  use_extra_value=True)``, with ``torch.special.ndtri`` as the normal quantile function);
- bitsandbytes ``tests/test_functional.py::test_4bit_quant`` error figures for NF4, blocksize 64, on
  ``randn(1024, 1024)``: mean |err| 0.072798 (σ 0.000074), mean relative error 0.203339; bitsandbytes asserts
  below mean + 7σ (figures quoted in shared/reference/finetuning.md §5.2). Its σ of the relative error is not
  quoted; we use 7 × 0.0003, the spread we measured over 10 seeds;
- bitsandbytes (``pip install bitsandbytes``, CPU build) for codes, absmax, double quantization and
  dequantization, bit for bit. Skipped when it is not installed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hayai.quant import kernels
from hayai.quant.double_quant import double_dequantize, double_quantize, dynamic_map
from hayai.quant.nf4 import NF4_CODE, NF4Linear, dequantize_nf4, nf4_bits_per_parameter, quantize_nf4


def randn(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_code_book_matches_its_definition():
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())  # 8 values
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())  # 7 values
    values = torch.tensor(sorted([*positive.tolist(), 0.0, *negative.tolist()]), dtype=torch.float32)
    assert torch.equal(values / values.max(), torch.tensor(NF4_CODE, dtype=torch.float32))
    assert len(NF4_CODE) == 16 and NF4_CODE[0] == -1.0 and NF4_CODE[7] == 0.0 and NF4_CODE[15] == 1.0


def test_nibble_packing_round_trip_and_order():
    assert kernels.pack_nibbles(torch.tensor([1, 2, 15, 0])).tolist() == [0x12, 0xF0]  # first = high nibble
    codes = torch.randint(0, 16, (3, 1000), dtype=torch.uint8)
    assert torch.equal(kernels.unpack_nibbles(kernels.pack_nibbles(codes)), codes)


@pytest.mark.parametrize("shape", [(64,), (7, 9), (33, 65), (1, 1)])  # exact, ragged, odd-length, one element
def test_quantize_dequantize_round_trip_and_ragged_block(shape):
    x = randn(*shape)
    packed, absmax = quantize_nf4(x, 64)
    n = x.numel()
    assert packed.shape == ((n + 1) // 2,) and absmax.shape == (-(-n // 64),)
    flat = x.reshape(-1)
    assert torch.equal(absmax[-1], flat[(absmax.numel() - 1) * 64:].abs().max())  # the ragged block's own max
    y = dequantize_nf4(packed, absmax, shape)
    codes = kernels.unpack_nibbles(packed)[:n].long()
    code = torch.tensor(NF4_CODE)
    blocks = torch.arange(n) // 64
    # each element gets the nearest code (brute force over all 16)
    nearest = ((flat / absmax[blocks]).unsqueeze(1) - code).abs().argmin(1)
    assert torch.equal(codes, nearest)
    assert torch.equal(y.reshape(-1), code[codes] * absmax[blocks])
    assert torch.equal(quantize_nf4(y, 64)[0], packed)  # dequantized values re-quantize to the same codes


def test_error_matches_bitsandbytes_reference_figures():
    x = randn(1024, 1024, seed=0)
    packed, absmax = quantize_nf4(x, 64)
    err = (x - dequantize_nf4(packed, absmax, x.shape)).abs()
    assert abs(err.mean().item() - 0.072798) < 7 * 0.000074
    assert abs((err / (x.abs() + 1e-8)).mean().item() - 0.203339) < 7 * 0.0003


def test_zero_block_and_dtypes():
    x = torch.zeros(2, 64)
    x[1] = randn(64)
    packed, absmax = quantize_nf4(x.to(torch.bfloat16), 64)
    assert absmax[0] == 0
    y = dequantize_nf4(packed, absmax, x.shape, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y[0], torch.zeros(64, dtype=torch.bfloat16))


def test_double_quantization_reconstructs_absmax_closely():
    _, absmax = quantize_nf4(randn(1024, 1024), 64)
    dq = double_quantize(absmax)
    assert dq.codes.dtype == torch.uint8 and dq.codes.shape == absmax.shape
    assert dq.nested_absmax.shape == (64,) and dq.offset.shape == ()
    assert torch.equal(dq.offset, absmax.mean())
    restored = double_dequantize(dq.codes, dq.nested_absmax, dq.offset)
    # the dynamic map's widest gap near ±1 is 0.0141: at most half of it times the nested absmax
    gaps = dynamic_map().diff().max()
    nested = dq.nested_absmax.repeat_interleave(256)[: absmax.numel()]
    assert torch.all((restored - absmax).abs() <= gaps / 2 * nested + 1e-6)
    assert ((restored - absmax).abs() / absmax).mean() < 2e-3


def test_dynamic_map_shape():
    code = dynamic_map()
    assert code.shape == (256,) and torch.all(code.diff() > 0)
    assert code[-1] == 1.0 and (code == 0).sum() == 1 and code[0] == pytest.approx(-0.99297, abs=1e-5)


def test_bits_per_parameter():
    assert nf4_bits_per_parameter(64, double_quant=False) == 4.5
    assert nf4_bits_per_parameter(64, double_quant=True) == pytest.approx(4.127, abs=1e-3)
    plain = NF4Linear.from_linear(nn.Linear(1024, 1024, bias=False), double_quant=False)
    nested = NF4Linear.from_linear(nn.Linear(1024, 1024, bias=False), double_quant=True)
    assert plain.bits_per_weight() == 4.5
    assert nested.bits_per_weight() == pytest.approx(4.127, abs=1e-3)  # + one fp32 offset per layer


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_forward_is_dequantize_then_linear(double_quant, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40).to(dtype)
    layer = NF4Linear.from_linear(linear, double_quant=double_quant)
    x = torch.randn(2, 3, 96, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 3, 40)
    ref = layer.forward_reference(x)  # bias fused there, added after the matmul here: bf16 rounds twice
    assert (y.float() - ref.float()).norm() / ref.float().norm() < (1e-6 if dtype == torch.float32 else 1e-2)
    w = linear.weight.float()
    assert (layer.dequantize_weight(torch.float32) - w).abs().mean() < 0.1 * w.abs().max()


def test_nf4_linear_compute_dtype():
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(64, 32), compute_dtype=torch.bfloat16)
    x = torch.randn(4, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    ref = torch.nn.functional.linear(x.bfloat16(), layer.dequantize_weight(torch.bfloat16)).float() + layer.bias
    assert torch.allclose(y, ref, rtol=1e-2, atol=1e-3)


def test_backward_matches_autograd_and_saves_no_dense_weight():
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(128, 64))
    x = torch.randn(3, 128, requires_grad=True)
    grad = torch.randn(3, 64)
    saved: list[int] = []  # numel of every tensor autograd saves for backward
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    assert 64 * 128 not in saved, "forward must not keep a dequantized weight for backward"
    y.backward(grad)
    x_ref = x.detach().clone().requires_grad_()
    torch.nn.functional.linear(x_ref, layer.dequantize_weight(), layer.bias).backward(grad)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    # a dense layer does keep its weight: the hook above would have seen it
    saved.clear()
    dense = nn.Linear(128, 64)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        dense(torch.randn(3, 128, requires_grad=True))
    assert 64 * 128 in saved


def test_state_dict_round_trip():
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(96, 40))
    fresh = NF4Linear.from_config(96, 40, True, layer.config())
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(2, 96)
    assert torch.equal(fresh(x), layer(x))
    assert set(layer.state_dict()) == {"bias", "qweight", "absmax", "nested_absmax", "nested_offset"}


# ------------------------------------------------------------------------------------------------------------
# bit-for-bit against bitsandbytes
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bnb():
    functional = pytest.importorskip("bitsandbytes.functional")
    return functional


@pytest.mark.parametrize("shape, dtype", [((1024, 1024), torch.float32), ((333, 77), torch.float32),
                                          ((256, 384), torch.bfloat16), ((300, 200), torch.float16)])
def test_codes_and_absmax_equal_bitsandbytes(bnb, shape, dtype):
    x = randn(*shape, seed=1, dtype=dtype)
    q, state = bnb.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=False)
    packed, absmax = quantize_nf4(x, 64)
    assert torch.equal(packed, q.view(-1))
    assert torch.equal(absmax, state.absmax)
    # their dequantize of their state == ours (ragged shapes make bitsandbytes torch.compile a fallback: slow)
    for out in (torch.float32, torch.bfloat16, torch.float16) if x.numel() % 64 == 0 else ():
        state.dtype = out
        assert torch.equal(dequantize_nf4(q.view(-1), state.absmax, shape, out), bnb.dequantize_4bit(q, state))
    assert torch.equal(torch.tensor(NF4_CODE), bnb.get_4bit_type("nf4", device="cpu"))


def test_double_quantization_equals_bitsandbytes(bnb):
    assert torch.equal(dynamic_map(), bnb.create_dynamic_map(signed=True))
    x = randn(1024, 1024, seed=2)
    _, state = bnb.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    _, absmax = quantize_nf4(x, 64)
    dq = double_quantize(absmax)
    assert torch.equal(dq.offset, state.offset)
    assert torch.equal(dq.nested_absmax, state.state2.absmax)
    # Codes: bitsandbytes' CPU kernel looks the nearest code up in a 65536-entry table indexed by the
    # normalised value, so it may pick the neighbour for values within one table step (2/65535) of a
    # midpoint between two codes; we compute the exact nearest code. Everywhere else: identical.
    differ = dq.codes != state.absmax
    assert differ.float().mean() < 5e-3
    code = dynamic_map()
    ratio = ((absmax - dq.offset) / dq.nested_absmax.repeat_interleave(256)[: absmax.numel()])[differ]
    ours, theirs = dq.codes[differ].long(), state.absmax[differ].long()
    assert torch.all((ours - theirs).abs() == 1)
    assert torch.all((ratio - (code[ours] + code[theirs]) / 2).abs() <= 2 / 65535)
    # their codes dequantize identically through our double_dequantize
    expected = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.equal(double_dequantize(state.absmax, state.state2.absmax, state.offset), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nf4_linear_on_cuda_matches_cpu():
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(128, 64))
    x = torch.randn(3, 128)
    cpu = layer(x)
    gpu = layer.cuda()(x.cuda()).cpu()
    assert torch.allclose(gpu, cpu, rtol=1e-4, atol=1e-5)
