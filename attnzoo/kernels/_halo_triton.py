"""Fused Triton forward and backward for halo (HaloNet) attention. Imported lazily by halo.py.

Layout: q (B, Hq, Wq, heads, d_qk) on the query grid (Hq = H / block_stride), k (B, H, W, heads, d_qk),
v (B, H, W, heads, d_v); position logits arrive decomposed as bias_rows / bias_cols (B, Hq, Wq, heads,
win) float32 (halo.py computes them from timm's tables), so the logit of window key (ky, kx) is
``scale * q.k + bias_rows[.., ky] + bias_cols[.., kx]``.

Each forward program owns one query block and walks its win x win window in tiles of KROWS window rows
x KXP columns, loading k and v in place with masked loads (outside the map: zeros that still count in
the softmax, timm's zero padding). Online softmax in base 2; saved for backward: output and lse only.
Backward: a query-centric pass gives dq and the bias gradients (row sums and column sums of dS per
tile); a key-centric pass gives dk and dv, each program owning one key block and visiting the query
blocks whose windows cover it, so no atomics are needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._routed_triton import _dot, _last_contiguous, _pow2, _prec, _strides

_LOG2E = 1.4426950408889634


@triton.jit
def _halo_fwd(Q, K, V, QR, O, LSE,
              sqb, sqy, sqx, sqh, sqd, skb, sky, skx, skh, skd, svb, svy, svx, svh, svd, sob, soy, sox, soh,
              H, W, HQ, WQ, NBX, HEADS, scale_log2, bias_log2, D_REAL, DV_REAL,
              BS: tl.constexpr, BQ: tl.constexpr, HALO: tl.constexpr, WIN: tl.constexpr, NR: tl.constexpr,
              BLOCK_M: tl.constexpr, KROWS: tl.constexpr, KXP: tl.constexpr, HAS_BIAS: tl.constexpr,
              D: tl.constexpr, DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // HEADS, bh % HEADS
    by, bx = pid // NBX, pid % NBX
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < BQ * BQ
    qy, qx = by * BQ + offs_m // BQ, bx * BQ + offs_m % BQ
    offs_d, offs_dv = tl.arange(0, D), tl.arange(0, DV)
    q = tl.load(Q + b * sqb + qy[:, None] * sqy + qx[:, None] * sqx + h * sqh + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & (offs_d[None, :] < D_REAL), other=0.0)
    qrow = ((b * HQ + qy) * WQ + qx) * HEADS + h  # row of this query in QR (.., 2 * NR)
    iy, ix = offs_m // BQ, offs_m % BQ  # in-block offsets: relative index = window offset - these + WIN - 1
    oy, ox = by * BS - HALO, bx * BS - HALO  # window origin on the key map
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    offs_n = tl.arange(0, KROWS * KXP)
    rx = offs_n % KXP
    for r0 in range(0, WIN, KROWS):
        ry = r0 + offs_n // KXP
        n_ok = (ry < WIN) & (rx < WIN)
        ky, kx = oy + ry, ox + rx
        inside = n_ok & (ky >= 0) & (ky < H) & (kx >= 0) & (kx < W)
        kt = tl.load(K + b * skb + ky[None, :] * sky + kx[None, :] * skx + h * skh + offs_d[:, None] * skd,
                     mask=inside[None, :] & (offs_d[:, None] < D_REAL), other=0.0)  # (D, N)
        s = _dot(q, kt, PREC, UPCAST) * scale_log2
        if HAS_BIAS:
            pair = m_ok[:, None] & n_ok[None, :]
            rel_rows = qrow[:, None] * (2 * NR) + ry[None, :] - iy[:, None] + WIN - 1
            rel_cols = qrow[:, None] * (2 * NR) + NR + rx[None, :] - ix[:, None] + WIN - 1
            s += (tl.load(QR + rel_rows, mask=pair, other=0.0).to(tl.float32)
                  + tl.load(QR + rel_cols, mask=pair, other=0.0).to(tl.float32)) * bias_log2
        s = tl.where(n_ok[None, :], s, float("-inf"))
        # online softmax: rescale what was accumulated when the running max grows
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(V + b * svb + ky[:, None] * svy + kx[:, None] * svx + h * svh + offs_dv[None, :] * svd,
                     mask=inside[:, None] & (offs_dv[None, :] < DV_REAL), other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, PREC, UPCAST)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + qy[:, None] * soy + qx[:, None] * sox + h * soh + offs_dv[None, :],
             acc.to(O.dtype.element_ty), mask=m_ok[:, None] & (offs_dv[None, :] < DV_REAL))
    tl.store(LSE + bh * HQ * WQ + qy * WQ + qx, m_i + tl.log2(l_i), mask=m_ok)


@triton.jit
def _halo_bwd_dq(Q, K, V, QR, DO, O, LSE, DELTA, DQ, DQR,
                 sqb, sqy, sqx, sqh, sqd, skb, sky, skx, skh, skd, svb, svy, svx, svh, svd,
                 sdob, sdoy, sdox, sdoh, sob, soy, sox, soh, sdqb, sdqy, sdqx, sdqh, sdqd,
                 H, W, HQ, WQ, NBX, HEADS, scale_log2, scale, bias_log2, bias_scale, D_REAL, DV_REAL,
                 BS: tl.constexpr, BQ: tl.constexpr, HALO: tl.constexpr, WIN: tl.constexpr, NR: tl.constexpr,
                 BLOCK_M: tl.constexpr, KROWS: tl.constexpr, KXP: tl.constexpr, HAS_BIAS: tl.constexpr,
                 D: tl.constexpr, DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // HEADS, bh % HEADS
    by, bx = pid // NBX, pid % NBX
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < BQ * BQ
    qy, qx = by * BQ + offs_m // BQ, bx * BQ + offs_m % BQ
    offs_d, offs_dv = tl.arange(0, D), tl.arange(0, DV)
    q = tl.load(Q + b * sqb + qy[:, None] * sqy + qx[:, None] * sqx + h * sqh + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & (offs_d[None, :] < D_REAL), other=0.0)
    do = tl.load(DO + b * sdob + qy[:, None] * sdoy + qx[:, None] * sdox + h * sdoh + offs_dv[None, :],
                 mask=m_ok[:, None] & (offs_dv[None, :] < DV_REAL), other=0.0)
    o = tl.load(O + b * sob + qy[:, None] * soy + qx[:, None] * sox + h * soh + offs_dv[None, :],
                mask=m_ok[:, None] & (offs_dv[None, :] < DV_REAL), other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # rowsum(dO * O), reused by the dk/dv pass
    tl.store(DELTA + bh * HQ * WQ + qy * WQ + qx, delta, mask=m_ok)
    lse = tl.load(LSE + bh * HQ * WQ + qy * WQ + qx, mask=m_ok, other=0.0)
    qrow = ((b * HQ + qy) * WQ + qx) * HEADS + h
    iy, ix = offs_m // BQ, offs_m % BQ
    oy, ox = by * BS - HALO, bx * BS - HALO
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    dcols = tl.zeros([BLOCK_M, KXP], tl.float32)
    offs_n = tl.arange(0, KROWS * KXP)
    rx = offs_n % KXP
    for r0 in range(0, WIN, KROWS):
        ry = r0 + offs_n // KXP
        n_ok = (ry < WIN) & (rx < WIN)
        ky, kx = oy + ry, ox + rx
        inside = n_ok & (ky >= 0) & (ky < H) & (kx >= 0) & (kx < W)
        k = tl.load(K + b * skb + ky[:, None] * sky + kx[:, None] * skx + h * skh + offs_d[None, :] * skd,
                    mask=inside[:, None] & (offs_d[None, :] < D_REAL), other=0.0)  # (N, D)
        v = tl.load(V + b * svb + ky[:, None] * svy + kx[:, None] * svx + h * svh + offs_dv[None, :] * svd,
                    mask=inside[:, None] & (offs_dv[None, :] < DV_REAL), other=0.0)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * scale_log2
        pair = m_ok[:, None] & n_ok[None, :]
        if HAS_BIAS:
            rel_rows = qrow[:, None] * (2 * NR) + ry[None, :] - iy[:, None] + WIN - 1
            rel_cols = qrow[:, None] * (2 * NR) + NR + rx[None, :] - ix[:, None] + WIN - 1
            s += (tl.load(QR + rel_rows, mask=pair, other=0.0).to(tl.float32)
                  + tl.load(QR + rel_cols, mask=pair, other=0.0).to(tl.float32)) * bias_log2
        p = tl.where(pair, tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), PREC, UPCAST)
        ds = p * (dp - delta[:, None])  # d(loss)/d(logit); zero-padded keys included (they have logits)
        dq += _dot(ds.to(k.dtype), k, PREC, UPCAST)
        if HAS_BIAS:
            # d(q . rel_height[j]) for j = row - iy + WIN - 1: one distinct j per (query, window row)
            ds3 = tl.reshape(ds, (BLOCK_M, KROWS, KXP))
            rows = r0 + tl.arange(0, KROWS)
            tl.store(DQR + qrow[:, None] * (2 * NR) + rows[None, :] - iy[:, None] + WIN - 1,
                     tl.sum(ds3, 2) * bias_scale, mask=m_ok[:, None] & (rows[None, :] < WIN))
            dcols += tl.sum(ds3, 1)
    tl.store(DQ + b * sdqb + qy[:, None] * sdqy + qx[:, None] * sdqx + h * sdqh + offs_d[None, :] * sdqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < D_REAL))
    if HAS_BIAS:
        cols = tl.arange(0, KXP)
        tl.store(DQR + qrow[:, None] * (2 * NR) + NR + cols[None, :] - ix[:, None] + WIN - 1, dcols * bias_scale,
                 mask=m_ok[:, None] & (cols[None, :] < WIN))


@triton.jit
def _halo_bwd_dkdv(Q, K, V, QR, DO, LSE, DELTA, DK, DV_OUT,
                   sqb, sqy, sqx, sqh, sqd, skb, sky, skx, skh, skd, svb, svy, svx, svh, svd,
                   sdob, sdoy, sdox, sdoh, sdkb, sdky, sdkx, sdkh, sdkd, sdvb, sdvy, sdvx, sdvh, sdvd,
                   H, W, HQ, WQ, NBY, NBX, HEADS, scale_log2, scale, bias_log2, D_REAL, DV_REAL,
                   BS: tl.constexpr, BQ: tl.constexpr, HALO: tl.constexpr, WIN: tl.constexpr, NR: tl.constexpr,
                   NB: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                   D: tl.constexpr, DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // HEADS, bh % HEADS
    kby, kbx = pid // NBX, pid % NBX
    offs_n = tl.arange(0, BLOCK_N)
    n_ok = offs_n < BS * BS
    ky, kx = kby * BS + offs_n // BS, kbx * BS + offs_n % BS
    offs_d, offs_dv = tl.arange(0, D), tl.arange(0, DV)
    k = tl.load(K + b * skb + ky[:, None] * sky + kx[:, None] * skx + h * skh + offs_d[None, :] * skd,
                mask=n_ok[:, None] & (offs_d[None, :] < D_REAL), other=0.0)
    v = tl.load(V + b * svb + ky[:, None] * svy + kx[:, None] * svx + h * svh + offs_dv[None, :] * svd,
                mask=n_ok[:, None] & (offs_dv[None, :] < DV_REAL), other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, DV], tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < BQ * BQ
    # query blocks whose window (block +- halo) covers this key block
    for qby in range(tl.maximum(kby - NB, 0), tl.minimum(kby + NB + 1, NBY)):
        for qbx in range(tl.maximum(kbx - NB, 0), tl.minimum(kbx + NB + 1, NBX)):
            ry, rx = ky - (qby * BS - HALO), kx - (qbx * BS - HALO)  # key's offset in that window
            k_in = n_ok & (ry >= 0) & (ry < WIN) & (rx >= 0) & (rx < WIN)
            qy, qx = qby * BQ + offs_m // BQ, qbx * BQ + offs_m % BQ
            q = tl.load(Q + b * sqb + qy[:, None] * sqy + qx[:, None] * sqx + h * sqh + offs_d[None, :] * sqd,
                        mask=m_ok[:, None] & (offs_d[None, :] < D_REAL), other=0.0)
            do = tl.load(DO + b * sdob + qy[:, None] * sdoy + qx[:, None] * sdox + h * sdoh + offs_dv[None, :],
                         mask=m_ok[:, None] & (offs_dv[None, :] < DV_REAL), other=0.0)
            lse = tl.load(LSE + bh * HQ * WQ + qy * WQ + qx, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + bh * HQ * WQ + qy * WQ + qx, mask=m_ok, other=0.0)
            st = _dot(k, tl.trans(q), PREC, UPCAST) * scale_log2  # (N, M)
            pair = k_in[:, None] & m_ok[None, :]
            if HAS_BIAS:
                qrow = ((b * HQ + qy) * WQ + qx) * HEADS + h
                iy, ix = offs_m // BQ, offs_m % BQ
                rel_rows = qrow[None, :] * (2 * NR) + ry[:, None] - iy[None, :] + WIN - 1
                rel_cols = qrow[None, :] * (2 * NR) + NR + rx[:, None] - ix[None, :] + WIN - 1
                st += (tl.load(QR + rel_rows, mask=pair, other=0.0).to(tl.float32)
                       + tl.load(QR + rel_cols, mask=pair, other=0.0).to(tl.float32)) * bias_log2
            pt = tl.where(pair, tl.exp2(st - lse[None, :]), 0.0)
            dv += _dot(pt.to(do.dtype), do, PREC, UPCAST)
            dpt = _dot(v, tl.trans(do), PREC, UPCAST)
            dst = pt * (dpt - delta[None, :])
            dk += _dot(dst.to(q.dtype), q, PREC, UPCAST)
    tl.store(DK + b * sdkb + ky[:, None] * sdky + kx[:, None] * sdkx + h * sdkh + offs_d[None, :] * sdkd,
             (dk * scale).to(DK.dtype.element_ty), mask=n_ok[:, None] & (offs_d[None, :] < D_REAL))
    tl.store(DV_OUT + b * sdvb + ky[:, None] * sdvy + kx[:, None] * sdvx + h * sdvh + offs_dv[None, :] * sdvd,
             dv.to(DV_OUT.dtype.element_ty),
             mask=n_ok[:, None] & (offs_dv[None, :] < DV_REAL))


def _geometry(q: torch.Tensor, block_size: int, halo_size: int, block_stride: int) -> dict:
    win, bq = block_size + 2 * halo_size, block_size // block_stride
    kxp = _pow2(win)
    return dict(BS=block_size, BQ=bq, HALO=halo_size, WIN=win, NR=2 * win - 1, BLOCK_M=max(16, _pow2(bq * bq)),
                D=max(16, _pow2(q.shape[-1])), **_prec(q.dtype)), dict(KXP=kxp, KROWS=max(1, 64 // kxp))


def _s5(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.stride())


class _HaloAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, qr, block_size, halo_size, block_stride, scale, bias_scale):
        has_bias = qr is not None
        if has_bias:
            qr = qr.contiguous()
        b, hq, wq, heads, dqk = q.shape
        h, w, dv = k.shape[1], k.shape[2], v.shape[-1]
        geo, tiles = _geometry(q, block_size, halo_size, block_stride)
        nby, nbx = h // block_size, w // block_size
        out = torch.empty(b, hq, wq, heads, dv, device=q.device, dtype=q.dtype)
        lse = torch.empty(b, heads, hq * wq, device=q.device, dtype=torch.float32)
        _halo_fwd[(nby * nbx, b * heads)](
            q, k, v, qr if has_bias else q, out, lse, *_s5(q), *_s5(k), *_s5(v), *_strides(out),
            h, w, hq, wq, nbx, heads, scale * _LOG2E, bias_scale * _LOG2E, dqk, dv, HAS_BIAS=has_bias,
            DV=max(16, _pow2(dv)), num_warps=4, **geo, **tiles)
        ctx.save_for_backward(q, k, v, qr, out, lse)
        ctx.config = (block_size, halo_size, block_stride, scale, bias_scale, has_bias)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, qr, out, lse = ctx.saved_tensors
        block_size, halo_size, block_stride, scale, bias_scale, has_bias = ctx.config
        dout = _last_contiguous(dout)
        b, hq, wq, heads, dqk = q.shape
        h, w, dv_dim = k.shape[1], k.shape[2], v.shape[-1]
        nby, nbx = h // block_size, w // block_size
        geo, tiles = _geometry(q, block_size, halo_size, block_stride)
        dvp = max(16, _pow2(dv_dim))
        delta = torch.empty(b, heads, hq * wq, device=q.device, dtype=torch.float32)
        dq = torch.empty_like(q)
        dqr = torch.zeros_like(qr) if has_bias else None  # entries no (query, key) pair reaches stay 0
        _halo_bwd_dq[(nby * nbx, b * heads)](
            q, k, v, qr if has_bias else q, dout, out, lse, delta, dq, dqr if has_bias else q,
            *_s5(q), *_s5(k), *_s5(v), *_strides(dout), *_strides(out), *_s5(dq), h, w, hq, wq, nbx, heads,
            scale * _LOG2E, scale, bias_scale * _LOG2E, bias_scale, dqk, dv_dim, HAS_BIAS=has_bias, DV=dvp,
            num_warps=4, **geo, **tiles)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        _halo_bwd_dkdv[(nby * nbx, b * heads)](
            q, k, v, qr if has_bias else q, dout, lse, delta, dk, dv,
            *_s5(q), *_s5(k), *_s5(v), *_strides(dout), *_s5(dk), *_s5(dv), h, w, hq, wq, nby, nbx, heads,
            scale * _LOG2E, scale, bias_scale * _LOG2E, dqk, dv_dim, NB=triton.cdiv(halo_size, block_size),
            BLOCK_N=max(16, _pow2(block_size * block_size)), HAS_BIAS=has_bias, DV=dvp, num_warps=4, **geo)
        return dq, dk, dv, dqr, None, None, None, None, None


def halo_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_height: torch.Tensor | None,
                          rel_width: torch.Tensor | None, block_size: int, halo_size: int, block_stride: int,
                          scale: float, scale_pos_embed: bool) -> torch.Tensor:
    """Fused halo attention (validated inputs; see :func:`attnzoo.kernels.halo_attention`).

    The position logits enter as one matmul, ``q @ [rel_height; rel_width]^T`` (B, Hq, Wq, heads, 2 * NR),
    NR = 2 * win - 1, whose entries the kernels pick per (query, key); autograd takes the gradient from
    there to q and to both tables.
    """
    qr = None
    if rel_height is not None:
        qr = q @ torch.cat([rel_height, rel_width]).to(q.dtype).T
    return _HaloAttention.apply(q, k, v, qr, block_size, halo_size, block_stride, scale,
                                scale if scale_pos_embed else 1.0)


__all__ = ["halo_attention_triton"]
