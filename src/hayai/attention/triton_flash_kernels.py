"""Triton programs of the FlashAttention-2 kernel (imported only by `hayai.attention.triton_flash`).

This module imports `triton` at the top; nothing else in hayai imports it eagerly, so hayai works without
triton. The algorithm, masking rules and notation are those of `hayai.attention.blocked` (read that file
first):

    forward  (one program per query block and query head):  online softmax over key blocks -> O, LSE
    backward (one program per key block and kv head):       dK, dV, summing the kv head's G query heads
             (one program per query block and query head):  dQ
    with P = exp(S - LSE), dS = P ∘ (dO Vᵀ - D), D = rowsum(dO ∘ O) precomputed.

Splitting the backward into a dK/dV pass and a dQ pass recomputes Q Kᵀ once more but needs no atomics and
no fp32 dQ scratch buffer, and with GQA each dK/dV program owns its kv head's gradient outright.

Scores, softmax statistics and accumulators are fp32. Masked scores are -inf; a row that has seen no
visible key keeps m = -inf and uses 0 as its reference max, so exp(-inf - 0) = 0 and no NaN appears (the
same guard as the reference). `DOT_PRECISION` is "ieee" for fp32 inputs (no silent TF32) and None (the
default) for fp16/bf16.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _visible(
    rows, cols, T, S, offset, b, h, M,
    stride_mb, stride_mh, stride_mt, stride_ms,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] bool: in range, below the bottom-right causal diagonal, allowed by the bool mask."""
    ok = (rows[:, None] < T) & (cols[None, :] < S)
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + offset)
    if HAS_MASK:
        m_ptrs = (M + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
                  + rows[:, None].to(tl.int64) * stride_mt + cols[None, :].to(tl.int64) * stride_ms)
        allowed = tl.load(m_ptrs, mask=ok, other=0)
        ok = ok & (allowed != 0)
    return ok


@triton.jit
def flash_fwd_kernel(
    Q, K, V, O, LSE, M,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_mb, stride_mh, stride_mt, stride_ms,
    H, T, S, D, GROUPS, scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUPS
    offset = S - T
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh \
        + rows[:, None].to(tl.int64) * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(rows[:, None] < T) & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    end_n = S
    if CAUSAL:  # key blocks entirely above the diagonal are skipped
        end_n = tl.minimum(S, (pid_m + 1) * BLOCK_M + offset)
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < S) & d_ok[None, :]
        k = tl.load(k_base + cols[:, None].to(tl.int64) * stride_ks + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [BLOCK_M, BLOCK_N] fp32
        ok = _visible(rows, cols, T, S, offset, b, h, M, stride_mb, stride_mh, stride_mt, stride_ms,
                      CAUSAL, HAS_MASK)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vs + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # no visible key: output 0, LSE -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(l_safe))
    o_ptrs = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh \
        + rows[:, None].to(tl.int64) * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(rows[:, None] < T) & d_ok[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * T + rows, lse, mask=rows < T)


@triton.jit
def flash_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, M,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    stride_mb, stride_mh, stride_mt, stride_ms,
    H, HKV, T, S, D, GROUPS, scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    b = pid_bhk // HKV
    hk = pid_bhk % HKV
    offset = S - T
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = (cols[:, None] < S) & d_ok[None, :]
    k = tl.load(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
                + cols[:, None].to(tl.int64) * stride_ks + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
                + cols[:, None].to(tl.int64) * stride_vs + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    start_m = 0
    if CAUSAL:  # queries above this key block's first column cannot see it
        start_m = tl.maximum(pid_n * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M
    for g in range(0, GROUPS):
        h = hk * GROUPS + g
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        stat_base = (b * H + h).to(tl.int64) * T
        for m0 in range(start_m, T, BLOCK_M):
            rows = m0 + offs_m
            q_mask = (rows[:, None] < T) & d_ok[None, :]
            q = tl.load(q_base + rows[:, None].to(tl.int64) * stride_qt + offs_d[None, :] * stride_qd,
                        mask=q_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
            do = tl.load(do_base + rows[:, None].to(tl.int64) * stride_dot + offs_d[None, :] * stride_dod,
                         mask=q_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
            lse = tl.load(LSE + stat_base + rows, mask=rows < T, other=0.0)
            delta = tl.load(DELTA + stat_base + rows, mask=rows < T, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [BLOCK_M, BLOCK_N]
            ok = _visible(rows, cols, T, S, offset, b, h, M, stride_mb, stride_mh, stride_mt, stride_ms,
                          CAUSAL, HAS_MASK)
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)  # fully masked rows (LSE -inf) are never ok
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)

    dk = dk * scale
    tl.store(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
             + cols[:, None].to(tl.int64) * stride_dks + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh
             + cols[:, None].to(tl.int64) * stride_dvs + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def flash_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, M,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_mb, stride_mh, stride_mt, stride_ms,
    H, T, S, D, GROUPS, scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUPS
    offset = S - T
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_mask = (rows[:, None] < T) & d_ok[None, :]
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + rows[:, None].to(tl.int64) * stride_qt + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + rows[:, None].to(tl.int64) * stride_dot + offs_d[None, :] * stride_dod,
                 mask=q_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    lse = tl.load(LSE + pid_bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    end_n = S
    if CAUSAL:
        end_n = tl.minimum(S, (pid_m + 1) * BLOCK_M + offset)
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < S) & d_ok[None, :]
        k = tl.load(k_base + cols[:, None].to(tl.int64) * stride_ks + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vs + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [BLOCK_M, BLOCK_N]
        ok = _visible(rows, cols, T, S, offset, b, h, M, stride_mb, stride_mh, stride_mt, stride_ms,
                      CAUSAL, HAS_MASK)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq = dq * scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + rows[:, None].to(tl.int64) * stride_dqt + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=q_mask)
