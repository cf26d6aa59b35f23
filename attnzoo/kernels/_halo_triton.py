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
def _halo_fwd(Q, K, V, BR, BC, O, LSE,
              sqb, sqy, sqx, sqh, skb, sky, skx, skh, svb, svy, svx, svh, sob, soy, sox, soh,
              H, W, HQ, WQ, NBX, HEADS, scale_log2, D_REAL, DV_REAL,
              BS: tl.constexpr, BQ: tl.constexpr, HALO: tl.constexpr, WIN: tl.constexpr,
              BLOCK_M: tl.constexpr, KROWS: tl.constexpr, KXP: tl.constexpr, HAS_BIAS: tl.constexpr,
              D: tl.constexpr, DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // HEADS, bh % HEADS
    by, bx = pid // NBX, pid % NBX
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < BQ * BQ
    qy, qx = by * BQ + offs_m // BQ, bx * BQ + offs_m % BQ
    offs_d, offs_dv = tl.arange(0, D), tl.arange(0, DV)
    q = tl.load(Q + b * sqb + qy[:, None] * sqy + qx[:, None] * sqx + h * sqh + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d[None, :] < D_REAL), other=0.0)
    qrow = ((b * HQ + qy) * WQ + qx) * HEADS + h  # row of this query in the (.., win) bias tensors
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
        kt = tl.load(K + b * skb + ky[None, :] * sky + kx[None, :] * skx + h * skh + offs_d[:, None],
                     mask=inside[None, :] & (offs_d[:, None] < D_REAL), other=0.0)  # (D, N)
        s = _dot(q, kt, PREC, UPCAST) * scale_log2
        if HAS_BIAS:
            pair = m_ok[:, None] & n_ok[None, :]
            s += (tl.load(BR + qrow[:, None] * WIN + ry[None, :], mask=pair, other=0.0)
                  + tl.load(BC + qrow[:, None] * WIN + rx[None, :], mask=pair, other=0.0)) * 1.4426950408889634
        s = tl.where(n_ok[None, :], s, float("-inf"))
        # online softmax: rescale what was accumulated when the running max grows
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(V + b * svb + ky[:, None] * svy + kx[:, None] * svx + h * svh + offs_dv[None, :],
                     mask=inside[:, None] & (offs_dv[None, :] < DV_REAL), other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, PREC, UPCAST)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + qy[:, None] * soy + qx[:, None] * sox + h * soh + offs_dv[None, :],
             acc.to(O.dtype.element_ty), mask=m_ok[:, None] & (offs_dv[None, :] < DV_REAL))
    tl.store(LSE + bh * HQ * WQ + qy * WQ + qx, m_i + tl.log2(l_i), mask=m_ok)


@triton.jit
def _halo_bwd_dq(Q, K, V, BR, BC, DO, LSE, DELTA, DQ, DBR, DBC,
                 sqb, sqy, sqx, sqh, skb, sky, skx, skh, svb, svy, svx, svh, sdob, sdoy, sdox, sdoh,
                 H, W, HQ, WQ, NBX, HEADS, scale_log2, scale, D_REAL, DV_REAL,
                 BS: tl.constexpr, BQ: tl.constexpr, HALO: tl.constexpr, WIN: tl.constexpr,
                 BLOCK_M: tl.constexpr, KROWS: tl.constexpr, KXP: tl.constexpr, HAS_BIAS: tl.constexpr,
                 D: tl.constexpr, DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // HEADS, bh % HEADS
    by, bx = pid // NBX, pid % NBX
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < BQ * BQ
    qy, qx = by * BQ + offs_m // BQ, bx * BQ + offs_m % BQ
    offs_d, offs_dv = tl.arange(0, D), tl.arange(0, DV)
    q = tl.load(Q + b * sqb + qy[:, None] * sqy + qx[:, None] * sqx + h * sqh + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d[None, :] < D_REAL), other=0.0)
    do = tl.load(DO + b * sdob + qy[:, None] * sdoy + qx[:, None] * sdox + h * sdoh + offs_dv[None, :],
                 mask=m_ok[:, None] & (offs_dv[None, :] < DV_REAL), other=0.0)
    lse = tl.load(LSE + bh * HQ * WQ + qy * WQ + qx, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + bh * HQ * WQ + qy * WQ + qx, mask=m_ok, other=0.0)
    qrow = ((b * HQ + qy) * WQ + qx) * HEADS + h
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
        k = tl.load(K + b * skb + ky[:, None] * sky + kx[:, None] * skx + h * skh + offs_d[None, :],
                    mask=inside[:, None] & (offs_d[None, :] < D_REAL), other=0.0)  # (N, D)
        v = tl.load(V + b * svb + ky[:, None] * svy + kx[:, None] * svx + h * svh + offs_dv[None, :],
                    mask=inside[:, None] & (offs_dv[None, :] < DV_REAL), other=0.0)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * scale_log2
        pair = m_ok[:, None] & n_ok[None, :]
        if HAS_BIAS:
            s += (tl.load(BR + qrow[:, None] * WIN + ry[None, :], mask=pair, other=0.0)
                  + tl.load(BC + qrow[:, None] * WIN + rx[None, :], mask=pair, other=0.0)) * 1.4426950408889634
        p = tl.where(pair, tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), PREC, UPCAST)
        ds = p * (dp - delta[:, None])  # d(loss)/d(logit); zero-padded keys included (they have logits)
        dq += _dot(ds.to(k.dtype), k, PREC, UPCAST)
        if HAS_BIAS:
            ds3 = tl.reshape(ds, (BLOCK_M, KROWS, KXP))
            rows = r0 + tl.arange(0, KROWS)
            tl.store(DBR + qrow[:, None] * WIN + rows[None, :], tl.sum(ds3, 2),
                     mask=m_ok[:, None] & (rows[None, :] < WIN))
            dcols += tl.sum(ds3, 1)
    tl.store(DQ + b * sqb + qy[:, None] * sqy + qx[:, None] * sqx + h * sqh + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < D_REAL))
    if HAS_BIAS:
        cols = tl.arange(0, KXP)
        tl.store(DBC + qrow[:, None] * WIN + cols[None, :], dcols, mask=m_ok[:, None] & (cols[None, :] < WIN))


