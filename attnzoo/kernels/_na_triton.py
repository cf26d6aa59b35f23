"""Fused neighborhood attention in Triton: forward, and a backward for dq, dk, dv and drpb.

Design (after "Faster Neighborhood Attention", Hassani et al. 2024): every program owns a multi-dimensional
tile of queries inside one dilation sub-grid (so dilation is just a strided view of the map), computes
the box of keys that the tile's windows cover, and sweeps that box in multi-dimensional key tiles with an
online softmax, masking each (query, key) pair by the query's own window. The attention matrix never
exists in memory; the backward recomputes it tile by tile from the saved output and logsumexp.
One kernel serves 1-D, 2-D and 3-D: missing leading axes have length 1 and kernel size 1.

Extra tokens (``additional_keys``) are attended in PyTorch and merged through the logsumexp, which is
exact: the kernel's neighbourhood softmax and the extra tokens' softmax combine into one softmax.

Imported lazily (only when the triton backend runs).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _launch
from ._backend import triton_interpreting

LOG2E = 1.4426950408889634


# --- per-axis window arithmetic (NATTEN semantics; see attnzoo.kernels.reference.na_window_positions) --------

@triton.jit
def _window(p, Lg, KS, ST, CAUSAL: tl.constexpr):
    """First and last key position (inside the sub-grid of length Lg) of the windows of queries at ``p``."""
    if CAUSAL:
        leader = tl.minimum(p // ST * ST + ST - 1, Lg - 1)
        first = tl.maximum(leader - KS + 1, 0)
        last = p
    else:
        left = KS // 2
        leader = tl.minimum(p // ST * ST + ST // 2, Lg - 1)
        first = tl.minimum(tl.maximum(leader, left), Lg - KS + left) - left
        last = first + KS - 1
    return first, last


@triton.jit
def _inverse_window(first_kv, last_kv, Lg, KS, ST, CAUSAL: tl.constexpr):
    """Range of query positions whose windows may contain keys in [first_kv, last_kv] (exact for stride 1)."""
    if CAUSAL:
        q_lo = first_kv
        q_hi = tl.minimum(last_kv + KS - 1, Lg - 1)
    else:
        left = KS // 2
        right = KS - 1 - left
        # stride 1: window start is clamp(q - left, 0, Lg - KS); otherwise |key - query| <= KS - 1 bounds it.
        q_lo = tl.where(ST == 1, tl.where(first_kv - KS + 1 <= 0, 0, first_kv - right),
                        tl.maximum(first_kv - KS + 1, 0))
        q_hi = tl.where(ST == 1, tl.where(last_kv >= Lg - KS, Lg - 1, last_kv + left),
                        tl.minimum(last_kv + KS - 1, Lg - 1))
    return q_lo, q_hi


@triton.jit
def _tile_coords(T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """Row-major coordinates of the T0 x T1 x T2 points of a tile, as three int vectors."""
    m = tl.arange(0, T0 * T1 * T2)
    return m // (T1 * T2), (m // T2) % T1, m % T2


@triton.jit
def _decode_tile(pid, L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2):
    """Program id -> (dilation group, sub-grid length, tile index) per axis."""
    t2 = pid % NT2
    r = pid // NT2
    t1 = r % NT1
    r = r // NT1
    t0 = r % NT0
    r = r // NT0
    g2 = r % DL2
    r = r // DL2
    g1 = r % DL1
    g0 = r // DL1
    Lg0 = (L0 - g0 + DL0 - 1) // DL0
    Lg1 = (L1 - g1 + DL1 - 1) // DL1
    Lg2 = (L2 - g2 + DL2 - 1) // DL2
    return g0, g1, g2, Lg0, Lg1, Lg2, t0, t1, t2


@triton.jit
def _pair_mask(k0, k1, k2, f0, l0, f1, l1, f2, l2, NDIM: tl.constexpr):
    """(queries, keys) mask: key inside the query's window on every axis (sub-grid coordinates)."""
    mask = (k2[None, :] >= f2[:, None]) & (k2[None, :] <= l2[:, None])
    if NDIM >= 2:
        mask = mask & (k1[None, :] >= f1[:, None]) & (k1[None, :] <= l1[:, None])
    if NDIM >= 3:
        mask = mask & (k0[None, :] >= f0[:, None]) & (k0[None, :] <= l0[:, None])
    return mask


@triton.jit
def _rpb_index(k0, k1, k2, p0, p1, p2, KS0, KS1, KS2):
    """Flat index into rpb (heads, 2*KS0-1, 2*KS1-1, 2*KS2-1) of each (query, key) offset."""
    r0 = k0[None, :] - p0[:, None] + KS0 - 1
    r1 = k1[None, :] - p1[:, None] + KS1 - 1
    r2 = k2[None, :] - p2[:, None] + KS2 - 1
    return (r0 * (2 * KS1 - 1) + r1) * (2 * KS2 - 1) + r2


