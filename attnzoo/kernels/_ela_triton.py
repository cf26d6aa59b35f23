"""Fused Triton kernels for strip attention (ELA-style gates over H and W). Imported lazily by strip_gate.py.

Two kernels over a (B, C, H, W) map with any strides (NCHW-contiguous and channels_last both read
coalesced: Triton specialises the unit stride, and the tile shape follows the layout):

- ``_strip_reduce``: one pass over the map giving per-row sums over W (B, C, H) and per-column sums over
  H (B, C, W) in float32. Plain, it gives the strip means; gated, it is the backward reduction of
  ``out = act(x * g_h * g_w + s)``: with ``d = dout * act'`` it gives ``sum_W(d * x * g_w)`` and
  ``sum_H(d * x * g_h)`` and can store ``d`` on the way (the shortcut's gradient).
- ``_strip_gate``: ``out = act(x * g_h[h] * g_w[w] + a_h[h] + a_w[w] + s)`` element-wise, one read and one
  write of the map. Forward: the gating with the residual add and ReLU of the host block fused in;
  backward: ``dx = d * g_h * g_w + dz_h / W + dz_w / H`` (gate gradient plus the strip means' gradient).

Each program owns a tile of [BC channels, BH rows, BW columns]. The map's height, width and strides are
compile-time constants: the compiler then knows the alignment of every row and loads whole vectors along
the unit-stride axis (a ResNet compiles one variant per stage shape; the batch size is not among them).
The reduction walks all rows of its column block, so column sums need no atomics; when W spans several
column blocks, each block writes its own partial row sums and the host sums those few partials.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl


@triton.jit
def _strip_reduce(X, DOUT, OUT, GH, GW, DPRE, ROWS, COLS,
                  C, NCB, NWB, row_scale, col_scale,
                  H: tl.constexpr, W: tl.constexpr,
                  sxb: tl.constexpr, sxc: tl.constexpr, sxh: tl.constexpr, sxw: tl.constexpr,
                  sdb: tl.constexpr, sdc: tl.constexpr, sdh: tl.constexpr, sdw: tl.constexpr,
                  sob: tl.constexpr, soc: tl.constexpr, soh: tl.constexpr, sow: tl.constexpr,
                  spb: tl.constexpr, spc: tl.constexpr, sph: tl.constexpr, spw: tl.constexpr,
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
        x = tl.load(X + b64 * sxb + c3 * sxc + h3 * sxh + w3 * sxw, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            d = tl.load(DOUT + b64 * sdb + c3 * sdc + h3 * sdh + w3 * sdw, mask=mask, other=0.0).to(tl.float32)
            if RELU:  # ReLU's gradient from its output: pass where out > 0
                o = tl.load(OUT + b64 * sob + c3 * soc + h3 * soh + w3 * sow, mask=mask, other=0.0)
                d = tl.where(o > 0, d, 0.0)
            if STORE_DPRE:
                tl.store(DPRE + b64 * spb + c3 * spc + h3 * sph + w3 * spw, d.to(DPRE.dtype.element_ty), mask=mask)
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
                H: tl.constexpr, W: tl.constexpr,
                sxb: tl.constexpr, sxc: tl.constexpr, sxh: tl.constexpr, sxw: tl.constexpr,
                ssb: tl.constexpr, ssc: tl.constexpr, ssh: tl.constexpr, ssw: tl.constexpr,
                sob: tl.constexpr, soc: tl.constexpr, soh: tl.constexpr, sow: tl.constexpr,
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
    x = tl.load(X + b64 * sxb + c3 * sxc + h3 * sxh + w3 * sxw, mask=mask, other=0.0).to(tl.float32)
    gh = tl.load(GH + bc_row[:, None] * H + offs_h[None, :], mask=ch_mask, other=0.0).to(tl.float32)
    gw = tl.load(GW + bc_row[:, None] * W + offs_w[None, :], mask=cw_mask, other=0.0).to(tl.float32)
    y = x * gh[:, :, None] * gw[:, None, :]
    if HAS_ADD:
        ah = tl.load(AH + bc_row[:, None] * H + offs_h[None, :], mask=ch_mask, other=0.0)
        aw = tl.load(AW + bc_row[:, None] * W + offs_w[None, :], mask=cw_mask, other=0.0)
        y += ah[:, :, None] * ah_scale + aw[:, None, :] * aw_scale
    if HAS_SHORTCUT:
        y += tl.load(S + b64 * ssb + c3 * ssc + h3 * ssh + w3 * ssw, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(OUT + b64 * sob + c3 * soc + h3 * soh + w3 * sow, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _conv_norm_gate(ZH, ZW, WT, GAMMA, BETA, YH, YW, AH, AW, MEAN, RSTD, B, C, NG, eps,
                    H: tl.constexpr, W: tl.constexpr, CG: tl.constexpr, CPG: tl.constexpr, K: tl.constexpr,
                    CGP: tl.constexpr, LP: tl.constexpr, KP: tl.constexpr, SAVE: tl.constexpr):
    # One program: one sample, one GroupNorm group (CG channels), one strip (0: the H strip, 1: the W strip).
    pid, strip = tl.program_id(0), tl.program_id(1)
    b, g = pid // NG, pid % NG
    L = H if strip == 0 else W
    Z = ZH if strip == 0 else ZW
    offs_o = g * CG + tl.arange(0, CGP)  # output channels of this group
    offs_l = tl.arange(0, LP)
    o_ok, l_ok = offs_o < (g + 1) * CG, offs_l < L
    zrow0 = (b.to(tl.int64) * C + (offs_o // CPG) * CPG) * L  # first input channel of each output's conv group
    offs_t = tl.arange(0, KP)  # conv taps, vectorised; zero "same" padding by masking
    pos = offs_l[None, None, :] + offs_t[None, :, None] - K // 2  # (1, KP, LP) input positions
    tap_ok = o_ok[:, None] & (offs_t < K)[None, :]
    z_ok = tap_ok[:, :, None] & l_ok[None, None, :] & (pos >= 0) & (pos < L)
    acc = tl.zeros([CGP, LP], dtype=tl.float32)
    for i in tl.static_range(CPG):  # input channel i of each output's conv group
        z = tl.load(Z + (zrow0 + i * L)[:, None, None] + pos, mask=z_ok, other=0.0)
        wt = tl.load(WT + (offs_o * CPG + i)[:, None] * K + offs_t[None, :], mask=tap_ok, other=0.0).to(tl.float32)
        acc += tl.sum(wt[:, :, None] * z, axis=1)
    valid = o_ok[:, None] & l_ok[None, :]
    count = CG * L
    mean = tl.sum(tl.sum(tl.where(valid, acc, 0.0), axis=1), axis=0) / count
    cen = tl.where(valid, acc - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(cen * cen, axis=1), axis=0) / count + eps)
    gamma = tl.load(GAMMA + offs_o, mask=o_ok, other=0.0).to(tl.float32)
    beta = tl.load(BETA + offs_o, mask=o_ok, other=0.0).to(tl.float32)
    y = tl.sigmoid(cen * rstd * gamma[:, None] + beta[:, None])
    out_offs = (b.to(tl.int64) * C + offs_o)[:, None] * L + offs_l[None, :]
    tl.store((YH if strip == 0 else YW) + out_offs, y, mask=valid)
    if SAVE:  # what GroupNorm's backward needs: its input and per-(sample, group) statistics
        tl.store((AH if strip == 0 else AW) + out_offs, acc, mask=valid)
        tl.store(MEAN + (strip * B + b) * NG + g, mean)
        tl.store(RSTD + (strip * B + b) * NG + g, rstd)


def conv_norm_gates(z_h: torch.Tensor, z_w: torch.Tensor, weight: torch.Tensor, gn_weight: torch.Tensor,
                    gn_bias: torch.Tensor, norm_groups: int, eps: float, save: bool = False,
                    y_out: tuple[torch.Tensor, torch.Tensor] | None = None,
                    a_out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """sigmoid(GroupNorm(conv1d(z))) for both strips in one launch, float32 (no autograd of its own).

    z_h (B, C, H), z_w (B, C, W); weight (C, C / conv_groups, K) with "same" zero padding K // 2.
    Returns (y_h, y_w), plus with ``save`` the conv outputs (a_h, a_w) and GroupNorm mean and rstd, each
    (2, B, groups) float32 (strip-major). ``y_out`` / ``a_out``: preallocated contiguous float32 outputs.
    """
    b, c, h = z_h.shape
    w = z_w.shape[2]
    cpg, k = weight.shape[1], weight.shape[2]
    cg = c // norm_groups
    z_h, z_w = z_h.float().contiguous(), z_w.float().contiguous()
    y_h, y_w = y_out if y_out is not None else (torch.empty_like(z_h), torch.empty_like(z_w))
    if save:
        a_h, a_w = a_out if a_out is not None else (torch.empty_like(z_h), torch.empty_like(z_w))
        stats = torch.empty((2, 2, b, norm_groups), device=z_h.device, dtype=torch.float32)
        mean, rstd = stats[0], stats[1]
    else:
        a_h = a_w = mean = rstd = y_h  # never written: SAVE is off
    _conv_norm_gate[(b * norm_groups, 2)](
        z_h, z_w, weight.contiguous(), gn_weight, gn_bias, y_h, y_w, a_h, a_w, mean, rstd, b, c, norm_groups,
        float(eps), H=h, W=w, CG=cg, CPG=cpg, K=k, CGP=_pow2(cg), LP=_pow2(max(h, w)), KP=_pow2(k),
        SAVE=save, num_warps=4)
    return (y_h, y_w, a_h, a_w, mean, rstd) if save else (y_h, y_w)


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


def _strides(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    return (0, 0, 0, 0) if t is None else (t.stride(0), t.stride(1), t.stride(2), t.stride(3))


def _strip_tensor(t: torch.Tensor) -> torch.Tensor:
    # (B, C, L) gates/addends are read as dense row-major strips
    return t if t.is_contiguous() else t.contiguous()


def strip_reduce(x: torch.Tensor, dout: torch.Tensor | None = None, out: torch.Tensor | None = None,
                 g_h: torch.Tensor | None = None, g_w: torch.Tensor | None = None, store_dpre: bool = False,
                 row_scale: float = 1.0, col_scale: float = 1.0,
                 into: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row sums over W and column sums over H of ``x`` (plain) or of ``d * x`` weighted by the other axis's gate
    (gated: ``dout`` given; ``d = dout * (out > 0)`` when ``out`` is given, else ``dout``).

    Returns (rows (B, C, H) float32 * row_scale, cols (B, C, W) float32 * col_scale, d or None), ``d``
    stored only when ``store_dpre`` (in dout's dtype and layout). ``into``: contiguous float32 (B, C, H) and
    (B, C, W) tensors to write rows and cols into (e.g. the two halves of one stacked buffer).
    """
    b, c, h, w = x.shape
    bc, bh, bw = _tiles(x)
    ncb, nwb = triton.cdiv(c, bc), triton.cdiv(w, bw)
    if into is not None and nwb == 1:
        rows, cols = into[0].unsqueeze(-1), into[1]
    else:
        rows = torch.empty((b, c, h, nwb), device=x.device, dtype=torch.float32)
        cols = torch.empty((b, c, w), device=x.device, dtype=torch.float32) if into is None else into[1]
    gated = dout is not None
    dpre = torch.empty_like(dout) if store_dpre else None
    dummy = x  # never dereferenced: the constexpr flags remove the loads that would use it
    _strip_reduce[(b * ncb, nwb)](
        x, dout if gated else dummy, out if out is not None else dummy,
        _strip_tensor(g_h) if gated else dummy, _strip_tensor(g_w) if gated else dummy,
        dpre if store_dpre else dummy, rows, cols,
        c, ncb, nwb, float(row_scale), float(col_scale), h, w,
        *_strides(x), *_strides(dout), *_strides(out), *_strides(dpre),
        GATED=gated, RELU=out is not None, STORE_DPRE=store_dpre, BC=bc, BH=bh, BW=bw, num_warps=4)
    if nwb == 1:
        rows = rows.squeeze(-1)
    else:
        rows = rows.sum(-1) if into is None else torch.sum(rows, -1, out=into[0])
    return rows, cols, dpre


