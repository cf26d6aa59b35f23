"""Fused Triton kernels for strip attention (ELA-style gates over H and W). Imported lazily by strip_gate.py.

Two kernels over (B, C, H, W) maps that are dense NCHW or dense channels_last (other strides are copied
to NCHW first); the tile shape follows the layout so the unit-stride axis is read in long runs:

- ``_strip_reduce``: one pass over the map giving per-row sums over W (B, C, H) and per-column sums over
  H (B, C, W) in float32. Plain, it gives the strip means; gated, it is the backward reduction of
  ``out = act(x * g_h * g_w + s)``: with ``d = dout * act'`` it gives ``sum_W(d * x * g_w)`` and
  ``sum_H(d * x * g_h)`` and can store ``d`` on the way (the shortcut's gradient).
- ``_strip_gate``: ``out = act(x * g_h[h] * g_w[w] + s_h * a_h[h] + s_w * a_w[w] + s)`` element-wise, one read
  and one write of the map. Forward: the gating with the residual add and ReLU of the host block fused in;
  backward: ``dx = d * g_h * g_w + dz_h / W + dz_w / H`` (gate gradient plus the strip means' gradient).

Each program owns a tile of [BC channels, BH rows, BW columns]. The map's height and width and each map's
layout are compile-time constants: the compiler then knows the alignment of every row and loads whole
vectors along the unit-stride axis (a ResNet compiles one variant per stage shape; the batch size is not
among them), and a launch passes few arguments (the host's launch path is part of the cost here).
The reduction walks all rows of its column block, so column sums need no atomics; when W spans several
column blocks, each block writes its own partial row sums and the host sums those few partials.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl


@triton.jit
def _offsets(b64, c3, h3, w3, C, H: tl.constexpr, W: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    # element offsets in a dense (B, C, H, W) map, NCHW or channels_last
    if CHANNELS_LAST:
        return b64 * C * (H * W) + (h3 * W + w3) * C + c3
    return b64 * C * (H * W) + c3 * (H * W) + h3 * W + w3


@triton.jit
def _strip_reduce(X, DOUT, OUT, GH, GW, DPRE, ROWS, COLS,
                  C, NCB, NWB, row_scale, col_scale,
                  H: tl.constexpr, W: tl.constexpr, X_CL: tl.constexpr, D_CL: tl.constexpr,
                  GATED: tl.constexpr, RELU: tl.constexpr, STORE_DPRE: tl.constexpr,
                  BC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    pid, wb = tl.program_id(0), tl.program_id(1)
    b, cb = pid // NCB, pid % NCB
    b64 = b.to(tl.int64)  # element offsets of large maps pass 2**31
    offs_c = cb * BC + tl.arange(0, BC)
    offs_w = wb * BW + tl.arange(0, BW)
    c_ok, w_ok = offs_c < C, offs_w < W
    bc_row = b64 * C + offs_c  # row index of (b, c) in the (B*C, L) strip tensors
    cw_mask = c_ok[:, None] & w_ok[None, :]
    if GATED:
        gw = tl.load(GW + bc_row[:, None] * W + offs_w[None, :], mask=cw_mask, other=0.0).to(tl.float32)
    # column sums accumulate per row slot and reduce over rows once at the end (no per-step cross-warp sum)
    col = tl.zeros([BC, BH, BW], dtype=tl.float32)
    for h0 in range(0, H, BH):
        offs_h = h0 + tl.arange(0, BH)
        h_ok = offs_h < H
        ch_mask = c_ok[:, None] & h_ok[None, :]
        mask = ch_mask[:, :, None] & w_ok[None, None, :]
        c3, h3, w3 = offs_c[:, None, None], offs_h[None, :, None], offs_w[None, None, :]
        x_offs = _offsets(b64, c3, h3, w3, C, H, W, X_CL)
        x = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)
        if GATED:  # dout and d share one layout; out (the ReLU's output) shares x's
            d_offs = _offsets(b64, c3, h3, w3, C, H, W, D_CL)
            d = tl.load(DOUT + d_offs, mask=mask, other=0.0).to(tl.float32)
            if RELU:  # ReLU's gradient from its output: pass where out > 0
                o = tl.load(OUT + x_offs, mask=mask, other=0.0)
                d = tl.where(o > 0, d, 0.0)
            if STORE_DPRE:
                tl.store(DPRE + d_offs, d.to(DPRE.dtype.element_ty), mask=mask)
            gh = tl.load(GH + bc_row[:, None] * H + offs_h[None, :], mask=ch_mask, other=0.0).to(tl.float32)
            dx = d * x
            rows = tl.sum(dx * gw[:, None, :], axis=2)
            col += dx * gh[:, :, None]
        else:
            rows = tl.sum(x, axis=2)
            col += x
        tl.store(ROWS + (bc_row[:, None] * H + offs_h[None, :]) * NWB + wb, rows * row_scale, mask=ch_mask)
    tl.store(COLS + bc_row[:, None] * W + offs_w[None, :], tl.sum(col, axis=1) * col_scale, mask=cw_mask)


@triton.jit
def _strip_gate(X, GH, GW, AH, AW, S, OUT,
                C, NCB, ah_scale, aw_scale,
                H: tl.constexpr, W: tl.constexpr, X_CL: tl.constexpr, S_CL: tl.constexpr,
                HAS_ADD: tl.constexpr, HAS_SHORTCUT: tl.constexpr, RELU: tl.constexpr,
                BC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    pid, wb, hb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, cb = pid // NCB, pid % NCB
    b64 = b.to(tl.int64)
    offs_c = cb * BC + tl.arange(0, BC)
    offs_h = hb * BH + tl.arange(0, BH)
    offs_w = wb * BW + tl.arange(0, BW)
    c_ok, h_ok, w_ok = offs_c < C, offs_h < H, offs_w < W
    bc_row = b64 * C + offs_c
    ch_mask, cw_mask = c_ok[:, None] & h_ok[None, :], c_ok[:, None] & w_ok[None, :]
    mask = ch_mask[:, :, None] & w_ok[None, None, :]
    c3, h3, w3 = offs_c[:, None, None], offs_h[None, :, None], offs_w[None, None, :]
    x_offs = _offsets(b64, c3, h3, w3, C, H, W, X_CL)  # out shares x's layout
    x = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)
    gh = tl.load(GH + bc_row[:, None] * H + offs_h[None, :], mask=ch_mask, other=0.0).to(tl.float32)
    gw = tl.load(GW + bc_row[:, None] * W + offs_w[None, :], mask=cw_mask, other=0.0).to(tl.float32)
    y = x * gh[:, :, None] * gw[:, None, :]
    if HAS_ADD:
        ah = tl.load(AH + bc_row[:, None] * H + offs_h[None, :], mask=ch_mask, other=0.0)
        aw = tl.load(AW + bc_row[:, None] * W + offs_w[None, :], mask=cw_mask, other=0.0)
        y += ah[:, :, None] * ah_scale + aw[:, None, :] * aw_scale
    if HAS_SHORTCUT:
        s_offs = _offsets(b64, c3, h3, w3, C, H, W, S_CL)
        y += tl.load(S + s_offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(OUT + x_offs, y.to(OUT.dtype.element_ty), mask=mask)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _tiles(x: torch.Tensor) -> tuple[int, int, int]:
    """(BC, BH, BW) of about 2048 elements, shaped so the unit-stride axis is read in long runs."""
    _, c, h, w = x.shape
    bw = min(_pow2(w), 64)
    if x.stride(1) == 1 and c > 1:  # channels_last: 32 channels (64 bytes of bf16) per position
        bc = min(_pow2(c), 32)
        bh = min(_pow2(h), max(1, 2048 // (bc * bw)))
    else:  # NCHW: each channel's plane is contiguous, whole rows per tile
        bh = min(_pow2(h), max(1, 1024 // bw))
        bc = min(_pow2(c), max(1, 2048 // (bw * bh)))
    return bc, bh, bw


def _dense(t: torch.Tensor) -> torch.Tensor:
    # the kernels address dense NCHW or channels_last maps; anything else (views with gaps, expanded gradients
    # from .sum()) is copied to NCHW first
    return t if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last) else t.contiguous()


def _channels_last(t: torch.Tensor | None) -> bool:
    # for a dense map; where both layouts hold (C == 1 or H * W == 1) their offsets coincide
    return t is not None and not t.is_contiguous()


def _strip_tensor(t: torch.Tensor) -> torch.Tensor:
    # (B, C, L) gates/addends are read as dense row-major strips
    return t if t.is_contiguous() else t.contiguous()


def strip_reduce(x: torch.Tensor, dout: torch.Tensor | None = None, out: torch.Tensor | None = None,
                 g_h: torch.Tensor | None = None, g_w: torch.Tensor | None = None, store_dpre: bool = False,
                 row_scale: float = 1.0, col_scale: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row sums over W and column sums over H of ``x`` (plain) or of ``d * x`` weighted by the other axis's gate
    (gated: ``dout`` given; ``d = dout * (out > 0)`` when ``out`` is given, else ``dout``).

    Returns (rows (B, C, H) float32 * row_scale, cols (B, C, W) float32 * col_scale, d or None), ``d``
    stored only when ``store_dpre`` (in dout's dtype and layout).
    """
    x = _dense(x)  # out, when given, has x's layout (it came from strip_gate on the same x)
    dout = None if dout is None else _dense(dout)
    b, c, h, w = x.shape
    bc, bh, bw = _tiles(x)
    ncb, nwb = triton.cdiv(c, bc), triton.cdiv(w, bw)
    rows = torch.empty((b, c, h, nwb), device=x.device, dtype=torch.float32)
    cols = torch.empty((b, c, w), device=x.device, dtype=torch.float32)
    gated = dout is not None
    dpre = torch.empty_like(dout) if store_dpre else None
    dummy = x  # never dereferenced: the constexpr flags remove the loads that would use it
    _strip_reduce[(b * ncb, nwb)](
        x, dout if gated else dummy, out if out is not None else dummy,
        _strip_tensor(g_h) if gated else dummy, _strip_tensor(g_w) if gated else dummy,
        dpre if store_dpre else dummy, rows, cols,
        c, ncb, nwb, float(row_scale), float(col_scale), h, w, _channels_last(x), _channels_last(dout),
        GATED=gated, RELU=out is not None, STORE_DPRE=store_dpre, BC=bc, BH=bh, BW=bw, num_warps=4)
    rows = rows.squeeze(-1) if nwb == 1 else rows.sum(-1)
    return rows, cols, dpre