# --- forward ------------------------------------------------------------------------------------------------

@triton.jit
def _na_fwd_kernel(
    Q, K, V, RPB, O, LSE,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh, stride_lb, stride_ln,
    H, GROUP, L0, L1, L2, KS0, KS1, KS2, ST0, ST1, ST2, DL0, DL1, DL2, NT0, NT1, NT2, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NDIM: tl.constexpr,
    CAUSAL0: tl.constexpr, CAUSAL1: tl.constexpr, CAUSAL2: tl.constexpr, HAS_RPB: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, U0: tl.constexpr, U1: tl.constexpr, U2: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # 64-bit batch offsets: batch * tokens * heads * dim may exceed 2**31
    h = bh % H
    kvh = h // GROUP
    g0, g1, g2, Lg0, Lg1, Lg2, t0, t1, t2 = _decode_tile(pid, L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2)

    # Queries of this tile, in sub-grid coordinates; padding queries are clamped onto the last real one.
    i0, i1, i2 = _tile_coords(T0, T1, T2)
    p0 = t0 * T0 + i0
    p1 = t1 * T1 + i1
    p2 = t2 * T2 + i2
    q_ok = (p0 < Lg0) & (p1 < Lg1) & (p2 < Lg2)
    p0 = tl.minimum(p0, Lg0 - 1)
    p1 = tl.minimum(p1, Lg1 - 1)
    p2 = tl.minimum(p2, Lg2 - 1)
    f0, l0 = _window(p0, Lg0, KS0, ST0, CAUSAL0)
    f1, l1 = _window(p1, Lg1, KS1, ST1, CAUSAL1)
    f2, l2 = _window(p2, Lg2, KS2, ST2, CAUSAL2)
    # The box of keys the tile needs (windows are monotone in the query position).
    lo0 = tl.min(f0, 0)
    lo1 = tl.min(f1, 0)
    lo2 = tl.min(f2, 0)
    hi0 = tl.max(l0, 0)
    hi1 = tl.max(l1, 0)
    hi2 = tl.max(l2, 0)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    qn = ((g0 + DL0 * p0) * L1 + (g1 + DL1 * p1)) * L2 + (g2 + DL2 * p2)
    q = tl.load(Q + b * stride_qb + h * stride_qh + qn[:, None] * stride_qn + d[None, :],
                mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    j0, j1, j2 = _tile_coords(U0, U1, U2)
    n1 = (hi1 - lo1 + U1) // U1
    n2 = (hi2 - lo2 + U2) // U2
    n_tiles = ((hi0 - lo0 + U0) // U0) * n1 * n2
    BLOCK_M: tl.constexpr = T0 * T1 * T2
    # Online softmax in base 2; a finite floor keeps fully masked rows of a key tile NaN-free.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    for t in range(0, n_tiles):
        c2 = t % n2
        c1 = (t // n2) % n1
        c0 = t // (n2 * n1)
        k0 = lo0 + c0 * U0 + j0
        k1 = lo1 + c1 * U1 + j1
        k2 = lo2 + c2 * U2 + j2
        kv_ok = (k0 <= hi0) & (k1 <= hi1) & (k2 <= hi2)
        kn = ((g0 + DL0 * k0) * L1 + (g1 + DL1 * k1)) * L2 + (g2 + DL2 * k2)
        kt = tl.load(k_base + kn[:, None] * stride_kn + d[None, :], mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:
            kt = kt.to(tl.float32)
        s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
        pair = _pair_mask(k0, k1, k2, f0, l0, f1, l1, f2, l2, NDIM)
        if HAS_RPB:
            rel = _rpb_index(k0, k1, k2, p0, p1, p2, KS0, KS1, KS2)
            rpb_off = h * (2 * KS0 - 1) * (2 * KS1 - 1) * (2 * KS2 - 1)
            s += tl.load(RPB + rpb_off + rel, mask=pair, other=0.0) * 1.4426950408889634
        s = tl.where(pair, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_base + kn[:, None] * stride_vn + d[None, :], mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:
            vt = vt.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + qn[:, None] * stride_on + d[None, :], acc.to(O.dtype.element_ty),
             mask=q_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # back to natural log
    tl.store(LSE + b * stride_lb + h + qn * stride_ln, lse, mask=q_ok)


# --- backward -----------------------------------------------------------------------------------------------

@triton.jit
def _na_bwd_dq_kernel(
    Q, K, V, RPB, O, DO, LSE, GLSE, DELTA, DQ, DRPB,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh, stride_lb, stride_ln,
    H, GROUP, L0, L1, L2, KS0, KS1, KS2, ST0, ST1, ST2, DL0, DL1, DL2, NT0, NT1, NT2, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NDIM: tl.constexpr,
    CAUSAL0: tl.constexpr, CAUSAL1: tl.constexpr, CAUSAL2: tl.constexpr, HAS_RPB: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    RPB_GRAD: tl.constexpr, HAS_GLSE: tl.constexpr,
    T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, U0: tl.constexpr, U1: tl.constexpr, U2: tl.constexpr,
):
    """dq (and drpb by atomics) for one query tile: recompute P from the logsumexp, dS = P * (dP - delta).

    Also computes delta = rowsum(dO * O) (minus the logsumexp's own gradient) for its queries and stores it
    for the dk/dv kernel, which runs next: no separate pass over O and dO. O, dO and dQ share one layout.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # 64-bit batch offsets: batch * tokens * heads * dim may exceed 2**31
    h = bh % H
    kvh = h // GROUP
    g0, g1, g2, Lg0, Lg1, Lg2, t0, t1, t2 = _decode_tile(pid, L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2)
    i0, i1, i2 = _tile_coords(T0, T1, T2)
    p0 = t0 * T0 + i0
    p1 = t1 * T1 + i1
    p2 = t2 * T2 + i2
    q_ok = (p0 < Lg0) & (p1 < Lg1) & (p2 < Lg2)
    p0 = tl.minimum(p0, Lg0 - 1)
    p1 = tl.minimum(p1, Lg1 - 1)
    p2 = tl.minimum(p2, Lg2 - 1)
    f0, l0 = _window(p0, Lg0, KS0, ST0, CAUSAL0)
    f1, l1 = _window(p1, Lg1, KS1, ST1, CAUSAL1)
    f2, l2 = _window(p2, Lg2, KS2, ST2, CAUSAL2)
    lo0 = tl.min(f0, 0)
    lo1 = tl.min(f1, 0)
    lo2 = tl.min(f2, 0)
    hi0 = tl.max(l0, 0)
    hi1 = tl.max(l1, 0)
    hi2 = tl.max(l2, 0)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    qn = ((g0 + DL0 * p0) * L1 + (g1 + DL1 * p1)) * L2 + (g2 + DL2 * p2)
    row_mask = q_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + qn[:, None] * stride_qn + d[None, :], mask=row_mask, other=0.0)
    o_off = b * stride_ob + h * stride_oh + qn[:, None] * stride_on + d[None, :]
    do = tl.load(DO + o_off, mask=row_mask, other=0.0)
    o = tl.load(O + o_off, mask=row_mask, other=0.0)
    l_off = b * stride_lb + h + qn * stride_ln
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    if HAS_GLSE:
        delta -= tl.load(GLSE + l_off, mask=q_ok, other=0.0)
    tl.store(DELTA + l_off, delta, mask=q_ok)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(LSE + l_off, mask=q_ok, other=0.0) * 1.4426950408889634

    j0, j1, j2 = _tile_coords(U0, U1, U2)
    n1 = (hi1 - lo1 + U1) // U1
    n2 = (hi2 - lo2 + U2) // U2
    n_tiles = ((hi0 - lo0 + U0) // U0) * n1 * n2
    BLOCK_M: tl.constexpr = T0 * T1 * T2
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    rpb_off = h * (2 * KS0 - 1) * (2 * KS1 - 1) * (2 * KS2 - 1)
    for t in range(0, n_tiles):
        c2 = t % n2
        c1 = (t // n2) % n1
        c0 = t // (n2 * n1)
        k0 = lo0 + c0 * U0 + j0
        k1 = lo1 + c1 * U1 + j1
        k2 = lo2 + c2 * U2 + j2
        kv_ok = (k0 <= hi0) & (k1 <= hi1) & (k2 <= hi2)
        kn = ((g0 + DL0 * k0) * L1 + (g1 + DL1 * k1)) * L2 + (g2 + DL2 * k2)
        col_mask = kv_ok[:, None] & d_ok[None, :]
        kt = tl.load(k_base + kn[:, None] * stride_kn + d[None, :], mask=col_mask, other=0.0)
        vt = tl.load(v_base + kn[:, None] * stride_vn + d[None, :], mask=col_mask, other=0.0)
        if DOT_F32:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
        pair = _pair_mask(k0, k1, k2, f0, l0, f1, l1, f2, l2, NDIM) & q_ok[:, None]
        if HAS_RPB:
            rel = _rpb_index(k0, k1, k2, p0, p1, p2, KS0, KS1, KS2)
            s += tl.load(RPB + rpb_off + rel, mask=pair, other=0.0) * 1.4426950408889634
        p = tl.where(pair, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vt), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=DOT_PREC)
        if RPB_GRAD:
            tl.atomic_add(DRPB + rpb_off + rel, ds, mask=pair)
    dq = dq * scale
    tl.store(DQ + o_off, dq.to(DQ.dtype.element_ty), mask=row_mask)


@triton.jit
def _na_bwd_dkdv_kernel(
    Q, K, V, RPB, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh, stride_lb, stride_ln, stride_gb, stride_gn, stride_gh,
    HKV, GROUP, L0, L1, L2, KS0, KS1, KS2, ST0, ST1, ST2, DL0, DL1, DL2, NT0, NT1, NT2, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NDIM: tl.constexpr,
    CAUSAL0: tl.constexpr, CAUSAL1: tl.constexpr, CAUSAL2: tl.constexpr, HAS_RPB: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, U0: tl.constexpr, U1: tl.constexpr, U2: tl.constexpr,
):
    """dk, dv for one key tile (shape U) of one kv head: sweep the query tiles (shape T) that can see it,
    for every query head of the GQA group (no atomics). dK and dV share one dense layout (stride_g*)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    kvh = bh % HKV
    g0, g1, g2, Lg0, Lg1, Lg2, t0, t1, t2 = _decode_tile(pid, L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2)
    j0, j1, j2 = _tile_coords(U0, U1, U2)
    k0 = t0 * U0 + j0
    k1 = t1 * U1 + j1
    k2 = t2 * U2 + j2
    kv_ok = (k0 < Lg0) & (k1 < Lg1) & (k2 < Lg2)
    k0 = tl.minimum(k0, Lg0 - 1)
    k1 = tl.minimum(k1, Lg1 - 1)
    k2 = tl.minimum(k2, Lg2 - 1)
    lo0, hi0 = _inverse_window(tl.min(k0, 0), tl.max(k0, 0), Lg0, KS0, ST0, CAUSAL0)
    lo1, hi1 = _inverse_window(tl.min(k1, 0), tl.max(k1, 0), Lg1, KS1, ST1, CAUSAL1)
    lo2, hi2 = _inverse_window(tl.min(k2, 0), tl.max(k2, 0), Lg2, KS2, ST2, CAUSAL2)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    kn = ((g0 + DL0 * k0) * L1 + (g1 + DL1 * k1)) * L2 + (g2 + DL2 * k2)
    col_mask = kv_ok[:, None] & d_ok[None, :]
    kt = tl.load(K + b * stride_kb + kvh * stride_kh + kn[:, None] * stride_kn + d[None, :], mask=col_mask, other=0.0)
    vt = tl.load(V + b * stride_vb + kvh * stride_vh + kn[:, None] * stride_vn + d[None, :], mask=col_mask, other=0.0)
    if DOT_F32:
        kt = kt.to(tl.float32)
        vt = vt.to(tl.float32)

    i0, i1, i2 = _tile_coords(T0, T1, T2)
    n1 = (hi1 - lo1 + T1) // T1
    n2 = (hi2 - lo2 + T2) // T2
    n_tiles = ((hi0 - lo0 + T0) // T0) * n1 * n2
    BLOCK_N: tl.constexpr = U0 * U1 * U2
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for hh in range(0, GROUP):
        h = kvh * GROUP + hh
        rpb_off = h * (2 * KS0 - 1) * (2 * KS1 - 1) * (2 * KS2 - 1)
        for t in range(0, n_tiles):
            c2 = t % n2
            c1 = (t // n2) % n1
            c0 = t // (n2 * n1)
            p0 = lo0 + c0 * T0 + i0
            p1 = lo1 + c1 * T1 + i1
            p2 = lo2 + c2 * T2 + i2
            q_ok = (p0 <= hi0) & (p1 <= hi1) & (p2 <= hi2)
            f0, l0 = _window(p0, Lg0, KS0, ST0, CAUSAL0)
            f1, l1 = _window(p1, Lg1, KS1, ST1, CAUSAL1)
            f2, l2 = _window(p2, Lg2, KS2, ST2, CAUSAL2)
            qn = ((g0 + DL0 * p0) * L1 + (g1 + DL1 * p1)) * L2 + (g2 + DL2 * p2)
            row_mask = q_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + b * stride_qb + h * stride_qh + qn[:, None] * stride_qn + d[None, :], mask=row_mask,
                        other=0.0)
            do = tl.load(DO + b * stride_ob + h * stride_oh + qn[:, None] * stride_on + d[None, :], mask=row_mask,
                         other=0.0)
            if DOT_F32:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse2 = tl.load(LSE + b * stride_lb + h + qn * stride_ln, mask=q_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + b * stride_lb + h + qn * stride_ln, mask=q_ok, other=0.0)
            s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
            pair = _pair_mask(k0, k1, k2, f0, l0, f1, l1, f2, l2, NDIM) & q_ok[:, None] & kv_ok[None, :]
            if HAS_RPB:
                rel = _rpb_index(k0, k1, k2, p0, p1, p2, KS0, KS1, KS2)
                s += tl.load(RPB + rpb_off + rel, mask=pair, other=0.0) * 1.4426950408889634
            p = tl.where(pair, tl.exp2(s - lse2[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
            dp = tl.dot(do, tl.trans(vt), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    dk = dk * scale
    g_off = b * stride_gb + kvh * stride_gh + kn[:, None] * stride_gn + d[None, :]
    tl.store(DK + g_off, dk.to(DK.dtype.element_ty), mask=col_mask)
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=col_mask)


# --- launch -------------------------------------------------------------------------------------------------

# (query tile, key tile, num_warps, num_stages) candidates per dimensionality; tiles are padded to 3-D. Chosen
# from a per-kernel profile of every shape in benchmarks/na.py on an H100 (benchmarks/na_breakdown.py):
# small 64-query tiles win everywhere (head_dim 32-64 leaves little work per key tile).
_GPU_CONFIGS = {
    1: [((1, 1, 64), (1, 1, 64), 4, 3), ((1, 1, 64), (1, 1, 32), 4, 3), ((1, 1, 32), (1, 1, 64), 4, 3),
        ((1, 1, 128), (1, 1, 32), 4, 3)],
    2: [((1, 8, 8), (1, 8, 8), 4, 3), ((1, 8, 8), (1, 4, 8), 4, 3), ((1, 8, 16), (1, 8, 8), 4, 3),
        ((1, 16, 8), (1, 8, 8), 4, 3), ((1, 4, 16), (1, 4, 16), 4, 3)],
    3: [((4, 4, 4), (4, 4, 4), 4, 3), ((4, 4, 4), (2, 4, 4), 4, 3), ((2, 4, 8), (2, 4, 8), 4, 3)],
}
# Problems smaller than this (batch * heads * tokens) run the first config untuned: tuning would cost more.
_TUNE_MIN_WORK = 2**16
# Tiny tiles for the CPU interpreter: its cost is per program and per block dot.
_INTERPRET_CONFIG = {1: ((1, 1, 16), (1, 1, 16)), 2: ((1, 4, 4), (1, 4, 4)), 3: ((1, 4, 4), (1, 4, 4))}
_PLANS: dict[tuple, object] = {}  # launch plans by shapes, strides and arguments


def _geometry(q: torch.Tensor, kernel_size, stride, dilation, is_causal):
    """Pad per-axis arguments to 3 axes (leading axes of length 1) and compute tiles-per-axis helpers."""
    na_dim = q.dim() - 3
    pad = 3 - na_dim
    spatial = (1,) * pad + tuple(q.shape[1:1 + na_dim])
    return (na_dim, spatial, (1,) * pad + tuple(kernel_size), (1,) * pad + tuple(stride),
            (1,) * pad + tuple(dilation), (False,) * pad + tuple(is_causal))


def _grid_tiles(spatial, dilation, tile):
    return [triton.cdiv(triton.cdiv(length, dil), t) for length, dil, t in zip(spatial, dilation, tile)]


def _configs(na_dim: int):
    if triton_interpreting():
        tile, kv_tile = _INTERPRET_CONFIG[na_dim]
        return [(tile, kv_tile, 4, 1)]
    return _GPU_CONFIGS[na_dim]


def _dot_in_f32(q: torch.Tensor) -> bool:
    """The CPU interpreter computes bfloat16 ``tl.dot`` wrongly (triton 3.8): there, upcast tiles to fp32."""
    return triton_interpreting() and q.dtype == torch.bfloat16


def _dot_precision(q: torch.Tensor) -> str:
    """float32 inputs get float32-accurate dots: 3xTF32 on tensor cores (plain TF32 loses ~3 digits, and
    "ieee" FMA dots of these tile sizes take minutes to compile). The interpreter computes in numpy."""
    if q.dtype != torch.float32:
        return "tf32"
    return "ieee" if triton_interpreting() else "tf32x3"


def _check_supported(q: torch.Tensor, v: torch.Tensor) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the triton NA backend takes float16, bfloat16 or float32, got {q.dtype}; "
                         "use set_backend('torch') for float64")
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"the triton NA backend needs head_dim_v == head_dim, got {v.shape[-1]} != {q.shape[-1]}; "
                         "use set_backend('torch')")
    if not 8 <= q.shape[-1] <= 256:
        raise ValueError(f"the triton NA backend supports head_dim 8..256, got {q.shape[-1]}")


def _token_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(batch, token, head) strides of ``t`` when its channels have unit stride and its tokens one stride across
    the spatial axes (dense tensors, and views such as ``qkv.unbind(...)``); None when it needs a dense copy."""
    stride, shape = t.stride(), t.shape
    na_dim = len(stride) - 3
    if stride[-1] != 1 or any(stride[a] != stride[a + 1] * shape[a + 1] for a in range(1, na_dim)):
        return None
    return stride[0], stride[na_dim], stride[-2]


def _dense_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, token, head) strides of a dense (batch, *spatial, heads, dim) tensor."""
    return t.stride(0), t.stride(-3), t.stride(-2)


class _Layout:
    """How the kernels read q, k, v of one (shape, stride) signature: in place where their tokens are evenly
    strided, else from dense copies (``copies``: one flag per tensor, or None when all are read in place), with
    the (batch, token, head) strides of what they read. Decided once per signature (host time)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        found = [_token_strides(t) for t in (q, k, v)]
        self.copies = None if all(found) else tuple(s is None for s in found)
        self.strides = tuple(x for t, s in zip((q, k, v), found) for x in (s or _dense_strides(t.contiguous())))
        self.lse_shape = tuple(q.shape[:-1])

    def read(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v as the kernels read them (dense copies only where ``copies`` says)."""
        return tuple(t.contiguous() if c else t for t, c in zip((q, k, v), self.copies))


def _extra_scores(q, additional_keys, scale):
    """Scores of every query against the extra tokens: (batch, *spatial, heads, n_extra) float32."""
    batch, heads, kv_heads = q.shape[0], q.shape[-2], additional_keys.shape[2]
    qg = q.reshape(batch, -1, kv_heads, heads // kv_heads, q.shape[-1]).float()
    s = torch.einsum("bnhgd,bmhd->bnhgm", qg, additional_keys.float()) * scale
    return s.reshape(*q.shape[:-1], -1)


def na_forward(q, k, v, kernel_size, stride, dilation, is_causal, scale, rpb, additional_keys, additional_values):
    """Fused forward. Returns (out like q, lse float32 (batch, *spatial, heads))."""
    has_rpb = rpb is not None
    # One dict lookup per call finds everything that depends on shapes, strides and arguments.
    key = ("fwd", q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, kernel_size, stride,
           dilation, is_causal, has_rpb)
    hit = _PLANS.get(key)
    if hit is None:
        _check_supported(q, v)
        layout = _Layout(q, k, v)
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        hit = _PLANS[key] = (layout, _Plan(_na_fwd_kernel, q, k, kernel_size, stride, dilation, is_causal, has_rpb,
                                           (*layout.strides, *_dense_strides(out), *_lse_strides(layout)), "query"))
    layout, plan = hit
    # Views such as q, k, v = qkv.unbind(...) are read in place when their tokens are evenly strided.
    if layout.copies is not None:
        q, k, v = layout.read(q, k, v)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # (empty_like: less host time)
    lse = q.new_empty(layout.lse_shape, dtype=torch.float32)
    rpb_f = rpb.float().contiguous() if has_rpb else lse  # placeholder pointer when absent
    plan.launch((q, k, v, rpb_f, out, lse), (scale * LOG2E,))
    if additional_keys is not None:
        out, lse = _merge_extra(q, out, lse, additional_keys, additional_values, scale)
    return out, lse


def _lse_strides(layout: _Layout) -> tuple[int, int]:
    """(batch, token) strides of a dense (batch, *spatial, heads) logsumexp; its head stride is 1."""
    shape = layout.lse_shape
    return math.prod(shape[1:]), shape[-1]


class _Plan:
    """Everything about one kernel launch that depends only on shapes, strides and arguments, computed once.

    Per call only the tensor pointers (and run-time scalars) change, so the host path is a dict lookup and
    the launch itself. The tile config is tuned on first use (see ``_choose_config``) and then frozen here.
    ``grid_by``: "query" (a program per query tile and head) or "key" (per key tile and kv head).
    """

    def __init__(self, kernel, q, k, kernel_size, stride, dilation, is_causal, has_rpb, strides, grid_by):
        na_dim, spatial, ks, st, dl, causal = _geometry(q, kernel_size, stride, dilation, is_causal)
        batch, heads, kv_heads, head_dim = q.shape[0], q.shape[-2], k.shape[-2], q.shape[-1]
        self.kernel = kernel
        self.spatial, self.dl = spatial, dl
        self.grid_by = grid_by
        self.rows = batch * (heads if grid_by == "query" else kv_heads)
        self.int_args = (*strides, heads if grid_by == "query" else kv_heads, heads // kv_heads, *spatial, *ks, *st,
                         *dl)
        self.consts = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), NDIM=na_dim,
                           CAUSAL0=causal[0], CAUSAL1=causal[1], CAUSAL2=causal[2], HAS_RPB=has_rpb,
                           DOT_F32=_dot_in_f32(q), DOT_PREC=_dot_precision(q))
        self.configs = _configs(na_dim)
        self.work = batch * heads * math.prod(spatial)
        self.replay = _launch.SUPPORTED and not triton_interpreting()  # direct replay of the compiled kernel
        self.ready: dict[tuple, tuple] = {}  # variant -> (grid, int args, meta)
        self.direct: dict[tuple, object] = {}  # (variant, device index) -> DirectLaunch (or None: not replayable)

    def _prepared(self, cfg, variant):
        tile, kv_tile, warps, stages = cfg
        own = tile if self.grid_by == "query" else kv_tile  # the dk/dv kernel's program tile is the key tile
        nt = _grid_tiles(self.spatial, self.dl, own)
        grid = (math.prod(self.dl) * math.prod(nt), self.rows)
        meta = dict(self.consts, **dict(variant), T0=tile[0], T1=tile[1], T2=tile[2], U0=kv_tile[0],
                    U1=kv_tile[1], U2=kv_tile[2])
        if not triton_interpreting():
            meta.update(num_warps=warps, num_stages=stages)
        return grid, (*self.int_args, *nt), meta

    def launch(self, ptrs, scalars, variant=(), time_fn=None):
        """Launch on ``ptrs`` (tensors) with run-time ``scalars``; ``variant``: extra constexprs as (name, value)
        pairs (a constant tuple per call site). Tunes the tile config on first use; ``time_fn`` runs right before
        every launch (e.g. zeroing an atomically accumulated output)."""
        hit = self.ready.get(variant)
        if hit is None:  # the chosen config has run on these inputs while it was chosen
            self.ready[variant] = self._prepared(_choose_config(self, ptrs, scalars, variant, time_fn), variant)
            return
        if time_fn is not None:
            time_fn()
        if self.replay:
            device = torch._C._cuda_getDevice()
            dkey = (variant, device)
            direct = self.direct.get(dkey, False)
            if direct is False:  # first launch of this config on this device: capture it for direct replay
                grid, int_args, meta = hit
                self.direct[dkey] = _launch.launch_and_capture(self.kernel, grid, ptrs, int_args, scalars, meta)
                return
            if direct is not None and direct(ptrs, scalars, device):
                return
        grid, int_args, meta = hit
        self.kernel[grid](*ptrs, *int_args, *scalars, **meta)


def _choose_config(plan: _Plan, ptrs, scalars, variant, time_fn):
    """The (query tile, key tile, warps, stages) for ``plan``: the single interpreter config, the first config that
    fits for small problems, else the fastest candidate by ``do_bench`` (each candidate launched for real,
    so the call that tunes also computes the result)."""
    configs = plan.configs

    def run(cfg):
        if time_fn is not None:
            time_fn()
        grid, int_args, meta = plan._prepared(cfg, variant)
        plan.kernel[grid](*ptrs, *int_args, *scalars, **meta)

    tile, kv_tile, warps, _ = configs[0]
    fallback = [*configs, (tile, kv_tile, warps, 1)]  # large fp32 head dims overflow shared memory
    if triton_interpreting() or len(configs) == 1 or plan.work < _TUNE_MIN_WORK:
        for cfg in fallback:
            try:
                run(cfg)
            except triton.runtime.errors.OutOfResources:
                continue
            return cfg
        raise RuntimeError(f"no NA kernel config fits this GPU for {plan.kernel.__name__}")
    from triton.testing import do_bench

    best, best_ms = None, float("inf")
    for cfg in fallback:
        try:
            ms = do_bench(lambda cfg=cfg: run(cfg), warmup=3, rep=15)
        except triton.runtime.errors.OutOfResources:  # a config this GPU cannot run: skip it
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"no NA kernel config fits this GPU for {plan.kernel.__name__}")
    run(best)  # leave the result of the chosen config in the outputs
    return best


def _merge_extra(q, out, lse, additional_keys, additional_values, scale):
    """Combine the neighbourhood softmax (out, lse) with attention over the extra tokens: one softmax."""
    s = _extra_scores(q, additional_keys, scale)  # (B, *S, H, M)
    lse_x = torch.logsumexp(s, dim=-1)
    lse_all = torch.logaddexp(lse, lse_x)
    batch, heads, kv_heads = q.shape[0], q.shape[-2], additional_keys.shape[2]
    p = torch.exp(s - lse_all[..., None]).reshape(batch, -1, kv_heads, heads // kv_heads, s.shape[-1])
    out_x = torch.einsum("bnhgm,bmhd->bnhgd", p, additional_values.float()).reshape(q.shape)
    merged = out.float() * torch.exp(lse - lse_all)[..., None] + out_x
    return merged.to(q.dtype), lse_all


# The dq kernel's constexpr variants per (rpb gradient, logsumexp gradient), as constant keys (host time).
_DQ_VARIANTS = {(rg, hg): (("RPB_GRAD", rg), ("HAS_GLSE", hg)) for rg in (False, True) for hg in (False, True)}


def na_backward(grad_out, q, k, v, out, lse, kernel_size, stride, dilation, is_causal, scale, rpb,
                additional_keys, additional_values, need_rpb_grad=True, grad_lse=None):
    """Fused backward from the saved output and logsumexp: (dq, dk, dv, drpb, d_extra_keys, d_extra_values).

    ``grad_lse`` (gradient of the returned logsumexp, or None) folds into delta: d lse / d score = P, so
    dS = P * (dP - (rowsum(dO * O) - grad_lse)). delta is computed inside the dq kernel. q, k, v are read in
    place when evenly strided (as in the forward); out, dO, dq share out's dense layout, dk and dv a dense one.
    """
    has_rpb = rpb is not None
    key = ("bwd", q.shape, k.shape, q.stride(), k.stride(), v.stride(), q.dtype, kernel_size, stride, dilation,
           is_causal, has_rpb)
    hit = _PLANS.get(key)
    if hit is None:
        layout = _Layout(q, k, v)
        dense_q, dense_k = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k))
        strides = (*layout.strides, *_dense_strides(dense_q), *_lse_strides(layout))
        geo = (q, k, kernel_size, stride, dilation, is_causal, has_rpb)
        hit = _PLANS[key] = (layout, _Plan(_na_bwd_dq_kernel, *geo, strides, "query"),
                             _Plan(_na_bwd_dkdv_kernel, *geo, (*strides, *_dense_strides(dense_k)), "key"))
    layout, dq_plan, dkdv_plan = hit
    if layout.copies is not None:
        q, k, v = layout.read(q, k, v)
    out = out.contiguous()
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    dense = torch.contiguous_format
    dq, dk, dv = (torch.empty_like(t, memory_format=dense) for t in (q, k, v))
    rpb_grad = has_rpb and need_rpb_grad
    rpb_f = rpb.float().contiguous() if has_rpb else lse
    drpb = torch.empty_like(rpb_f) if rpb_grad else lse  # zeroed right before each dq launch (time_fn)
    glse = grad_lse.float().contiguous() if grad_lse is not None else lse
    scalars = (scale * LOG2E, scale)
    dq_plan.launch((q, k, v, rpb_f, out, grad_out, lse, glse, delta, dq, drpb), scalars,
                   _DQ_VARIANTS[rpb_grad, grad_lse is not None], drpb.zero_ if rpb_grad else None)
    dkdv_plan.launch((q, k, v, rpb_f, grad_out, lse, delta, dk, dv), scalars)

    d_extra_k = d_extra_v = None
    if additional_keys is not None:
        # Extra tokens: dense over (queries x extras), in float32, with the same lse and delta.
        batch, heads, kv_heads, head_dim = q.shape[0], q.shape[-2], k.shape[-2], q.shape[-1]
        n = math.prod(q.shape[1:-2])
        s = _extra_scores(q, additional_keys, scale)
        p = torch.exp(s - lse[..., None])  # (B, *S, H, M)
        group = heads // kv_heads
        pg = p.reshape(batch, n, kv_heads, group, -1)
        dog = grad_out.float().reshape(batch, n, kv_heads, group, head_dim)
        qg = q.float().reshape(batch, n, kv_heads, group, head_dim)
        dp = torch.einsum("bnhgd,bmhd->bnhgm", dog, additional_values.float())
        ds = pg * (dp - delta.reshape(batch, n, kv_heads, group, 1))
        d_extra_v = torch.einsum("bnhgm,bnhgd->bmhd", pg, dog).to(additional_values.dtype)
        d_extra_k = (torch.einsum("bnhgm,bnhgd->bmhd", ds, qg) * scale).to(additional_keys.dtype)
        dq_extra = torch.einsum("bnhgm,bmhd->bnhgd", ds, additional_keys.float()) * scale
        dq = (dq.float() + dq_extra.reshape(q.shape)).to(q.dtype)
    drpb_out = drpb.to(rpb.dtype) if rpb_grad else None
    return dq, dk, dv, drpb_out, d_extra_k, d_extra_v