@triton.jit
def _halo_bwd_dkdv(Q, K, V, BR, BC, DO, LSE, DELTA, DK, DV_OUT,
                   sqb, sqy, sqx, sqh, skb, sky, skx, skh, svb, svy, svx, svh, sdob, sdoy, sdox, sdoh,
                   H, W, HQ, WQ, NBY, NBX, HEADS, scale_log2, scale, D_REAL, DV_REAL,
                   BS: tl.constexpr, BQ: tl.constexpr, HALO: tl.constexpr, WIN: tl.constexpr, NB: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                   D: tl.constexpr, DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // HEADS, bh % HEADS
    kby, kbx = pid // NBX, pid % NBX
    offs_n = tl.arange(0, BLOCK_N)
    n_ok = offs_n < BS * BS
    ky, kx = kby * BS + offs_n // BS, kbx * BS + offs_n % BS
    offs_d, offs_dv = tl.arange(0, D), tl.arange(0, DV)
    k = tl.load(K + b * skb + ky[:, None] * sky + kx[:, None] * skx + h * skh + offs_d[None, :],
                mask=n_ok[:, None] & (offs_d[None, :] < D_REAL), other=0.0)
    v = tl.load(V + b * svb + ky[:, None] * svy + kx[:, None] * svx + h * svh + offs_dv[None, :],
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
            q = tl.load(Q + b * sqb + qy[:, None] * sqy + qx[:, None] * sqx + h * sqh + offs_d[None, :],
                        mask=m_ok[:, None] & (offs_d[None, :] < D_REAL), other=0.0)
            do = tl.load(DO + b * sdob + qy[:, None] * sdoy + qx[:, None] * sdox + h * sdoh + offs_dv[None, :],
                         mask=m_ok[:, None] & (offs_dv[None, :] < DV_REAL), other=0.0)
            lse = tl.load(LSE + bh * HQ * WQ + qy * WQ + qx, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + bh * HQ * WQ + qy * WQ + qx, mask=m_ok, other=0.0)
            st = _dot(k, tl.trans(q), PREC, UPCAST) * scale_log2  # (N, M)
            pair = k_in[:, None] & m_ok[None, :]
            if HAS_BIAS:
                qrow = ((b * HQ + qy) * WQ + qx) * HEADS + h
                st += (tl.load(BR + qrow[None, :] * WIN + ry[:, None], mask=pair, other=0.0)
                       + tl.load(BC + qrow[None, :] * WIN + rx[:, None], mask=pair, other=0.0)) * 1.4426950408889634
            pt = tl.where(pair, tl.exp2(st - lse[None, :]), 0.0)
            dv += _dot(pt.to(do.dtype), do, PREC, UPCAST)
            dpt = _dot(v, tl.trans(do), PREC, UPCAST)
            dst = pt * (dpt - delta[None, :])
            dk += _dot(dst.to(q.dtype), q, PREC, UPCAST)
    tok = ((b * H + ky) * W + kx) * HEADS + h  # DK, DV_OUT are contiguous (B, H, W, heads, d)
    tl.store(DK + tok[:, None] * D_REAL + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=n_ok[:, None] & (offs_d[None, :] < D_REAL))
    tl.store(DV_OUT + tok[:, None] * DV_REAL + offs_dv[None, :], dv.to(DV_OUT.dtype.element_ty),
             mask=n_ok[:, None] & (offs_dv[None, :] < DV_REAL))


def _geometry(q: torch.Tensor, k: torch.Tensor, block_size: int, halo_size: int, block_stride: int) -> dict:
    win, bq = block_size + 2 * halo_size, block_size // block_stride
    kxp = _pow2(win)
    return dict(BS=block_size, BQ=bq, HALO=halo_size, WIN=win, BLOCK_M=max(16, _pow2(bq * bq)),
                KXP=kxp, KROWS=max(1, 64 // kxp), D=max(16, _pow2(q.shape[-1])), **_prec(q.dtype))


class _HaloAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias_rows, bias_cols, block_size, halo_size, block_stride, scale):
        q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
        has_bias = bias_rows is not None
        if has_bias:
            bias_rows, bias_cols = bias_rows.float().contiguous(), bias_cols.float().contiguous()
        b, hq, wq, heads, dqk = q.shape
        h, w, dv = k.shape[1], k.shape[2], v.shape[-1]
        geo = _geometry(q, k, block_size, halo_size, block_stride)
        nby, nbx = h // block_size, w // block_size
        out = torch.empty(b, hq, wq, heads, dv, device=q.device, dtype=q.dtype)
        lse = torch.empty(b, heads, hq * wq, device=q.device, dtype=torch.float32)
        _halo_fwd[(nby * nbx, b * heads)](
            q, k, v, bias_rows if has_bias else q, bias_cols if has_bias else q, out, lse,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), h, w, hq, wq, nbx, heads,
            scale * _LOG2E, dqk, dv, HAS_BIAS=has_bias, DV=max(16, _pow2(dv)), num_warps=4, **geo)
        ctx.save_for_backward(q, k, v, bias_rows, bias_cols, out, lse)
        ctx.config = (block_size, halo_size, block_stride, scale, has_bias)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias_rows, bias_cols, out, lse = ctx.saved_tensors
        block_size, halo_size, block_stride, scale, has_bias = ctx.config
        dout = _last_contiguous(dout)
        b, hq, wq, heads, dqk = q.shape
        h, w, dv_dim = k.shape[1], k.shape[2], v.shape[-1]
        nby, nbx = h // block_size, w // block_size
        geo = _geometry(q, k, block_size, halo_size, block_stride)
        delta = (dout.float() * out.float()).sum(-1).permute(0, 3, 1, 2).reshape(b, heads, hq * wq).contiguous()
        dq = torch.empty_like(q)
        dbr = torch.empty_like(bias_rows) if has_bias else None
        dbc = torch.empty_like(bias_cols) if has_bias else None
        br, bc = (bias_rows, bias_cols) if has_bias else (q, q)
        _halo_bwd_dq[(nby * nbx, b * heads)](
            q, k, v, br, bc, dout, lse, delta, dq, dbr if has_bias else q, dbc if has_bias else q,
            *_strides(q), *_strides(k), *_strides(v), *_strides(dout), h, w, hq, wq, nbx, heads,
            scale * _LOG2E, scale, dqk, dv_dim, HAS_BIAS=has_bias, DV=max(16, _pow2(dv_dim)), num_warps=4, **geo)
        dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
        dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
        geo_kv = {key: val for key, val in geo.items() if key not in ("KXP", "KROWS")}
        _halo_bwd_dkdv[(nby * nbx, b * heads)](
            q, k, v, br, bc, dout, lse, delta, dk, dv,
            *_strides(q), *_strides(k), *_strides(v), *_strides(dout), h, w, hq, wq, nby, nbx, heads,
            scale * _LOG2E, scale, dqk, dv_dim, NB=triton.cdiv(halo_size, block_size),
            BLOCK_N=max(16, _pow2(block_size * block_size)), HAS_BIAS=has_bias, DV=max(16, _pow2(dv_dim)),
            num_warps=4, **geo_kv)
        return dq, dk, dv, dbr, dbc, None, None, None, None


def halo_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_rows: torch.Tensor | None,
                          bias_cols: torch.Tensor | None, block_size: int, halo_size: int, block_stride: int,
                          scale: float) -> torch.Tensor:
    """Fused halo attention (validated inputs, decomposed position logits; see :mod:`attnzoo.kernels.halo`)."""
    return _HaloAttention.apply(q, k, v, bias_rows, bias_cols, block_size, halo_size, block_stride, scale)


__all__ = ["halo_attention_triton"]
