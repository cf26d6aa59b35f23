"""Fused Triton kernels for routed (BiFormer) attention and its coarse routing. Imported lazily by routed.py.

Layout: q, k (B, H, W, heads, d_qk), v (B, H, W, heads, d_v); regions are rh x rw token rectangles with
row-major ids. Each attention program owns one (query region, query chunk, batch * head), or for tiny regions
G query regions stacked in one 16-row tile (a block-diagonal mask keeps each row to its own region's keys),
and walks the routed key regions straight from k and v: a key tile packs KR regions x KT tokens, addresses
computed from the region id read from the routing table, so no gathered copy ever exists. Online softmax in
base 2 (the Triton fused-attention tutorial's scheme); saved for backward: output and log2-sum-exp only.

Backward: dq walks the same key tiles as the forward. dk/dv are key-centric: an inverse routing table (for
every key region, the query regions that chose it, repeats included) built by one small kernel lets each
program own one key chunk (or, for tiny regions, 16 / T consecutive key regions whose lists lie back to back)
and accumulate over its queries, so nothing is written twice and no atomics are needed.

Small maps of tiny regions (BiFormer stage 3 at 224) run dense region-masked kernels instead (see the
section below): the routing becomes a bit mask per query region, keys are read once per query tile. There
``bilevel_routing_attention`` computes the routing as those bit masks directly (``routing_words``: per-head
partial affinities, then the top-k per row), and the attention kernels read one word per query.

Routing (``region_routing`` on this backend): for small maps one kernel does it all (region sums, affinity,
top-k); otherwise three: region sums of q and k (fp32), their affinity (a batched GEMM, fp32 accumulation),
the top-k of each row by repeated row maxima. Both write the index (int64) and the softmax of the kept
logits, in one or three launches where the torch formulation takes about eight.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._backend import triton_interpreting

try:  # programmatic dependent launch (sm_90+): Triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: the kernels run without it (PDL=False)
    gdc_launch_dependents = gdc_wait = None

_LOG2E = 1.4426950408889634

@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation; UPCAST works around the Triton 3.8 CPU interpreter, whose bf16 dot
    returns garbage (set only under TRITON_INTERPRET=1 with bf16 inputs)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _tile_coords(idx, n_tok, RH: tl.constexpr, RW: tl.constexpr, NW: tl.constexpr):
    """(row, col) on the map of token n_tok of region idx (row-major regions and tokens)."""
    return (idx // NW) * RH + n_tok // RW, (idx % NW) * RW + n_tok % RW


@triton.jit
def _load_rows(X, b, h, y, x, ok, sb, sy, sx, sh, offs, n_real):
    """(tokens, channels) tile of head h of batch element b at map positions (y, x); tokens outside ok and
    channels past n_real read as 0."""
    return tl.load(X + b * sb + y[:, None] * sy + x[:, None] * sx + h * sh + offs[None, :],
                   mask=ok[:, None] & (offs[None, :] < n_real), other=0.0)


@triton.jit
def _load_cols(X, b, h, y, x, ok, sb, sy, sx, sh, offs, n_real):
    """:func:`_load_rows` transposed, (channels, tokens), loaded in that order (a dot's right operand)."""
    return tl.load(X + b * sb + y[None, :] * sy + x[None, :] * sx + h * sh + offs[:, None],
                   mask=ok[None, :] & (offs[:, None] < n_real), other=0.0)


@triton.jit
def _store_rows(X, val, b, h, y, x, ok, sb, sy, sx, sh, offs, n_real):
    """Store a (tokens, channels) tile where :func:`_load_rows` reads it, cast to X's dtype."""
    tl.store(X + b * sb + y[:, None] * sy + x[:, None] * sx + h * sh + offs[None, :], val.to(X.dtype.element_ty),
             mask=ok[:, None] & (offs[None, :] < n_real))


@triton.jit
def _softmax_step(s, vt, m_i, l_i, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile of the online softmax: logits s (M, N, base 2), values vt (N, DV); running max m_i, sum l_i
    and output acc rescaled when the running max grows. Returns (m_i, l_i, acc)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, PREC, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _store_output(O, LSE, acc, m_i, l_i, m_ok, b, h, bh, qy, qx, W, NTOK, sob, soy, sox, soh, offs_dv, DV_REAL):
    """A forward's epilogue: the output rows acc / l_i (padding rows, with nothing accumulated, divide by 1) and
    LSE (B, heads, H*W) float32, base 2."""
    l_i = tl.where(m_ok, l_i, 1.0)
    _store_rows(O, acc / l_i[:, None], b, h, qy, qx, m_ok, sob, soy, sox, soh, offs_dv, DV_REAL)
    tl.store(LSE + bh * NTOK + qy * W + qx, m_i + tl.log2(l_i), mask=m_ok)


@triton.jit
def _store_dkdv(DK, DV_OUT, dk, dv, b, h, ky, kx, n_ok, W, NTOK, HEADS, offs_d, offs_dv, D_REAL, DV_REAL):
    """A dk/dv program's key rows into DK, DV_OUT (contiguous (B, H, W, heads, d)), cast to their dtypes."""
    tok_off = ((b * (NTOK // W) + ky) * W + kx) * HEADS + h
    tl.store(DK + tok_off[:, None] * D_REAL + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=n_ok[:, None] & (offs_d[None, :] < D_REAL))
    tl.store(DV_OUT + tok_off[:, None] * DV_REAL + offs_dv[None, :], dv.to(DV_OUT.dtype.element_ty),
             mask=n_ok[:, None] & (offs_dv[None, :] < DV_REAL))


@triton.jit
def _row_delta(do, o):
    """rowsum(dO * O) in float32, the softmax backward's correction term per query."""
    return tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)


@triton.jit
def _dq_step(dq, p, do, k, v, delta, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dq (M, D) plus one key tile's share: dS = P * (dO V^T - delta), dq += dS K (unscaled)."""
    ds = p * (_dot(do, tl.trans(v), PREC, UPCAST) - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, PREC, UPCAST)


@triton.jit
def _dkdv_step(dk, dv, pt, q, do, v, delta, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dk (N, D), dv (N, DV) plus one query tile's share, from the transposed probabilities pt (N, M):
    dv += P^T dO, dk += dS^T Q (unscaled)."""
    dv += _dot(pt.to(do.dtype), do, PREC, UPCAST)
    dst = pt * (_dot(v, tl.trans(do), PREC, UPCAST) - delta[None, :])
    return dk + _dot(dst.to(q.dtype), q, PREC, UPCAST), dv


# ---------------------------------------------------------------- routing


@triton.jit
def _region_sums(Q, K, SUMS, sqb, sqy, sqx, skb, sky, skx, B, R, C,
                 RH: tl.constexpr, RW: tl.constexpr, NW: tl.constexpr, T: tl.constexpr, TP: tl.constexpr,
                 RB: tl.constexpr, CB: tl.constexpr):
    """SUMS[0 / 1, b, r, c] = sum over region r's tokens of q / k (fp32), program (RB regions, CB channels, b)."""
    pr, pc, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    regs = pr * RB + tl.arange(0, RB)
    tok = tl.arange(0, TP)
    offs_c = pc * CB + tl.arange(0, CB)
    y, x = _tile_coords(regs[:, None], tok[None, :], RH, RW, NW)
    ok = ((regs < R)[:, None] & (tok < T)[None, :])[:, :, None] & (offs_c < C)[None, None, :]
    qs = tl.sum(tl.load(Q + b * sqb + (y * sqy + x * sqx)[:, :, None] + offs_c[None, None, :], mask=ok,
                        other=0.0).to(tl.float32), 1)
    ks = tl.sum(tl.load(K + b * skb + (y * sky + x * skx)[:, :, None] + offs_c[None, None, :], mask=ok,
                        other=0.0).to(tl.float32), 1)
    dst = (b * R + regs[:, None]) * C + offs_c[None, :]
    st_ok = (regs < R)[:, None] & (offs_c < C)[None, :]
    tl.store(SUMS + dst, qs, mask=st_ok)
    tl.store(SUMS + B * R * C + dst, ks, mask=st_ok)


@triton.jit
def _region_affinity(SUMS, LOGITS, B, R, C, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     PREC: tl.constexpr):
    """LOGITS[b] = q region sums (R, C) @ k region sums (R, C)^T, fp32 accumulation, (BM, BN) tiles."""
    pm, pn, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, C, BK):
        kk = k0 + tl.arange(0, BK)
        a = tl.load(SUMS + (b * R + rm[:, None]) * C + kk[None, :], mask=(rm < R)[:, None] & (kk < C)[None, :],
                    other=0.0)
        bt = tl.load(SUMS + B * R * C + (b * R + rn[None, :]) * C + kk[:, None],
                     mask=(rn < R)[None, :] & (kk < C)[:, None], other=0.0)
        acc += tl.dot(a, bt, input_precision=PREC)
    tl.store(LOGITS + (b * R + rm[:, None]) * R + rn[None, :], acc, mask=(rm < R)[:, None] & (rn < R)[None, :])


@triton.jit
def _region_topk_rows(LOGITS, IDX, WEIGHT, NROWS, R, scale, TOPK: tl.constexpr, KP: tl.constexpr,
                      RB: tl.constexpr, RP: tl.constexpr):
    """Top-k and kept-logit softmax of RB affinity rows (b * R + r) per program (logits times scale)."""
    rows = tl.program_id(0) * RB + tl.arange(0, RB)
    cols = tl.arange(0, RP)
    ok = rows < NROWS
    logits = tl.load(LOGITS + rows[:, None] * R + cols[None, :], mask=ok[:, None] & (cols < R)[None, :], other=0.0)
    # rows of all batch elements are contiguous: batch element 0 with row ids b * R + r
    _topk_softmax_store(logits * scale, rows, cols, ok, cols < R, IDX, WEIGHT, 0, R, TOPK, KP, RB, RP)


@triton.jit
def _region_routing_fused(Q, K, IDX, WEIGHT, sqb, sqy, sqx, skb, sky, skx, R, C, inv_t, scale,
                          RH: tl.constexpr, RW: tl.constexpr, NW: tl.constexpr, T: tl.constexpr, TP: tl.constexpr,
                          TOPK: tl.constexpr, KP: tl.constexpr, RB: tl.constexpr, RP: tl.constexpr,
                          CB: tl.constexpr, PREC: tl.constexpr):
    """The whole routing of RB query regions in one program: means of their q regions and of every k region
    over (regions, all T tokens, CB channels) slices (fp32 sums), affinity, top-k, softmax. Every program of a
    batch element recomputes the key-region means: for small maps re-reading k from L2 beats a second launch.
    The next channel slice is loaded before the current one is reduced, so two are in flight."""
    pid, b = tl.program_id(0), tl.program_id(1)
    rows = pid * RB + tl.arange(0, RB)
    cols = tl.arange(0, RP)
    r_ok, s_ok = rows < R, cols < R
    tok = tl.arange(0, TP)
    t_ok = tok < T
    qy, qx = _tile_coords(rows[:, None], tok[None, :], RH, RW, NW)
    ky, kx = _tile_coords(cols[:, None], tok[None, :], RH, RW, NW)
    q_ptr = Q + b * sqb + (qy * sqy + qx * sqx)[:, :, None]
    k_ptr = K + b * skb + (ky * sky + kx * skx)[:, :, None]
    q_ok = (r_ok[:, None] & t_ok[None, :])[:, :, None]
    k_ok = (s_ok[:, None] & t_ok[None, :])[:, :, None]
    offs_c = tl.arange(0, CB)[None, None, :]
    q_next = tl.load(q_ptr + offs_c, mask=q_ok & (offs_c < C), other=0.0)
    k_next = tl.load(k_ptr + offs_c, mask=k_ok & (offs_c < C), other=0.0)
    logits = tl.zeros([RB, RP], tl.float32)
    for c0 in range(0, C, CB):
        q_cur, k_cur = q_next, k_next
        c_next = c0 + CB + offs_c  # past C on the last slice: masked, nothing read
        q_next = tl.load(q_ptr + c_next, mask=q_ok & (c_next < C), other=0.0)
        k_next = tl.load(k_ptr + c_next, mask=k_ok & (c_next < C), other=0.0)
        q_mean = tl.sum(q_cur.to(tl.float32), 1) * inv_t
        k_mean = tl.sum(k_cur.to(tl.float32), 1) * inv_t
        logits += tl.dot(q_mean, tl.trans(k_mean), input_precision=PREC)
    _topk_softmax_store(logits * scale, rows, cols, r_ok, s_ok, IDX, WEIGHT, b, R, TOPK, KP, RB, RP)


@triton.jit
def _topk_pick(logits, cols, s_ok, TOPK: tl.constexpr, KP: tl.constexpr, RB: tl.constexpr, RP: tl.constexpr,
               WORDS: tl.constexpr):
    """Top-k of each row of logits (RB, RP), columns past s_ok excluded (decreasing; ties to the lower id).
    Returns (columns (RB, KP) int32 and values (RB, KP) fp32, picks in slots 0 .. TOPK-1; the routing word
    (RB,) int64 with bit c set for each picked column c when WORDS (RP <= 64), else 0)."""
    # One pick = a row maximum, then the lowest column holding it (two 32-bit reductions: cheaper than one
    # reduction over 64-bit (value, column) keys); the picked column leaves the row.
    vals = tl.where(s_ok[None, :], logits, float("-inf"))
    slots = tl.arange(0, KP)
    top_col = tl.zeros([RB, KP], tl.int32)
    top_val = tl.zeros([RB, KP], tl.float32)
    word = tl.zeros([RB], tl.int64)
    for j in range(TOPK):
        best = tl.max(vals, 1)
        col = tl.min(tl.where(vals == best[:, None], cols[None, :], RP), 1)
        top_col = tl.where(slots[None, :] == j, col[:, None], top_col)
        top_val = tl.where(slots[None, :] == j, best[:, None], top_val)
        vals = tl.where(cols[None, :] == col[:, None], float("-inf"), vals)
        if WORDS:
            word = word | (tl.full([RB], 1, tl.int64) << col.to(tl.int64))
    return top_col, top_val, word


@triton.jit
def _topk_softmax_store(logits, rows, cols, r_ok, s_ok, IDX, WEIGHT, b, R,
                        TOPK: tl.constexpr, KP: tl.constexpr, RB: tl.constexpr, RP: tl.constexpr):
    """Top-k of each row of logits (RB, RP) (decreasing; ties to the lower id), then the softmax of the kept
    logits; stores rows ``rows`` of the index (int64) and weight of batch element b."""
    top_idx, top_val, _ = _topk_pick(logits, cols, s_ok, TOPK, KP, RB, RP, False)
    # softmax of the kept logits; the first kept one is the row maximum
    slots = tl.arange(0, KP)
    kept = slots[None, :] < TOPK
    first = tl.sum(tl.where(slots[None, :] == 0, top_val, 0.0), 1)
    e = tl.where(kept, tl.exp(tl.where(kept, top_val, 0.0) - first[:, None]), 0.0)
    weight = e / tl.sum(e, 1)[:, None]
    out_ok = r_ok[:, None] & kept
    offs = (b * R + rows[:, None]) * TOPK + slots[None, :]
    tl.store(IDX + offs, top_idx.to(tl.int64), mask=out_ok)
    tl.store(WEIGHT + offs, weight.to(WEIGHT.dtype.element_ty), mask=out_ok)


def region_routing_triton(q: torch.Tensor, k: torch.Tensor, nh: int, nw: int, topk: int,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused coarse routing (validated inputs; see :func:`attnzoo.kernels.region_routing`): (weight, index)."""
    q, k = _last_contiguous(q), _last_contiguous(k)
    b, h, w, c = q.shape
    r, rh, rw = nh * nw, h // nh, w // nw
    t = rh * rw
    index = torch.empty(b, r, topk, device=q.device, dtype=torch.int64)
    weight = torch.empty(b, r, topk, device=q.device, dtype=q.dtype)
    rp = max(16, _pow2(r))
    # fp32 inputs: exact fp32 logits; half inputs: tf32 dots, still finer than the torch ops' half rounding.
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    if fused_routing(h * w * c, r, t):
        tp = _pow2(t)
        cb = max(16, min(_pow2(c), FUSED_ROUTING_SLICE // (tp * rp)))
        _region_routing_fused[(triton.cdiv(r, 16), b)](
            q, k, index, weight, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            r, c, 1.0 / t, scale, RH=rh, RW=rw, NW=nw, T=t, TP=tp, TOPK=topk, KP=_pow2(topk), RB=16, RP=rp, CB=cb,
            PREC=prec, num_warps=FUSED_ROUTING_WARPS)
        return weight, index
    # region sums, their affinity (a small batched GEMM), the top-k of each row: three launches with enough
    # programs each to fill the GPU (programmatic dependent launch measured 0-25% slower here)
    tp = _pow2(t)
    cb = min(_pow2(c), 32)
    rb = max(1, min(16, 4096 // (tp * cb)))
    sums = torch.empty(2, b, r, c, device=q.device, dtype=torch.float32)
    logits = torch.empty(b, r, r, device=q.device, dtype=torch.float32)
    _region_sums[(triton.cdiv(r, rb), triton.cdiv(c, cb), b)](
        q, k, sums, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), b, r, c,
        RH=rh, RW=rw, NW=nw, T=t, TP=tp, RB=rb, CB=cb, num_warps=1)
    bm = min(64, max(16, _pow2(r)))
    _region_affinity[(triton.cdiv(r, bm), triton.cdiv(r, bm), b)](
        sums, logits, b, r, c, BM=bm, BN=bm, BK=min(64, max(16, _pow2(c))), PREC=prec, num_warps=4)
    _region_topk_rows[(triton.cdiv(b * r, ROUTING_TOPK_ROWS),)](
        logits, index, weight, b * r, r, scale / (t * t), TOPK=topk, KP=_pow2(topk), RB=ROUTING_TOPK_ROWS, RP=rp,
        num_warps=1)
    return weight, index


# ---------------------------------------------------------------- attention


@triton.jit
def _group_rows(pid, R, MT: tl.constexpr, BLOCK_M: tl.constexpr, T: tl.constexpr, G: tl.constexpr,
                RH: tl.constexpr, RW: tl.constexpr, NW: tl.constexpr):
    """Query rows of a sparse-kernel program: chunk pid % MT of region pid // MT (G = 1), or G consecutive
    query regions of tiny regions stacked in one tile (MT = 1, row i in region r0 + i // T). Returns (first
    region r0, each row's region offset 0 .. G-1, rows in range, row, col)."""
    r0 = (pid // MT) * G
    offs_m = (pid % MT) * BLOCK_M + tl.arange(0, BLOCK_M)
    grp = offs_m // T
    m_ok = (grp < G) & (r0 + grp < R)
    qy, qx = _tile_coords(r0 + grp, offs_m % T, RH, RW, NW)
    return r0, grp, m_ok, qy, qx


@triton.jit
def _group_keys(IDX, b, r0, s0, t0, offs_n, R, sib, sir, sis, TOPK: tl.constexpr, T: tl.constexpr,
                KR: tl.constexpr, KT: tl.constexpr, G: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
                NW: tl.constexpr):
    """Key columns of one step: for each of the G query regions (column block c // (KR * KT)), KR of its
    routed regions (slots s0 ..) x KT tokens (t0 ..). Returns (each column's query-region offset, in range,
    row, col)."""
    kgrp = offs_n // (KR * KT)
    slot = s0 + (offs_n // KT) % KR
    tok = t0 + offs_n % KT
    slot_ok = (slot < TOPK) & (r0 + kgrp < R)
    reg = tl.load(IDX + b * sib + (r0 + kgrp) * sir + slot * sis, mask=slot_ok, other=0).to(tl.int32)
    ky, kx = _tile_coords(reg, tok, RH, RW, NW)
    return kgrp, slot_ok & (tok < T), ky, kx


@triton.jit
def _routed_fwd(Q, K, V, IDX, O, LSE,
                sqb, sqy, sqx, sqh, skb, sky, skx, skh, svb, svy, svx, svh,
                sib, sir, sis, sob, soy, sox, soh,
                W, NTOK, HEADS, R, scale_log2, D_REAL, DV_REAL,
                RH: tl.constexpr, RW: tl.constexpr, NW: tl.constexpr, T: tl.constexpr, MT: tl.constexpr,
                TOPK: tl.constexpr, BLOCK_M: tl.constexpr, KT: tl.constexpr, KR: tl.constexpr, G: tl.constexpr,
                D: tl.constexpr, DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // HEADS, bh % HEADS
    r0, grp, m_ok, qy, qx = _group_rows(pid, R, MT, BLOCK_M, T, G, RH, RW, NW)
    offs_d, offs_dv = tl.arange(0, D), tl.arange(0, DV)
    offs_n = tl.arange(0, G * KR * KT)
    q = _load_rows(Q, b, h, qy, qx, m_ok, sqb, sqy, sqx, sqh, offs_d, D_REAL)
    # finite start: with G > 1 a row may see no key of its own in a step
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    for s0 in range(0, TOPK, KR):
        for t0 in range(0, T, KT):
            kgrp, n_ok, ky, kx = _group_keys(IDX, b, r0, s0, t0, offs_n, R, sib, sir, sis, TOPK, T, KR, KT, G,
                                             RH, RW, NW)
            kt = _load_cols(K, b, h, ky, kx, n_ok, skb, sky, skx, skh, offs_d, D_REAL)  # (D, N)
            s = _dot(q, kt, PREC, UPCAST) * scale_log2
            keep = n_ok[None, :]
            if G > 1:  # block-diagonal: each row sees its own query region's keys only
                keep = keep & (grp[:, None] == kgrp[None, :])
            s = tl.where(keep, s, float("-inf"))
            vt = _load_rows(V, b, h, ky, kx, n_ok, svb, svy, svx, svh, offs_dv, DV_REAL)  # (N, DV)
            m_i, l_i, acc = _softmax_step(s, vt, m_i, l_i, acc, PREC, UPCAST)
    _store_output(O, LSE, acc, m_i, l_i, m_ok, b, h, bh, qy, qx, W, NTOK, sob, soy, sox, soh, offs_dv, DV_REAL)


@triton.jit
def _routed_bwd_dq(Q, K, V, IDX, DO, O, LSE, DELTA, DQ,
                   sqb, sqy, sqx, sqh, skb, sky, skx, skh, svb, svy, svx, svh,
                   sib, sir, sis, sdob, sdoy, sdox, sdoh, sob, soy, sox, soh,
                   W, NTOK, HEADS, R, scale_log2, scale, D_REAL, DV_REAL,
                   RH: tl.constexpr, RW: tl.constexpr, NW: tl.constexpr, T: tl.constexpr, MT: tl.constexpr,
                   TOPK: tl.constexpr, BLOCK_M: tl.constexpr, KT: tl.constexpr, KR: tl.constexpr, G: tl.constexpr,
                   D: tl.constexpr, DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // HEADS, bh % HEADS
    r0, grp, m_ok, qy, qx = _group_rows(pid, R, MT, BLOCK_M, T, G, RH, RW, NW)
    offs_d, offs_dv = tl.arange(0, D), tl.arange(0, DV)
    offs_n = tl.arange(0, G * KR * KT)
    q = _load_rows(Q, b, h, qy, qx, m_ok, sqb, sqy, sqx, sqh, offs_d, D_REAL)
    do = _load_rows(DO, b, h, qy, qx, m_ok, sdob, sdoy, sdox, sdoh, offs_dv, DV_REAL)
    o = _load_rows(O, b, h, qy, qx, m_ok, sob, soy, sox, soh, offs_dv, DV_REAL)
    delta = _row_delta(do, o)  # reused by the dk/dv pass
    tl.store(DELTA + bh * NTOK + qy * W + qx, delta, mask=m_ok)
    lse = tl.load(LSE + bh * NTOK + qy * W + qx, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for s0 in range(0, TOPK, KR):
        for t0 in range(0, T, KT):
            kgrp, n_ok, ky, kx = _group_keys(IDX, b, r0, s0, t0, offs_n, R, sib, sir, sis, TOPK, T, KR, KT, G,
                                             RH, RW, NW)
            k = _load_rows(K, b, h, ky, kx, n_ok, skb, sky, skx, skh, offs_d, D_REAL)  # (N, D)
            v = _load_rows(V, b, h, ky, kx, n_ok, svb, svy, svx, svh, offs_dv, DV_REAL)  # (N, DV)
            s = _dot(q, tl.trans(k), PREC, UPCAST) * scale_log2
            keep = n_ok[None, :]
            if G > 1:
                keep = keep & (grp[:, None] == kgrp[None, :])
            p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
            dq = _dq_step(dq, p, do, k, v, delta, PREC, UPCAST)
    _store_rows(DQ, (dq * scale), b, h, qy, qx, m_ok, sqb, sqy, sqx, sqh, offs_d, D_REAL)


@triton.jit
def _inverse_hits(IDX, b, rows, keys, sib, sir, sis, R, TOPK: tl.constexpr, KP: tl.constexpr):
    """(rows, key regions) counts of how often each routing row of the tile names each key region, and the
    tile's entries naming a region below keys[0]."""
    slots = tl.arange(0, KP)
    tile = tl.load(IDX + b * sib + rows[:, None] * sir + slots[None, :] * sis,
                   mask=(rows < R)[:, None] & (slots < TOPK)[None, :], other=-1).to(tl.int32)
    hits = tl.zeros([rows.shape[0], keys.shape[0]], tl.int32)
    for j in range(TOPK):
        col = tl.sum(tl.where(slots[None, :] == j, tile, 0), 1)
        hits += (col[:, None] == keys[None, :]).to(tl.int32)
    below = tl.sum(tl.sum(((tile >= 0) & (tile < tl.min(keys, 0))).to(tl.int32), 1), 0)
    return hits, below


@triton.jit
def _routed_inverse(IDX, STARTS, COUNTS, QLIST, sib, sir, sis, R,
                    TOPK: tl.constexpr, KP: tl.constexpr, SB: tl.constexpr, RQ: tl.constexpr,
                    ONE_TILE: tl.constexpr):
    """Inverse routing table of one batch element, for SB key regions: the query regions that chose each one
    (a region chosen twice by one query region is listed twice), stored contiguously in key-region order
    in the batch's segment QLIST[b * R * TOPK:], with STARTS / COUNTS per (batch, key region). The routing
    table is read in (RQ, topk) tiles: one read where one tile holds it all (ONE_TILE: R <= RQ), else a
    counting pass, then a placing pass. Bound by load latency."""
    pid, b = tl.program_id(0), tl.program_id(1)
    keys = pid * SB + tl.arange(0, SB)
    keys_ok = keys < R
    offs_r = tl.arange(0, RQ)
    if ONE_TILE:
        hits, before = _inverse_hits(IDX, b, offs_r, keys, sib, sir, sis, R, TOPK, KP)
        counts = tl.sum(hits, 0)
    else:
        before = 0  # entries naming a key region before this chunk: where the chunk's lists start
        counts = tl.zeros([SB], tl.int32)
        for r0 in range(0, R, RQ):  # counting pass
            hits, below = _inverse_hits(IDX, b, r0 + offs_r, keys, sib, sir, sis, R, TOPK, KP)
            before += below
            counts += tl.sum(hits, 0)
    starts = b * R * TOPK + before + tl.cumsum(counts, 0) - counts
    tl.store(STARTS + b * R + keys, starts, mask=keys_ok)
    tl.store(COUNTS + b * R + keys, counts, mask=keys_ok)
    filled = tl.zeros([SB], tl.int32)
    for r0 in range(0, R, RQ):  # place each query region in each list it belongs to, in row order
        rows = r0 + offs_r
        if not ONE_TILE:
            hits, _ = _inverse_hits(IDX, b, rows, keys, sib, sir, sis, R, TOPK, KP)
        pos = starts[None, :] + filled[None, :] + tl.cumsum(hits, 0) - hits
        for c in range(0, tl.max(tl.max(hits, 1), 0)):  # a region named c+1 times by a row gets c+1 entries
            tl.store(QLIST + pos + c, rows[:, None] + tl.zeros([RQ, SB], tl.int32), mask=hits > c)
        filled += tl.sum(hits, 0)


@triton.jit
def _routed_bwd_dkdv(Q, K, V, DO, LSE, DELTA, STARTS, COUNTS, QLIST, DK, DV_OUT,
                     sqb, sqy, sqx, sqh, skb, sky, skx, skh, svb, svy, svx, svh,
                     sdob, sdoy, sdox, sdoh,
                     W, NTOK, HEADS, R, scale_log2, scale, D_REAL, DV_REAL,
                     RH: tl.constexpr, RW: tl.constexpr, NW: tl.constexpr, T: tl.constexpr, NT: tl.constexpr,
                     BLOCK_N: tl.constexpr, QT: tl.constexpr, QE: tl.constexpr, G: tl.constexpr,
                     D: tl.constexpr, DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dk, dv of G consecutive key regions (G > 1 only for tiny regions: G * T = BLOCK_N, so no key row is
    padding), or of one BLOCK_N chunk of one region. Their inverse lists lie back to back in QLIST, so the
    program walks one range of entries, QE per step; an entry's pairs count only against the key rows of the
    region whose list it belongs to."""
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // HEADS, bh % HEADS
    kr0, nt = (pid // NT) * G, pid % NT
    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    row_region = offs_n // T  # 0 .. G-1: which of the program's key regions a key row belongs to
    n_ok = (row_region < G) & (kr0 + row_region < R)
    ky, kx = _tile_coords(kr0 + row_region, offs_n % T, RH, RW, NW)
    offs_d, offs_dv = tl.arange(0, D), tl.arange(0, DV)
    offs_m = tl.arange(0, QE * QT)
    # the query regions that routed to these key regions (one entry per choice, repeats included)
    last = tl.minimum(kr0 + G, R) - 1
    start = tl.load(STARTS + b * R + kr0)
    end = tl.load(STARTS + b * R + last) + tl.load(COUNTS + b * R + last)
    if G > 1:
        offs_g = tl.arange(0, G)
        list_starts = tl.load(STARTS + b * R + kr0 + offs_g, mask=(kr0 + offs_g < R) & (offs_g > 0), other=end)
    k = _load_rows(K, b, h, ky, kx, n_ok, skb, sky, skx, skh, offs_d, D_REAL)
    v = _load_rows(V, b, h, ky, kx, n_ok, svb, svy, svx, svh, offs_dv, DV_REAL)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, DV], tl.float32)
    for e0 in range(start, end, QE):
        entry = e0 + offs_m // QT
        e_ok = entry < end
        qr = tl.load(QLIST + entry, mask=e_ok, other=0)
        for t0 in range(0, T, QT):
            tok = t0 + offs_m % QT
            m_ok = e_ok & (tok < T)
            qy, qx = _tile_coords(qr, tok, RH, RW, NW)
            q = _load_rows(Q, b, h, qy, qx, m_ok, sqb, sqy, sqx, sqh, offs_d, D_REAL)  # (M, D)
            do = _load_rows(DO, b, h, qy, qx, m_ok, sdob, sdoy, sdox, sdoh, offs_dv, DV_REAL)  # (M, DV)
            lse = tl.load(LSE + bh * NTOK + qy * W + qx, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + bh * NTOK + qy * W + qx, mask=m_ok, other=0.0)
            st = _dot(k, tl.trans(q), PREC, UPCAST) * scale_log2  # (N, M)
            keep = m_ok[None, :]
            if G > 1:  # the entry's list: how many of the later lists start at or before it
                owner = tl.sum((entry[:, None] >= list_starts[None, :]).to(tl.int32), 1)
                keep = keep & (row_region[:, None] == owner[None, :])
            pt = tl.where(keep, tl.exp2(st - lse[None, :]), 0.0)
            dk, dv = _dkdv_step(dk, dv, pt, q, do, v, delta, PREC, UPCAST)
    _store_dkdv(DK, DV_OUT, dk * scale, dv, b, h, ky, kx, n_ok, W, NTOK, HEADS, offs_d, offs_dv, D_REAL, DV_REAL)


# ---------------------------------------------------------------- dense region-masked kernels (tiny regions)
#
# For small maps with tiny regions (BiFormer stage 3: 2x2-token regions, topk / regions ~ 1/3) each query
# region's tile would be 16 rows of which T are real, and each key region would be read once per query region
# that chose it. There, tiles of BLOCK_M queries x BLOCK_N keys in region order (token i of the map-in-region-
# order lies in region i // T) run against every key tile, and the routing becomes a mask: bit s of a query
# region's 64-bit word says whether region s is routed (so at most 64 regions). A routing row that names a
# region twice (a gather would count it twice) sets the row's repeat flag; tiles with such rows weigh each
# pair by its multiplicity instead, counted from the routing table (exact, slower, never taken for torch.topk
# indices).


@triton.jit
def _route_words(IDX, b, qr, ok, sib, sir, sis, TOPK: tl.constexpr, BLOCK: tl.constexpr):
    """Routing words of BLOCK query rows (regions qr): (bit r set = region r routed, int64; 1 where the row
    names a region twice, int32)."""
    word = tl.zeros([BLOCK], tl.int64)
    rep = tl.zeros([BLOCK], tl.int32)
    for j in range(TOPK):
        reg = tl.load(IDX + b * sib + qr * sir + j * sis, mask=ok, other=0).to(tl.int64)
        bit = tl.where(ok, tl.full([BLOCK], 1, tl.int64) << reg, 0)
        rep = tl.where((word & bit) != 0, 1, rep)
        word = word | bit
    return word, rep


@triton.jit
def _mask_routes(s, field, shift, any_rep, idx_ptrs, idx_ok, kr, sis, TOPK: tl.constexpr):
    """Routing mask on a logits tile s (base-2 units). field (query regions' words shifted to the key tile's
    first region, int32) and idx_ptrs broadcast along the key axis, shift (key region - first region) and kr
    along the query axis. Pairs outside the routing get -inf; with repeats, log2(multiplicity) is added."""
    if any_rep != 0:
        count = tl.zeros(s.shape, tl.int32)
        for j in range(TOPK):
            reg = tl.load(idx_ptrs + j * sis, mask=idx_ok, other=-1)
            count += (reg == kr).to(tl.int32)
        s = tl.where(count > 0, s + tl.log2(tl.maximum(count, 1).to(tl.float32)), float("-inf"))
    else:
        s = tl.where(((field >> shift) & 1) != 0, s, float("-inf"))
    return s


@triton.jit
def _region_order_tile(start, BLOCK: tl.constexpr, R, T, RH: tl.constexpr, RW: tl.constexpr, NW: tl.constexpr):
    """Tokens start .. start + BLOCK of the map taken in region order (token i lies in region i // T): (in range,
    region, row, col)."""
    offs = start + tl.arange(0, BLOCK)
    region = offs // T
    row, col = _tile_coords(region, offs % T, RH, RW, NW)
    return offs < R * T, region, row, col


@triton.jit
def _routed_dense_fwd(Q, K, V, IDX, WORDS, O, LSE,
                      sqb, sqy, sqx, sqh, skb, sky, skx, skh, svb, svy, svx, svh,
                      sib, sir, sis, sob, soy, sox, soh,
                      W, NTOK, HEADS, scale_log2, D_REAL, DV_REAL,
                      RH: tl.constexpr, RW: tl.constexpr, NW: tl.constexpr, T: tl.constexpr, R: tl.constexpr,
                      TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      D: tl.constexpr, DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                      WORDS_IN: tl.constexpr, PDL: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // HEADS, bh % HEADS
    m_ok, qr, qy, qx = _region_order_tile(pid * BLOCK_M, BLOCK_M, R, T, RH, RW, NW)  # query tokens in region order
    offs_d, offs_dv = tl.arange(0, D), tl.arange(0, DV)
    if PDL:
        gdc_wait()  # the routing words (everything above is index arithmetic)
    q = _load_rows(Q, b, h, qy, qx, m_ok, sqb, sqy, sqx, sqh, offs_d, D_REAL)
    if WORDS_IN:  # written by the routing kernel (_routing_words): one load instead of TOPK
        word = tl.load(WORDS + (b * R + qr) * 2, mask=m_ok, other=0)
        any_rep = 0
    else:
        word, rep = _route_words(IDX, b, qr, m_ok, sib, sir, sis, TOPK, BLOCK_M)
        any_rep = tl.max(rep, 0)
    idx_ptrs = IDX + b * sib + qr[:, None] * sir
    # finite start: a row with no routed key in a tile keeps p = 0 instead of exp2(-inf - -inf)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    for n0 in range(0, R * T, BLOCK_N):
        n_ok, kr, ky, kx = _region_order_tile(n0, BLOCK_N, R, T, RH, RW, NW)
        base = n0 // T
        field = ((word >> base) & 0x7FFFFFFF).to(tl.int32)
        kt = _load_cols(K, b, h, ky, kx, n_ok, skb, sky, skx, skh, offs_d, D_REAL)  # (D, N)
        s = _dot(q, kt, PREC, UPCAST) * scale_log2
        s = _mask_routes(s, field[:, None], (kr - base)[None, :], any_rep, idx_ptrs, m_ok[:, None], kr[None, :],
                         sis, TOPK)
        vt = _load_rows(V, b, h, ky, kx, n_ok, svb, svy, svx, svh, offs_dv, DV_REAL)  # (N, DV)
        m_i, l_i, acc = _softmax_step(s, vt, m_i, l_i, acc, PREC, UPCAST)
    _store_output(O, LSE, acc, m_i, l_i, m_ok, b, h, bh, qy, qx, W, NTOK, sob, soy, sox, soh, offs_dv, DV_REAL)


@triton.jit
def _routing_partials(Q, K, PARTIAL, sqb, sqy, sqx, sqh, skb, sky, skx, skh, HEADS, QT, D_REAL,
                      RH: tl.constexpr, RW: tl.constexpr, NW: tl.constexpr, T: tl.constexpr, TP: tl.constexpr,
                      R: tl.constexpr, RQ: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, RPREC: tl.constexpr,
                      PDL: tl.constexpr):
    """Program (b, group of RQ query regions, head h): PARTIAL[b, group, h] = (RQ, RP) affinity of the group's
    query regions with every key region over head h's channels, from region sums (the top-k ignores a positive
    scale, so sums stand for means). Spreading the channel reduction over the heads keeps every program to one
    head's slice of the map: with BiFormer stage 3 at 224, 1024 one-warp programs instead of 128 that each
    read a whole batch element. PDL: launched as a programmatic dependent launch (see :func:`_pdl`)."""
    if PDL:
        gdc_launch_dependents()  # the top-k kernel may launch now; it waits for this grid before reading
        gdc_wait()  # q and k come from the previous kernel
    item = tl.program_id(0)
    h = item % HEADS
    g = item // HEADS
    b = g // QT
    rows = tl.arange(0, RQ)
    cols = tl.arange(0, RP)
    rq = (g % QT) * RQ + rows
    tok = tl.arange(0, TP)
    offs_d = tl.arange(0, D)[None, None, :]
    d_ok = offs_d < D_REAL
    qy, qx = _tile_coords(rq[:, None], tok[None, :], RH, RW, NW)
    qs = tl.load(Q + b * sqb + (qy * sqy + qx * sqx)[:, :, None] + h * sqh + offs_d,
                 mask=((rq < R)[:, None] & (tok < T)[None, :])[:, :, None] & d_ok, other=0.0)
    ky, kx = _tile_coords(cols[:, None], tok[None, :], RH, RW, NW)
    ks = tl.load(K + b * skb + (ky * sky + kx * skx)[:, :, None] + h * skh + offs_d,
                 mask=((cols < R)[:, None] & (tok < T)[None, :])[:, :, None] & d_ok, other=0.0)
    part = tl.dot(tl.sum(qs.to(tl.float32), 1), tl.trans(tl.sum(ks.to(tl.float32), 1)), input_precision=RPREC)
    tl.store(PARTIAL + (item * RQ + rows[:, None]) * RP + cols[None, :], part)


@triton.jit
def _routing_topk_words(PARTIAL, IDX, WORDS, HEADS, QT, NROWS,
                        R: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr, RQ: tl.constexpr, RP: tl.constexpr,
                        RB: tl.constexpr, PDL: tl.constexpr):
    """RB routing rows (b * R + r) per program: the heads' partial affinities summed in head order, their
    top-k as IDX[b, r, :] (decreasing) and as the routing word WORDS[b, r] = (bit s set = key region s, 0)."""
    rows = tl.program_id(0) * RB + tl.arange(0, RB)
    ok = rows < NROWS
    b, r = rows // R, rows % R
    base = ((b * QT + r // RQ) * HEADS * RQ + r % RQ) * RP  # PARTIAL[b, group, head 0, row, 0]
    cols = tl.arange(0, RP)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()  # the partials
    logits = tl.zeros([RB, RP], tl.float32)
    for hh in range(0, HEADS):
        logits += tl.load(PARTIAL + base[:, None] + hh * RQ * RP + cols[None, :], mask=ok[:, None], other=0.0)
    top_idx, _, word = _topk_pick(logits, cols, cols < R, TOPK, KP, RB, RP, True)
    slots = tl.arange(0, KP)
    tl.store(IDX + rows[:, None] * TOPK + slots[None, :], top_idx.to(tl.int64),
             mask=ok[:, None] & (slots[None, :] < TOPK))
    tl.store(WORDS + rows * 2, word, mask=ok)
    tl.store(WORDS + rows * 2 + 1, tl.zeros([RB], tl.int64), mask=ok)


@triton.jit
def _routed_dense_bwd_dq(Q, K, V, IDX, DO, O, LSE, DELTA, WORDS, DQ,
                         sqb, sqy, sqx, sqh, skb, sky, skx, skh, svb, svy, svx, svh,
                         sib, sir, sis, sdob, sdoy, sdox, sdoh, sob, soy, sox, soh,
                         W, NTOK, HEADS, scale_log2, scale, D_REAL, DV_REAL,
                         RH: tl.constexpr, RW: tl.constexpr, NW: tl.constexpr, T: tl.constexpr, R: tl.constexpr,
                         TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         D: tl.constexpr, DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                         WORDS_IN: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // HEADS, bh % HEADS
    m_ok, qr, qy, qx = _region_order_tile(pid * BLOCK_M, BLOCK_M, R, T, RH, RW, NW)
    offs_d, offs_dv = tl.arange(0, D), tl.arange(0, DV)
    q = _load_rows(Q, b, h, qy, qx, m_ok, sqb, sqy, sqx, sqh, offs_d, D_REAL)
    do = _load_rows(DO, b, h, qy, qx, m_ok, sdob, sdoy, sdox, sdoh, offs_dv, DV_REAL)
    o = _load_rows(O, b, h, qy, qx, m_ok, sob, soy, sox, soh, offs_dv, DV_REAL)
    delta = _row_delta(do, o)  # reused by the dk/dv pass
    tl.store(DELTA + bh * NTOK + qy * W + qx, delta, mask=m_ok)
    lse = tl.load(LSE + bh * NTOK + qy * W + qx, mask=m_ok, other=0.0)
    if WORDS_IN:  # written by the routing-words kernels (bilevel_routing_attention)
        word = tl.load(WORDS + (b * R + qr) * 2, mask=m_ok, other=0)
        rep = tl.load(WORDS + (b * R + qr) * 2 + 1, mask=m_ok, other=0).to(tl.int32)
    else:
        word, rep = _route_words(IDX, b, qr, m_ok, sib, sir, sis, TOPK, BLOCK_M)
        # the routing words and repeat flags of every query region, for the dk/dv pass (written by head 0)
        tl.store(WORDS + (b * R + qr) * 2, word, mask=m_ok & (h == 0))
        tl.store(WORDS + (b * R + qr) * 2 + 1, rep.to(tl.int64), mask=m_ok & (h == 0))
    any_rep = tl.max(rep, 0)
    idx_ptrs = IDX + b * sib + qr[:, None] * sir
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(0, R * T, BLOCK_N):
        n_ok, kr, ky, kx = _region_order_tile(n0, BLOCK_N, R, T, RH, RW, NW)
        base = n0 // T
        field = ((word >> base) & 0x7FFFFFFF).to(tl.int32)
        k = _load_rows(K, b, h, ky, kx, n_ok, skb, sky, skx, skh, offs_d, D_REAL)  # (N, D)
        v = _load_rows(V, b, h, ky, kx, n_ok, svb, svy, svx, svh, offs_dv, DV_REAL)  # (N, DV)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * scale_log2
        s = _mask_routes(s, field[:, None], (kr - base)[None, :], any_rep, idx_ptrs, m_ok[:, None], kr[None, :],
                         sis, TOPK)
        p = tl.exp2(s - lse[:, None])
        dq = _dq_step(dq, p, do, k, v, delta, PREC, UPCAST)
    _store_rows(DQ, (dq * scale), b, h, qy, qx, m_ok, sqb, sqy, sqx, sqh, offs_d, D_REAL)


@triton.jit
def _routed_dense_bwd_dkdv(Q, K, V, IDX, DO, LSE, DELTA, WORDS, DK, DV_OUT,
                           sqb, sqy, sqx, sqh, skb, sky, skx, skh, svb, svy, svx, svh,
                           sib, sir, sis, sdob, sdoy, sdox, sdoh,
                           W, NTOK, HEADS, scale_log2, scale, D_REAL, DV_REAL,
                           RH: tl.constexpr, RW: tl.constexpr, NW: tl.constexpr, T: tl.constexpr, R: tl.constexpr,
                           TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           D: tl.constexpr, DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // HEADS, bh % HEADS
    n_ok, kr, ky, kx = _region_order_tile(pid * BLOCK_N, BLOCK_N, R, T, RH, RW, NW)  # key tokens in region order
    base = (pid * BLOCK_N) // T
    shift = (kr - base)[:, None]
    offs_d, offs_dv = tl.arange(0, D), tl.arange(0, DV)
    k = _load_rows(K, b, h, ky, kx, n_ok, skb, sky, skx, skh, offs_d, D_REAL)
    v = _load_rows(V, b, h, ky, kx, n_ok, svb, svy, svx, svh, offs_dv, DV_REAL)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, DV], tl.float32)
    for m0 in range(0, R * T, BLOCK_M):
        m_ok, qr, qy, qx = _region_order_tile(m0, BLOCK_M, R, T, RH, RW, NW)
        word = tl.load(WORDS + (b * R + qr) * 2, mask=m_ok, other=0)
        any_rep = tl.max(tl.load(WORDS + (b * R + qr) * 2 + 1, mask=m_ok, other=0), 0)
        field = ((word >> base) & 0x7FFFFFFF).to(tl.int32)
        q = _load_rows(Q, b, h, qy, qx, m_ok, sqb, sqy, sqx, sqh, offs_d, D_REAL)  # (M, D)
        do = _load_rows(DO, b, h, qy, qx, m_ok, sdob, sdoy, sdox, sdoh, offs_dv, DV_REAL)  # (M, DV)
        lse = tl.load(LSE + bh * NTOK + qy * W + qx, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + bh * NTOK + qy * W + qx, mask=m_ok, other=0.0)
        st = _dot(k, tl.trans(q), PREC, UPCAST) * scale_log2  # (N, M)
        st = _mask_routes(st, field[None, :], shift, any_rep, IDX + b * sib + qr[None, :] * sir, m_ok[None, :],
                          kr[:, None], sis, TOPK)
        pt = tl.exp2(st - lse[None, :])
        dk, dv = _dkdv_step(dk, dv, pt, q, do, v, delta, PREC, UPCAST)
    _store_dkdv(DK, DV_OUT, dk * scale, dv, b, h, ky, kx, n_ok, W, NTOK, HEADS, offs_d, offs_dv, D_REAL, DV_REAL)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _tiles(t: int, topk: int, backward: bool = False) -> dict:
    """Tile sizes: query chunks of up to 64 tokens, or G query regions of tiny regions stacked in one 16-row
    tile (SMALL_REGION_QUERY_GROUP where G * T fits); key tiles of >= 16 and up to 64 lanes (for regions under
    16 tokens SMALL_REGION_KEYS, SMALL_REGION_DQ_KEYS in the dq pass) per query region group, packing several
    small regions (KR x KT) so tl.dot always has a legal shape."""
    kt = min(_pow2(t), 64)
    block_m = max(16, min(_pow2(t), 64))
    g = max(1, min(SMALL_REGION_QUERY_GROUP, block_m // t)) if t < 16 else 1
    lanes = (SMALL_REGION_DQ_KEYS if backward else SMALL_REGION_KEYS) if t < 16 else 64
    kr = max(16 // (kt * g), min(lanes // (kt * g), _pow2(topk)), 1)
    return dict(BLOCK_M=block_m, KT=kt, KR=kr, G=g)


# One routing kernel (every program recomputes its batch element's key-region means) where the map holds at
# most this many values (H * W * C) and regions x tokens per region (both to powers of 2) are at most 512;
# else region means, then affinity + top-k. Values per (regions, tokens, channels) slice, warps per program.
FUSED_ROUTING_MAX_ELEMENTS = 1 << 17
FUSED_ROUTING_SLICE = 8192
FUSED_ROUTING_WARPS = 4


def fused_routing(elements: int, r: int, t: int) -> bool:
    """Whether ``region_routing_triton`` runs as one kernel for a map of ``elements`` values (H * W * C) in
    ``r`` regions of ``t`` tokens."""
    return elements <= FUSED_ROUTING_MAX_ELEMENTS and _pow2(t) * max(16, _pow2(r)) <= 512


# Sparse attention kernels for regions under 16 tokens (BiFormer stage 3 at 512: 2x2-token regions): warps per
# program, key lanes per step (over the program's query regions), query regions stacked per 16-row tile. At
# stage 3 at 512 (H100, bf16; docs/benchmarks.md) one warp measured 1.15-1.5x faster than two, 4 query regions
# per program 5% faster than 2 and 10% faster than 1; benchmarks/sparse.py times the alternatives.
SMALL_REGION_WARPS = 1
SMALL_REGION_KEYS = 64
SMALL_REGION_DQ_KEYS = 32
SMALL_REGION_QUERY_GROUP = 4  # query regions per forward / dq program (G x T rows of a 16-row tile)
SMALL_REGION_DKDV_WARPS = 2  # the dk/dv kernel's (keys, 64 queries) tiles: 1 warp measured 9% slower
SMALL_REGION_DKDV_ROWS = 64  # query rows per step of the dk/dv kernel (region tokens x query regions)
SMALL_REGION_DKDV_GROUPED = True  # dk/dv programs of 16 / T key regions where T divides 16
# Affinity rows per program of the top-k kernel of the three-kernel routing (one warp each).
ROUTING_TOPK_ROWS = 2


# Key regions per program of the inverse-routing-table kernel (benchmarks/sparse.py times 32 against it).
INVERSE_KEYS_PER_PROGRAM = 8


# Dense region-masked kernels (see above) for maps of at most 64 regions of under 16 tokens where a query
# region routes to at least this fraction of the regions (BiFormer stage 3 at 224: 16 of 49); tile sizes
# and warps per program of those kernels (benchmarks/sparse.py times the alternatives).
DENSE_MIN_ROUTED_FRACTION = 0.25
DENSE_BLOCK_M = 128  # backward query tiles (dq programs, dk/dv steps): 128 measured 1-3% faster than 64
DENSE_FWD_BLOCK_M = 128  # forward query tiles: 128 measured 10% faster than 64 (H100, stage 3 at 224)
DENSE_BLOCK_N = 32  # forward key tiles
DENSE_BWD_BLOCK_N = 64  # dk/dv key tiles (and dq's key steps): 32 measured 1.9x slower in dk/dv
DENSE_WARPS = 4
DENSE_STAGES = 3


def _dense_tiles(r: int, t: int, topk: int, backward: bool = False) -> dict | None:
    """Tile sizes of the dense region-masked kernels, or None where the sparse kernels run."""
    if r > 64 or t >= 16 or topk < DENSE_MIN_ROUTED_FRACTION * r:
        return None
    block_n = max(DENSE_BLOCK_N, DENSE_BWD_BLOCK_N)  # the larger key tile must fit one field (both paths agree)
    if (block_n + t - 2) // t > 30:  # a key tile's regions must fit one 31-bit field of a routing word
        return None
    if backward:
        return dict(BLOCK_M=DENSE_BLOCK_M, BLOCK_N=DENSE_BWD_BLOCK_N)
    return dict(BLOCK_M=DENSE_FWD_BLOCK_M, BLOCK_N=DENSE_BLOCK_N)


def _pdl(x: torch.Tensor, enable: bool = True) -> dict:
    """Launch options for programmatic dependent launch (Hopper and later) of bilevel_routing_attention's
    forward kernels (routing words, attention): a kernel may start while the previous one drains; it runs
    only index arithmetic until ``gdc_wait`` (the previous grid complete, its writes visible), so neither its
    reads nor its writes can race that grid. Hides a launch gap per kernel (4% at BiFormer stage 3 at 224;
    on the larger grids of the three-kernel routing it measured 0-25% slower, so it is not used there). Off
    under the interpreter, before sm_90, or with ROUTED_PDL False."""
    on = (enable and ROUTED_PDL and gdc_wait is not None and x.is_cuda and not triton_interpreting()
          and _capability_major(x.device.index if x.device.index is not None else torch.cuda.current_device()) >= 9)
    return dict(PDL=True, launch_pdl=True) if on else dict(PDL=False)


@functools.cache
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _dense_forward(q, k, v, idx, words, out, lse, nh, nw, scale, tiles) -> None:
    """Launch the dense region-masked forward; the routing from ``words`` (B, R, 2) when given, else ``idx``."""
    b, h, w, heads, dqk = q.shape
    dv = v.shape[-1]
    t = (h // nh) * (w // nw)
    _routed_dense_fwd[(triton.cdiv(nh * nw * t, tiles["BLOCK_M"]), b * heads)](
        q, k, v, idx, idx if words is None else words, out, lse, *_strides(q), *_strides(k), *_strides(v),
        *_index_strides(idx), *_strides(out), w, h * w, heads, scale * _LOG2E, dqk, dv,
        RH=h // nh, RW=w // nw, NW=nw, T=t, R=nh * nw, TOPK=idx.shape[-1], D=max(16, _pow2(dqk)),
        DV=max(16, _pow2(dv)), WORDS_IN=words is not None, **_prec(q.dtype), num_warps=DENSE_WARPS,
        num_stages=DENSE_STAGES, **tiles, **_pdl(q, words is not None))


def _warps(t: int, dkdv: bool = False) -> int:
    if t >= 16:
        return 4
    return SMALL_REGION_DKDV_WARPS if dkdv else SMALL_REGION_WARPS


def _prec(dtype: torch.dtype) -> dict:
    return dict(PREC="ieee" if dtype == torch.float32 else "tf32",
                UPCAST=dtype == torch.bfloat16 and triton_interpreting())


def _strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


def _index_strides(idx: torch.Tensor) -> tuple[int, int, int]:
    return idx.stride(0), idx.stride(1), idx.stride(2)


class _RoutedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, region_index, nh, nw, scale):
        q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
        b, h, w, heads, dqk = q.shape
        dv = v.shape[-1]
        idx = region_index  # int64 or int32, read in place
        topk = idx.shape[-1]
        rh, rw = h // nh, w // nw
        t = rh * rw
        out = torch.empty(b, h, w, heads, dv, device=q.device, dtype=q.dtype)
        lse = torch.empty(b, heads, h * w, device=q.device, dtype=torch.float32)
        dense = _dense_tiles(nh * nw, t, topk)
        if dense is not None:
            _dense_forward(q, k, v, idx, None, out, lse, nh, nw, scale, dense)
            ctx.save_for_backward(q, k, v, idx, out, lse)
            ctx.geometry = (nh, nw, scale)
            return out
        tiles = _tiles(t, topk)
        mt = triton.cdiv(t, tiles["BLOCK_M"])
        _routed_fwd[(triton.cdiv(nh * nw, tiles["G"]) * mt, b * heads)](
            q, k, v, idx, out, lse, *_strides(q), *_strides(k), *_strides(v), *_index_strides(idx),
            *_strides(out), w, h * w, heads, nh * nw, scale * _LOG2E, dqk, dv,
            RH=rh, RW=rw, NW=nw, T=t, MT=mt, TOPK=topk, D=max(16, _pow2(dqk)), DV=max(16, _pow2(dv)),
            **_prec(q.dtype), num_warps=_warps(t), **tiles)
        ctx.save_for_backward(q, k, v, idx, out, lse)
        ctx.geometry = (nh, nw, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, idx, out, lse = ctx.saved_tensors
        nh, nw, scale = ctx.geometry
        dout = _last_contiguous(dout)
        # dq is written with q's strides: for a strided view of q (e.g. a chunk of a fused qkv projection)
        # empty_like would return a dense buffer with other strides, so give dq a dense q to mirror
        q = q.contiguous()
        b, h, w, heads, dqk = q.shape
        dv_dim = v.shape[-1]
        topk = idx.shape[-1]
        r, rh, rw = nh * nw, h // nh, w // nw
        t = rh * rw
        delta = torch.empty(b, heads, h * w, device=q.device, dtype=torch.float32)  # written by the dq pass
        common = dict(RH=rh, RW=rw, NW=nw, T=t, D=max(16, _pow2(dqk)), DV=max(16, _pow2(dv_dim)),
                      **_prec(q.dtype), num_warps=_warps(t))
        dq = torch.empty_like(q)
        dense = _dense_tiles(r, t, topk, backward=True)
        if dense is not None:
            dk = torch.empty(b, h, w, heads, dqk, device=q.device, dtype=q.dtype)
            dv = torch.empty(b, h, w, heads, dv_dim, device=q.device, dtype=v.dtype)
            words = getattr(ctx, "words", None)  # from the forward that routed, else written by the dq pass
            words_in = words is not None
            if not words_in:
                words = torch.empty(b, r, 2, device=q.device, dtype=torch.int64)
            common.update(R=r, TOPK=topk, num_warps=DENSE_WARPS, **dense)
            _routed_dense_bwd_dq[(triton.cdiv(r * t, dense["BLOCK_M"]), b * heads)](
                q, k, v, idx, dout, out, lse, delta, words, dq, *_strides(q), *_strides(k), *_strides(v),
                *_index_strides(idx), *_strides(dout), *_strides(out), w, h * w, heads, scale * _LOG2E, scale,
                dqk, dv_dim, WORDS_IN=words_in, **common)
            _routed_dense_bwd_dkdv[(triton.cdiv(r * t, dense["BLOCK_N"]), b * heads)](
                q, k, v, idx, dout, lse, delta, words, dk, dv, *_strides(q), *_strides(k), *_strides(v),
                *_index_strides(idx), *_strides(dout), w, h * w, heads, scale * _LOG2E, scale, dqk, dv_dim,
                **common)
            return dq, dk, dv, None, None, None, None
        tiles = _tiles(t, topk, backward=True)
        mt = triton.cdiv(t, tiles["BLOCK_M"])
        _routed_bwd_dq[(triton.cdiv(r, tiles["G"]) * mt, b * heads)](
            q, k, v, idx, dout, out, lse, delta, dq, *_strides(q), *_strides(k), *_strides(v),
            *_index_strides(idx), *_strides(dout), *_strides(out), w, h * w, heads, r, scale * _LOG2E, scale,
            dqk, dv_dim, MT=mt, TOPK=topk, **tiles, **common)
        # inverse routing table: for each (batch, key region) the query regions that chose it
        starts = torch.empty(b, r, device=q.device, dtype=torch.int32)
        counts = torch.empty(b, r, device=q.device, dtype=torch.int32)
        qlist = torch.empty(b * r * topk, device=q.device, dtype=torch.int32)
        sb = min(_pow2(r), INVERSE_KEYS_PER_PROGRAM)
        _routed_inverse[(triton.cdiv(r, sb), b)](
            idx, starts, counts, qlist, *_index_strides(idx), r, TOPK=topk, KP=_pow2(topk), SB=sb,
            RQ=min(_pow2(r), 256), ONE_TILE=r <= 256, num_warps=4)
        dk = torch.empty(b, h, w, heads, dqk, device=q.device, dtype=q.dtype)
        dv = torch.empty(b, h, w, heads, dv_dim, device=q.device, dtype=v.dtype)
        block_n = max(16, min(_pow2(t), 64))
        qt = min(_pow2(t), 64)
        nt = triton.cdiv(t, block_n)
        # tiny regions of 2^k tokens: several key regions per program fill the 16 key rows
        g = block_n // t if (SMALL_REGION_DKDV_GROUPED and block_n % t == 0) else 1
        _routed_bwd_dkdv[(triton.cdiv(r, g) * nt, b * heads)](
            q, k, v, dout, lse, delta, starts, counts, qlist, dk, dv, *_strides(q), *_strides(k), *_strides(v),
            *_strides(dout), w, h * w, heads, r, scale * _LOG2E, scale, dqk, dv_dim,
            NT=nt, BLOCK_N=block_n, QT=qt, G=g,
            QE=max(1, SMALL_REGION_DKDV_ROWS // qt) if t < 16 else max(1, 64 // qt),
            **{**common, "num_warps": _warps(t, dkdv=True)})
        return dq, dk, dv, None, None, None, None


def routed_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region_index: torch.Tensor,
                            nh: int, nw: int, scale: float) -> torch.Tensor:
    """Fused routed attention (validated inputs; see :func:`attnzoo.kernels.routed_attention`)."""
    return _RoutedAttention.apply(q, k, v, region_index, nh, nw, scale)


# ---------------------------------------------------------------- routing + attention in one launch

# Routing rows per program of the top-k kernel of routing_words (2 measured fastest with one warp, H100,
# BiFormer stage 3 at 224; benchmarks/sparse.py times 4).
ROUTING_WORDS_ROWS = 2
# Programmatic dependent launch for the three kernels of bilevel_routing_attention's forward (see _pdl).
ROUTED_PDL = True


def routing_words_supported(r: int, t: int, topk: int) -> bool:
    """Whether :func:`bilevel_routing_attention_triton` applies: the dense kernels' geometry (at most 64
    regions of under 16 tokens, enough of them routed), where the routing fits one 64-bit word per region."""
    return _dense_tiles(r, t, topk) is not None


def routing_words(q: torch.Tensor, k: torch.Tensor, nh: int, nw: int, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing of (B, H, W, heads, d) q and k over all heads' channels as (index (B, R, topk) int64 in decreasing
    affinity, words (B, R, 2) int64: bit s of [..., 0] set = key region s routed, [..., 1] = 0 (no repeats))."""
    b, h, w, heads, dqk = q.shape
    r, t = nh * nw, (h // nh) * (w // nw)
    rq = 16
    qt = triton.cdiv(r, rq)
    rp = max(16, _pow2(r))
    index = torch.empty(b, r, topk, device=q.device, dtype=torch.int64)
    words = torch.empty(b, r, 2, device=q.device, dtype=torch.int64)
    partial = torch.empty(b * qt * heads, rq, rp, device=q.device, dtype=torch.float32)
    # one warp per program: the tiles are small, and reductions within a warp need no shared memory
    _routing_partials[(b * qt * heads,)](
        q, k, partial, *_strides(q), *_strides(k), heads, qt, dqk, RH=h // nh, RW=w // nw, NW=nw, T=t, TP=_pow2(t),
        R=r, RQ=rq, RP=rp, D=max(16, _pow2(dqk)), RPREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=1,
        **_pdl(q))
    _routing_topk_words[(triton.cdiv(b * r, ROUTING_WORDS_ROWS),)](
        partial, index, words, heads, qt, b * r, R=r, TOPK=topk, KP=_pow2(topk), RQ=rq, RP=rp, RB=ROUTING_WORDS_ROWS,
        num_warps=1, **_pdl(q))
    return index, words


class _BilevelRoutedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, nh, nw, topk, scale):
        q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
        b, h, w, heads, _ = q.shape
        index, words = routing_words(q, k, nh, nw, topk)
        out = torch.empty(b, h, w, heads, v.shape[-1], device=q.device, dtype=q.dtype)
        lse = torch.empty(b, heads, h * w, device=q.device, dtype=torch.float32)
        _dense_forward(q, k, v, index, words, out, lse, nh, nw, scale, _dense_tiles(nh * nw, (h // nh) * (w // nw),
                                                                                      topk))
        ctx.save_for_backward(q, k, v, index, out, lse)
        ctx.geometry = (nh, nw, scale)
        ctx.words = words
        ctx.mark_non_differentiable(index)
        return out, index

    @staticmethod
    def backward(ctx, dout, dindex):
        dq, dk, dv = _RoutedAttention.backward(ctx, dout)[:3]
        return dq, dk, dv, None, None, None, None


def bilevel_routing_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nh: int, nw: int,
                                     topk: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing words, then the dense region-masked attention reading them (validated inputs,
    :func:`routing_words_supported` geometry; see :func:`attnzoo.kernels.bilevel_routing_attention`): (out, index)."""
    return _BilevelRoutedAttention.apply(q, k, v, nh, nw, topk, scale)