def strip_gate(x: torch.Tensor, g_h: torch.Tensor, g_w: torch.Tensor, a_h: torch.Tensor | None = None,
               a_w: torch.Tensor | None = None, shortcut: torch.Tensor | None = None, relu: bool = False,
               out_dtype: torch.dtype | None = None, a_scales: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """``act(x * g_h[..., None] * g_w[..., None, :] + s_h * a_h[..., None] + s_w * a_w[..., None, :] + shortcut)``
    in one pass (``(s_h, s_w) = a_scales``), computed in float32 and stored in ``out_dtype`` (default x's dtype)
    with x's memory layout."""
    b, c, h, w = x.shape
    bc, bh, bw = _tiles(x)
    ncb = triton.cdiv(c, bc)
    out = torch.empty_like(x, dtype=out_dtype or x.dtype)
    has_add = a_h is not None
    _strip_gate[(b * ncb, triton.cdiv(w, bw), triton.cdiv(h, bh))](
        x, _strip_tensor(g_h), _strip_tensor(g_w),
        _strip_tensor(a_h.float()) if has_add else x, _strip_tensor(a_w.float()) if has_add else x,
        shortcut if shortcut is not None else x, out,
        c, ncb, float(a_scales[0]), float(a_scales[1]), h, w, *_strides(x), *_strides(shortcut), *_strides(out),
        HAS_ADD=has_add, HAS_SHORTCUT=shortcut is not None, RELU=relu, BC=bc, BH=bh, BW=bw, num_warps=4)
    return out


def strip_means(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over W (B, C, H), mean over H (B, C, W)), float32, from one read of x."""
    rows, cols, _ = strip_reduce(x, row_scale=1.0 / x.shape[3], col_scale=1.0 / x.shape[2])
    return rows, cols


def _gate_backward(dout: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None, g_h: torch.Tensor,
                   g_w: torch.Tensor, into: tuple[torch.Tensor, torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d, dg_h, dg_w) for ``out = act(x * g_h * g_w [+ s])``: d = dout * act' (dout itself without ReLU)."""
    relu = out is not None
    dg_h, dg_w, dpre = strip_reduce(x, dout, out, g_h, g_w, store_dpre=relu, into=into)
    return (dpre if relu else dout), dg_h.to(g_h.dtype), dg_w.to(g_w.dtype)


def _dense(t: torch.Tensor) -> torch.Tensor:
    # incoming gradients can be expanded (stride 0, e.g. from .sum()); the kernels want one element per address
    return t if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last) else t.contiguous()


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
        d, dg_h, dg_w = _gate_backward(_dense(dout), x, out, g_h, g_w)
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
        d, dg_h, dg_w = _gate_backward(_dense(dout), x, out, g_h, g_w)
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