def strip_gate(x: torch.Tensor, g_h: torch.Tensor, g_w: torch.Tensor, a_h: torch.Tensor | None = None,
               a_w: torch.Tensor | None = None, shortcut: torch.Tensor | None = None, relu: bool = False,
               out_dtype: torch.dtype | None = None, a_scales: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """``act(x * g_h[..., None] * g_w[..., None, :] + s_h * a_h[..., None] + s_w * a_w[..., None, :] + shortcut)``
    in one pass (``(s_h, s_w) = a_scales``), computed in float32 and stored in ``out_dtype`` (default x's dtype)
    with x's memory layout."""
    x = _dense(x)
    shortcut = None if shortcut is None else _dense(shortcut)
    b, c, h, w = x.shape
    bc, bh, bw = _tiles(x)
    ncb = triton.cdiv(c, bc)
    out = torch.empty_like(x, dtype=out_dtype or x.dtype)  # x's layout
    has_add = a_h is not None
    _strip_gate[(b * ncb, triton.cdiv(w, bw), triton.cdiv(h, bh))](
        x, _strip_tensor(g_h), _strip_tensor(g_w),
        _strip_tensor(a_h.float()) if has_add else x, _strip_tensor(a_w.float()) if has_add else x,
        shortcut if shortcut is not None else x, out,
        c, ncb, float(a_scales[0]), float(a_scales[1]), h, w, _channels_last(x), _channels_last(shortcut),
        HAS_ADD=has_add, HAS_SHORTCUT=shortcut is not None, RELU=relu, BC=bc, BH=bh, BW=bw, num_warps=4)
    return out


def strip_means(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over W (B, C, H), mean over H (B, C, W)), float32, from one read of x."""
    rows, cols, _ = strip_reduce(x, row_scale=1.0 / x.shape[3], col_scale=1.0 / x.shape[2])
    return rows, cols


def _gate_backward(dout: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None, g_h: torch.Tensor,
                   g_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d, dg_h, dg_w) for ``out = act(x * g_h * g_w [+ s])``: d = dout * act' (dout itself without ReLU)."""
    relu = out is not None
    dg_h, dg_w, dpre = strip_reduce(x, dout, out, g_h, g_w, store_dpre=relu)
    return (dpre if relu else dout), dg_h.to(g_h.dtype), dg_w.to(g_w.dtype)


class StripMeans(torch.autograd.Function):
    """(z_h, z_w) = (mean_W(x), mean_H(x)) in float32; backward: the broadcast of both gradients."""

    @staticmethod
    def forward(ctx, x):
        ctx.x_meta = (x.shape, x.dtype)
        return strip_means(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dz_h, dz_w):
        (_, _, h, w), dtype = ctx.x_meta
        return (dz_h[..., :, None] / w + dz_w[..., None, :] / h).to(dtype)


class StripGate(torch.autograd.Function):
    """``out = act(x * g_h * g_w + shortcut)`` with the fused forward and one fused backward reduction."""

    @staticmethod
    def forward(ctx, x, g_h, g_w, shortcut, relu):
        out = strip_gate(x, g_h, g_w, shortcut=shortcut, relu=relu)
        ctx.shortcut_dtype = None if shortcut is None else shortcut.dtype
        ctx.save_for_backward(x, g_h, g_w, out if relu else None)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, g_h, g_w, out = ctx.saved_tensors
        d, dg_h, dg_w = _gate_backward(dout, x, out, g_h, g_w)
        dx = strip_gate(d, g_h, g_w, out_dtype=x.dtype) if ctx.needs_input_grad[0] else None
        ds = None if ctx.shortcut_dtype is None else d.to(ctx.shortcut_dtype)
        return dx, dg_h, dg_w, ds, None


class StripAttention(torch.autograd.Function):
    """``out = act(x * y_h * y_w + shortcut)`` with ``(y_h, y_w) = gate_fn(mean_W(x), mean_H(x))``, fused.

    ``gate_fn`` (the small part on (B, C, H) and (B, C, W)) runs in PyTorch; its graph is recorded in the
    forward and differentiated in the backward, so the map is touched by only two kernels each way:
    forward the strip means and the gating; backward one reduction (gate gradients, ReLU mask, shortcut
    gradient) and one element-wise pass (``dx = d * y_h * y_w + dz_h / W + dz_w / H``). ``params`` are
    the tensors gate_fn reads that need gradients (passed so autograd routes their gradients).
    """

    @staticmethod
    def forward(ctx, x, shortcut, gate_fn, relu, *params):
        z_h, z_w = strip_means(x)
        with torch.enable_grad():
            z_h.requires_grad_(), z_w.requires_grad_()
            y_h, y_w = gate_fn(z_h, z_w)
        out = strip_gate(x, y_h.detach(), y_w.detach(), shortcut=shortcut, relu=relu)
        ctx.inner = (z_h, z_w, y_h, y_w)
        ctx.params = params
        ctx.shortcut_dtype = None if shortcut is None else shortcut.dtype
        ctx.save_for_backward(x, out if relu else None)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, out = ctx.saved_tensors
        z_h, z_w, y_h, y_w = ctx.inner
        del ctx.inner  # the recorded gate graph is used once
        g_h, g_w = y_h.detach(), y_w.detach()
        d, dg_h, dg_w = _gate_backward(dout, x, out, g_h, g_w)
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[4:]) if need]
        grads = torch.autograd.grad((y_h, y_w), [z_h, z_w, *(ctx.params[i] for i in wanted)], (dg_h, dg_w),
                                    allow_unused=True)
        dz_h, dz_w = grads[0], grads[1]
        dparams: list[torch.Tensor | None] = [None] * len(ctx.params)
        for i, g in zip(wanted, grads[2:]):
            dparams[i] = g
        dx = None
        if ctx.needs_input_grad[0]:
            h, w = x.shape[2], x.shape[3]
            a_h = torch.zeros_like(z_h) if dz_h is None else dz_h
            a_w = torch.zeros_like(z_w) if dz_w is None else dz_w
            dx = strip_gate(d, g_h, g_w, a_h=a_h, a_w=a_w, out_dtype=x.dtype, a_scales=(1.0 / w, 1.0 / h))
        ds = None if ctx.shortcut_dtype is None else d.to(ctx.shortcut_dtype)
        return (dx, ds, None, None, *dparams)


def strip_attention(x: torch.Tensor, gate_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                    shortcut: torch.Tensor | None, relu: bool, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Entry for strip_gate.strip_attention on the triton backend (arguments checked there)."""
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, shortcut, *params))):
        z_h, z_w = strip_means(x)
        y_h, y_w = gate_fn(z_h, z_w)
        return strip_gate(x, y_h, y_w, shortcut=shortcut, relu=relu)
    return StripAttention.apply(x, shortcut, gate_fn, relu, *params)

