"""TritonFlashAttention against SDPA (fp64 oracle), forward and gradients.

Without CUDA the kernels run under Triton's CPU interpreter, which must be switched on before triton itself
is imported (its standard library is jitted at import): this module sets TRITON_INTERPRET=1 when it is
collected, if triton is not imported yet, and removes it again when its tests are done. Interpreted programs
are slow, so the shapes are few and small and the tiles tiny (16 x 8), which still exercises several blocks,
ragged edges and GQA.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from hayai.attention import BlockedFlashAttention, SDPAttention, TritonFlashAttention, select_kernel
from hayai.attention.sdpa import causal_mask
from hayai.attention.triton_flash import triton_installed, triton_usable
from hayai.errors import ConfigError

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
D = 16

_SET_INTERPRET = (
    not CUDA and triton_installed() and "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ
)
if _SET_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"


def _skip_reason() -> str | None:
    if not triton_installed():
        return "triton is not installed (pip install triton)"
    return triton_usable(DEVICE, torch.float32)


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=f"Triton cannot run here: {_skip_reason()}")


@pytest.fixture(scope="module", autouse=True)
def _restore_environment():
    yield
    if _SET_INTERPRET:
        os.environ.pop("TRITON_INTERPRET", None)


def make_qkv(b, h, hkv, t, s, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, D, generator=g)
    k = torch.randn(b, hkv, s, D, generator=g)
    v = torch.randn(b, hkv, s, D, generator=g)
    return [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]


def check_against_sdpa(q, k, v, *, causal, mask=None, kernel=None, atol=2e-5, grad_atol=5e-5):
    kernel = kernel or TritonFlashAttention(block_m=16, block_n=8)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q)
    out = kernel(q, k, v, causal=causal, mask=mask)
    assert out.dtype == q.dtype and out.shape == q.shape
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = SDPAttention()(q64, k64, v64, causal=causal, mask=mask)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=1e-3)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    want = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    for a, b in zip(got, want, strict=True):
        assert a.dtype == q.dtype and torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, atol=grad_atol, rtol=1e-3)
    return out, got


@pytest.mark.parametrize(
    "t,s,h,hkv,causal",
    [
        (1, 1, 6, 2, True),
        (7, 7, 6, 2, True),
        (33, 33, 6, 2, False),
        (33, 33, 4, 4, True),
        (7, 33, 6, 2, True),  # T < S: bottom-right causal (a query block continuing a cached prefix)
        (33, 130, 2, 1, True),
    ],
)
def test_matches_sdpa_fp32(t, s, h, hkv, causal):
    check_against_sdpa(*make_qkv(1, h, hkv, t, s), causal=causal)


def test_rows_that_see_nothing_output_zero_with_zero_grads():
    q, k, v = make_qkv(1, 4, 2, 20, 7)  # causal, T > S: queries 0..12 see no key
    out, (dq, _, _) = check_against_sdpa(q, k, v, causal=True)
    assert torch.all(out[:, :, :13] == 0) and torch.all(dq[:, :, :13] == 0)


def test_bool_mask_with_fully_masked_row():
    t, s = 19, 21
    q, k, v = make_qkv(2, 4, 2, t, s)
    mask = torch.rand(2, 1, t, s, generator=torch.Generator().manual_seed(2)) > 0.3  # broadcast over heads
    mask[1, 0, 5] = False
    mask = mask.to(DEVICE)
    out, (dq, _, _) = check_against_sdpa(q, k, v, causal=False, mask=mask)
    assert torch.all(out[1, :, 5] == 0) and torch.all(dq[1, :, 5] == 0)


def test_fp16():
    check_against_sdpa(*make_qkv(1, 4, 2, 33, 33, dtype=torch.float16), causal=True, atol=2e-3, grad_atol=5e-3)


def test_agrees_with_the_blocked_reference():
    q, k, v = make_qkv(1, 6, 3, 24, 40)
    with torch.no_grad():
        a = TritonFlashAttention(block_m=16, block_n=16)(q, k, v, causal=True)
        b = BlockedFlashAttention(block_q=16, block_k=16)(q, k, v, causal=True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_select_kernel_returns_triton_where_it_runs():
    assert isinstance(select_kernel("triton", DEVICE, torch.float32), TritonFlashAttention)


@pytest.mark.skipif(CUDA, reason="the interpreter limitation only exists on CPU")
def test_bf16_is_refused_under_the_interpreter():
    q, k, v = make_qkv(1, 2, 1, 4, 4, dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="bfloat16"):
        TritonFlashAttention(block_m=16, block_n=16)(q, k, v, causal=True)


def test_bad_block_size_raises():
    with pytest.raises(ConfigError, match="powers of two"):
        TritonFlashAttention(block_m=24)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_precision_long_sequences(dtype):
    q, k, v = make_qkv(2, 9, 3, 1000, 1000, dtype=dtype)
    kernel = TritonFlashAttention()
    check_against_sdpa(q, k, v, causal=True, kernel=kernel, atol=2e-2, grad_atol=5e-2)
    mask = causal_mask(1000, 1000, q.device)
    check_against_sdpa(q, k, v, causal=False, mask=mask, kernel=kernel, atol=2e-2, grad_atol=5e-2)


_COMPILE_SCRIPT = r"""
import inspect, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hayai.attention import triton_flash_kernels as K

INTS = {"H", "HKV", "T", "S", "D", "GROUPS"}
def signature(fn, constexprs):
    sig = {}
    for p in inspect.signature(fn.fn).parameters:
        if p in constexprs: sig[p] = "constexpr"
        elif p in INTS or p.startswith("stride"): sig[p] = "i32"
        elif p == "scale": sig[p] = "fp32"
        elif p in ("LSE", "DELTA"): sig[p] = "*fp32"
        elif p == "M": sig[p] = "*u8"
        else: sig[p] = "*bf16"
    return sig

shared = {}
for fn in (K.flash_fwd_kernel, K.flash_bwd_dkdv_kernel, K.flash_bwd_dq_kernel):
    cx = dict(CAUSAL=True, HAS_MASK=True, BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, DOT_PRECISION=None)
    kernel = triton.compile(ASTSource(fn=fn, signature=signature(fn, cx), constexprs=cx),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 1})
    shared[fn.fn.__name__] = kernel.metadata.shared
print(json.dumps(shared))
"""


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="GPUs run the kernels for real")
def test_kernels_compile_for_a_gpu_without_one():
    """Ahead-of-time compile (Triton -> PTX -> cubin with the bundled ptxas) for sm_90, bf16, head_dim 64, in
    a clean process (this module's process interprets). Catches what the interpreter does not check: typing,
    tl.dot shape rules, and shared memory (must fit the 99 KB per block of consumer Ampere/Ada GPUs)."""
    import json
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("no ptxas available to compile for CUDA")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(shared) == {"flash_fwd_kernel", "flash_bwd_dkdv_kernel", "flash_bwd_dq_kernel"}
    assert all(0 < n <= 99 * 1024 for n in shared.values()), shared