class ConvGateStripAttention(torch.autograd.Function):
    """ELA end to end, fused: ``out = act(x * y_h * y_w + shortcut)`` with ``y = sigmoid(GN(conv1d(z)))`` on the
    strip means ``z`` (conv and GroupNorm shared by both strips).

    Forward: three kernels (strip means; conv + GroupNorm + sigmoid for both strips, keeping the conv output
    and GroupNorm statistics; gating). Backward: one reduction over the map (gate gradients, ReLU mask,
    shortcut gradient), ATen's own sigmoid, GroupNorm and convolution backward on the small strips (square
    maps: both strips stacked along the batch, one call each), one element-wise pass for dx. The small part
    runs in float32 whatever the map's dtype; parameter gradients are cast to the parameters' dtypes.
    """

    @staticmethod
    def forward(ctx, x, shortcut, weight, gn_weight, gn_bias, norm_groups, eps, relu):
        b, c, h, w = x.shape
        square = h == w

        def strips() -> tuple[torch.Tensor, torch.Tensor] | None:  # two halves of one (2B, C, L) buffer
            if not square:
                return None
            t = torch.empty((2 * b, c, h), device=x.device, dtype=torch.float32)
            return t[:b], t[b:]

        z_h, z_w, _ = strip_reduce(x, row_scale=1.0 / w, col_scale=1.0 / h, into=strips())
        y_h, y_w, a_h, a_w, mean, rstd = conv_norm_gates(z_h, z_w, weight, gn_weight, gn_bias, norm_groups, eps,
                                                         save=True, y_out=strips(), a_out=strips())
        out = strip_gate(x, y_h, y_w, shortcut=shortcut, relu=relu)
        if square:  # the stacked buffers (halves' bases) and (2B, groups) statistics
            saved = [z_h._base, y_h._base, a_h._base, mean.reshape(2 * b, -1), rstd.reshape(2 * b, -1)]
        else:
            saved = [z_h, z_w, y_h, y_w, a_h, a_w, mean[0], mean[1], rstd[0], rstd[1]]
        ctx.save_for_backward(x, out if relu else None, weight, gn_weight, *saved)
        ctx.config = (norm_groups, square, None if shortcut is None else shortcut.dtype, gn_bias.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, out, weight, gn_weight, *saved = ctx.saved_tensors
        norm_groups, square, shortcut_dtype, gn_bias_dtype = ctx.config
        b, c, h, w = x.shape
        if square:
            zz, yy, aa, mean, rstd = saved
            groups = [(zz, yy, aa, mean, rstd)]
            y_h, y_w = yy[:b], yy[b:]
            dyy = torch.empty_like(yy)
            into = (dyy[:b], dyy[b:])
        else:
            z_h, z_w, y_h, y_w, a_h, a_w, m_h, m_w, r_h, r_w = saved
            groups = [(z_h, y_h, a_h, m_h, r_h), (z_w, y_w, a_w, m_w, r_w)]
            into = None
        d, dg_h, dg_w = _gate_backward(_dense(dout), x, out, y_h, y_w, into=into)
        dys = [dyy] if square else [dg_h, dg_w]
        need_w, need_gw, need_gb = ctx.needs_input_grad[2:5]
        k = weight.shape[2]
        w32, gw32 = weight.float(), gn_weight.float()
        dz, dweight, dgn_w, dgn_b = [], None, None, None
        for (z, y, a, mean, rstd), dy in zip(groups, dys):
            n, _, length = z.shape
            du = torch.ops.aten.sigmoid_backward(dy, y)
            da, dgw, dgb = torch.ops.aten.native_group_norm_backward(
                du, a, mean, rstd, gw32, n, c, length, norm_groups, [True, need_gw, need_gb])
            dzi, dwi, _ = torch.ops.aten.convolution_backward(
                da, z, w32, None, [1], [k // 2], [1], False, [0], c // weight.shape[1], [True, need_w, False])
            dz.append(dzi)
            dweight = dwi if dweight is None else dweight + dwi
            dgn_w = dgw if dgn_w is None else dgn_w + dgw
            dgn_b = dgb if dgn_b is None else dgn_b + dgb
        dz_h, dz_w = (dz[0][:b], dz[0][b:]) if square else (dz[0], dz[1])
        dx = None
        if ctx.needs_input_grad[0]:
            dx = strip_gate(d, y_h, y_w, a_h=dz_h, a_w=dz_w, out_dtype=x.dtype, a_scales=(1.0 / w, 1.0 / h))
        ds = None if shortcut_dtype is None else d.to(shortcut_dtype)

        def cast(g: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
            return None if g is None else g.to(dtype)

        return (dx, ds, cast(dweight, weight.dtype), cast(dgn_w, gn_weight.dtype), cast(dgn_b, gn_bias_dtype),
                None, None, None)


def strip_attention(x: torch.Tensor, gate_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                    shortcut: torch.Tensor | None, relu: bool, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Entry for strip_gate.strip_attention on the triton backend (arguments checked there)."""
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, shortcut, *params))):
        z_h, z_w = strip_means(x)
        y_h, y_w = gate_fn(z_h, z_w)
        return strip_gate(x, y_h, y_w, shortcut=shortcut, relu=relu)
    return StripAttention.apply(x, shortcut, gate_fn, relu, *params)


def strip_conv_attention(x: torch.Tensor, weight: torch.Tensor, gn_weight: torch.Tensor, gn_bias: torch.Tensor,
                         norm_groups: int, eps: float, shortcut: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """Entry for strip_gate.strip_conv_attention on the triton backend (arguments checked there)."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, shortcut, weight, gn_weight, gn_bias))
    if needs_grad:
        return ConvGateStripAttention.apply(x, shortcut, weight, gn_weight, gn_bias, norm_groups, eps, relu)
    z_h, z_w = strip_means(x)
    y_h, y_w = conv_norm_gates(z_h, z_w, weight, gn_weight, gn_bias, norm_groups, eps)
    return strip_gate(x, y_h, y_w, shortcut=shortcut, relu=relu)
