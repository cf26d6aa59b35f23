"""Fused Triton forward and backward for routed (BiFormer) attention. Imported lazily by routed.py.

Layout: q, k (B, H, W, heads, d_qk), v (B, H, W, heads, d_v); regions are rh x rw token rectangles with
row-major ids. Each program owns one (query region, query chunk, batch*head) and walks the routed key
regions straight from k and v: a key tile packs KR regions x KT tokens, addresses computed from the
region id read from the routing table, so no gathered copy ever exists. Online softmax in base 2
(the Triton fused-attention tutorial's scheme); saved for backward: output and log2-sum-exp only.

Backward: dq walks the same key tiles as the forward. dk/dv are key-centric: an inverse routing table
(CSR: for every key region, the query regions that chose it) built with a sort lets each program own
one key chunk and accumulate over its queries, so nothing is written twice and no atomics are needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import triton_interpreting

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
def _routed_fwd(Q, K, V, IDX, O, LSE,
                sqb, sqy, sqx, sqh, skb, sky, skx, skh, svb, svy, svx, svh,
                sib, sir, sob, soy, sox, soh,
                W, NTOK, HEADS, TOPK, scale_log2, D_REAL, DV_REAL,
                RH: tl.constexpr, RW: tl.constexpr, NW: tl.constexpr, T: tl.constexpr, MT: tl.constexpr,
                BLOCK_M: tl.constexpr, KT: tl.constexpr, KR: tl.constexpr,
                D: tl.constexpr, DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // HEADS, bh % HEADS
    r, mt = pid // MT, pid % MT
    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    qy, qx = _tile_coords(r, offs_m, RH, RW, NW)
    offs_d, offs_dv = tl.arange(0, D), tl.arange(0, DV)
    q = tl.load(Q + b * sqb + qy[:, None] * sqy + qx[:, None] * sqx + h * sqh + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d[None, :] < D_REAL), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    offs_n = tl.arange(0, KR * KT)
    for s0 in range(0, TOPK, KR):
        slot = s0 + offs_n // KT
        slot_ok = slot < TOPK
        reg = tl.load(IDX + b * sib + r * sir + slot, mask=slot_ok, other=0)
        for t0 in range(0, T, KT):
            tok = t0 + offs_n % KT
            n_ok = slot_ok & (tok < T)
            ky, kx = _tile_coords(reg, tok, RH, RW, NW)
            kt = tl.load(K + b * skb + ky[None, :] * sky + kx[None, :] * skx + h * skh + offs_d[:, None],
                         mask=n_ok[None, :] & (offs_d[:, None] < D_REAL), other=0.0)  # (D, N)
            s = _dot(q, kt, PREC, UPCAST) * scale_log2
            s = tl.where(n_ok[None, :], s, float("-inf"))
            # online softmax: rescale what was accumulated when the running max grows
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(V + b * svb + ky[:, None] * svy + kx[:, None] * svx + h * svh + offs_dv[None, :],
                         mask=n_ok[:, None] & (offs_dv[None, :] < DV_REAL), other=0.0)  # (N, DV)
            acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, PREC, UPCAST)
            m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + qy[:, None] * soy + qx[:, None] * sox + h * soh + offs_dv[None, :],
             acc.to(O.dtype.element_ty), mask=m_ok[:, None] & (offs_dv[None, :] < DV_REAL))
    # LSE: (B, heads, H*W) float32, base 2
    tl.store(LSE + bh * NTOK + qy * W + qx, m_i + tl.log2(l_i), mask=m_ok)


@triton.jit
def _routed_bwd_dq(Q, K, V, IDX, DO, O, LSE, DELTA, DQ,
                   sqb, sqy, sqx, sqh, skb, sky, skx, skh, svb, svy, svx, svh,
                   sib, sir, sdob, sdoy, sdox, sdoh, sob, soy, sox, soh,
                   W, NTOK, HEADS, TOPK, scale_log2, scale, D_REAL, DV_REAL,
                   RH: tl.constexpr, RW: tl.constexpr, NW: tl.constexpr, T: tl.constexpr, MT: tl.constexpr,
                   BLOCK_M: tl.constexpr, KT: tl.constexpr, KR: tl.constexpr,
                   D: tl.constexpr, DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // HEADS, bh % HEADS
    r, mt = pid // MT, pid % MT
    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    qy, qx = _tile_coords(r, offs_m, RH, RW, NW)
    offs_d, offs_dv = tl.arange(0, D), tl.arange(0, DV)
    q = tl.load(Q + b * sqb + qy[:, None] * sqy + qx[:, None] * sqx + h * sqh + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d[None, :] < D_REAL), other=0.0)
    do = tl.load(DO + b * sdob + qy[:, None] * sdoy + qx[:, None] * sdox + h * sdoh + offs_dv[None, :],
                 mask=m_ok[:, None] & (offs_dv[None, :] < DV_REAL), other=0.0)
    o = tl.load(O + b * sob + qy[:, None] * soy + qx[:, None] * sox + h * soh + offs_dv[None, :],
                mask=m_ok[:, None] & (offs_dv[None, :] < DV_REAL), other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # rowsum(dO * O), reused by the dk/dv pass
    tl.store(DELTA + bh * NTOK + qy * W + qx, delta, mask=m_ok)
    lse = tl.load(LSE + bh * NTOK + qy * W + qx, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    offs_n = tl.arange(0, KR * KT)
    for s0 in range(0, TOPK, KR):
        slot = s0 + offs_n // KT
        slot_ok = slot < TOPK
        reg = tl.load(IDX + b * sib + r * sir + slot, mask=slot_ok, other=0)
        for t0 in range(0, T, KT):
            tok = t0 + offs_n % KT
            n_ok = slot_ok & (tok < T)
            ky, kx = _tile_coords(reg, tok, RH, RW, NW)
            k = tl.load(K + b * skb + ky[:, None] * sky + kx[:, None] * skx + h * skh + offs_d[None, :],
                        mask=n_ok[:, None] & (offs_d[None, :] < D_REAL), other=0.0)  # (N, D)
            v = tl.load(V + b * svb + ky[:, None] * svy + kx[:, None] * svx + h * svh + offs_dv[None, :],
                        mask=n_ok[:, None] & (offs_dv[None, :] < DV_REAL), other=0.0)  # (N, DV)
            s = _dot(q, tl.trans(k), PREC, UPCAST) * scale_log2
            p = tl.where(n_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), PREC, UPCAST)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, PREC, UPCAST)
    tl.store(DQ + b * sqb + qy[:, None] * sqy + qx[:, None] * sqx + h * sqh + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < D_REAL))


@triton.jit
def _routed_bwd_dkdv(Q, K, V, DO, LSE, DELTA, OFFSETS, QLIST, DK, DV_OUT,
                     sqb, sqy, sqx, sqh, skb, sky, skx, skh, svb, svy, svx, svh,
                     sdob, sdoy, sdox, sdoh,
                     W, NTOK, HEADS, R, scale_log2, scale, D_REAL, DV_REAL,
                     RH: tl.constexpr, RW: tl.constexpr, NW: tl.constexpr, T: tl.constexpr, NT: tl.constexpr,
                     BLOCK_N: tl.constexpr, QT: tl.constexpr, QE: tl.constexpr,
                     D: tl.constexpr, DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // HEADS, bh % HEADS
    kr, nt = pid // NT, pid % NT
    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < T
    ky, kx = _tile_coords(kr, offs_n, RH, RW, NW)
    offs_d, offs_dv = tl.arange(0, D), tl.arange(0, DV)
    k = tl.load(K + b * skb + ky[:, None] * sky + kx[:, None] * skx + h * skh + offs_d[None, :],
                mask=n_ok[:, None] & (offs_d[None, :] < D_REAL), other=0.0)
    v = tl.load(V + b * svb + ky[:, None] * svy + kx[:, None] * svx + h * svh + offs_dv[None, :],
                mask=n_ok[:, None] & (offs_dv[None, :] < DV_REAL), other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, DV], tl.float32)
    # the query regions that routed to this key region (one entry per choice, repeats included)
    start = tl.load(OFFSETS + b * R + kr)
    end = tl.load(OFFSETS + b * R + kr + 1)
    offs_m = tl.arange(0, QE * QT)
    for e0 in range(start, end, QE):
        entry = e0 + offs_m // QT
        e_ok = entry < end
        qr = tl.load(QLIST + entry, mask=e_ok, other=0)
        for t0 in range(0, T, QT):
            tok = t0 + offs_m % QT
            m_ok = e_ok & (tok < T)
            qy, qx = _tile_coords(qr, tok, RH, RW, NW)
            q = tl.load(Q + b * sqb + qy[:, None] * sqy + qx[:, None] * sqx + h * sqh + offs_d[None, :],
                        mask=m_ok[:, None] & (offs_d[None, :] < D_REAL), other=0.0)  # (M, D)
            do = tl.load(DO + b * sdob + qy[:, None] * sdoy + qx[:, None] * sdox + h * sdoh + offs_dv[None, :],
                         mask=m_ok[:, None] & (offs_dv[None, :] < DV_REAL), other=0.0)  # (M, DV)
            lse = tl.load(LSE + bh * NTOK + qy * W + qx, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + bh * NTOK + qy * W + qx, mask=m_ok, other=0.0)
            st = _dot(k, tl.trans(q), PREC, UPCAST) * scale_log2  # (N, M)
            pt = tl.where(m_ok[None, :], tl.exp2(st - lse[None, :]), 0.0)
            dv += _dot(pt.to(do.dtype), do, PREC, UPCAST)
            dpt = _dot(v, tl.trans(do), PREC, UPCAST)
            dst = pt * (dpt - delta[None, :])
            dk += _dot(dst.to(q.dtype), q, PREC, UPCAST)
    # DK, DV_OUT are contiguous (B, H, W, heads, d)
    tok_off = ((b * (NTOK // W) + ky) * W + kx) * HEADS + h
    tl.store(DK + tok_off[:, None] * D_REAL + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=n_ok[:, None] & (offs_d[None, :] < D_REAL))
    tl.store(DV_OUT + tok_off[:, None] * DV_REAL + offs_dv[None, :], dv.to(DV_OUT.dtype.element_ty),
             mask=n_ok[:, None] & (offs_dv[None, :] < DV_REAL))


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _tiles(t: int, topk: int) -> dict:
    """Tile sizes: query chunks of up to 64 tokens; key tiles of >= 16 and up to 64 lanes, packing
    several small regions (KR x KT) so tl.dot always has a legal shape."""
    kt = min(_pow2(t), 64)
    kr = max(16 // kt, min(64 // kt, _pow2(topk)), 1)
    block_m = max(16, min(_pow2(t), 64))
    return dict(BLOCK_M=block_m, KT=kt, KR=kr)


def _prec(dtype: torch.dtype) -> dict:
    return dict(PREC="ieee" if dtype == torch.float32 else "tf32",
                UPCAST=dtype == torch.bfloat16 and triton_interpreting())


def _strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


class _RoutedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, region_index, nh, nw, scale):
        q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
        b, h, w, heads, dqk = q.shape
        dv = v.shape[-1]
        idx = region_index.to(torch.int32).contiguous()
        topk = idx.shape[-1]
        rh, rw = h // nh, w // nw
        t = rh * rw
        tiles = _tiles(t, topk)
        mt = triton.cdiv(t, tiles["BLOCK_M"])
        out = torch.empty(b, h, w, heads, dv, device=q.device, dtype=q.dtype)
        lse = torch.empty(b, heads, h * w, device=q.device, dtype=torch.float32)
        _routed_fwd[(nh * nw * mt, b * heads)](
            q, k, v, idx, out, lse, *_strides(q), *_strides(k), *_strides(v), idx.stride(0), idx.stride(1),
            *_strides(out), w, h * w, heads, topk, scale * _LOG2E, dqk, dv,
            RH=rh, RW=rw, NW=nw, T=t, MT=mt, D=max(16, _pow2(dqk)), DV=max(16, _pow2(dv)), **_prec(q.dtype),
            num_warps=4, **tiles)
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
                      **_prec(q.dtype), num_warps=4)
        dq = torch.empty_like(q)
        tiles = _tiles(t, topk)
        mt = triton.cdiv(t, tiles["BLOCK_M"])
        _routed_bwd_dq[(r * mt, b * heads)](
            q, k, v, idx, dout, out, lse, delta, dq, *_strides(q), *_strides(k), *_strides(v),
            idx.stride(0), idx.stride(1), *_strides(dout), *_strides(out), w, h * w, heads, topk, scale * _LOG2E, scale,
            dqk, dv_dim, MT=mt, **tiles, **common)
        # inverse routing table: for each (batch, key region) the query regions that chose it
        # (sort + searchsorted rather than bincount, which would synchronise with the host)
        key_region = (idx + torch.arange(0, b * r, r, device=q.device, dtype=torch.int32)[:, None, None]).view(-1)
        sorted_keys, order = torch.sort(key_region, stable=True)
        qlist = ((order // topk) % r).to(torch.int32)
        offsets = torch.searchsorted(sorted_keys, torch.arange(b * r + 1, device=q.device, dtype=torch.int32),
                                     out_int32=True)
        dk = torch.empty(b, h, w, heads, dqk, device=q.device, dtype=q.dtype)
        dv = torch.empty(b, h, w, heads, dv_dim, device=q.device, dtype=v.dtype)
        block_n = max(16, min(_pow2(t), 64))
        qt = min(_pow2(t), 64)
        qe = max(16 // qt, min(64 // qt, 4), 1)
        nt = triton.cdiv(t, block_n)
        _routed_bwd_dkdv[(r * nt, b * heads)](
            q, k, v, dout, lse, delta, offsets, qlist, dk, dv, *_strides(q), *_strides(k), *_strides(v),
            *_strides(dout), w, h * w, heads, r, scale * _LOG2E, scale, dqk, dv_dim,
            NT=nt, BLOCK_N=block_n, QT=qt, QE=qe, **common)
        return dq, dk, dv, None, None, None, None


def routed_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region_index: torch.Tensor,
                            nh: int, nw: int, scale: float) -> torch.Tensor:
    """Fused routed attention (validated inputs; see :func:`attnzoo.kernels.routed_attention`)."""
    return _RoutedAttention.apply(q, k, v, region_index, nh, nw, scale)
