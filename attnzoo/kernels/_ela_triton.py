"""Fused Triton kernels for strip attention (ELA-style gates over H and W). Imported lazily by strip_gate.py.

Strip buffers: the two strips of a (B, C, H, W) map travel as ONE flat buffer of B * C * (H + W) values, the
(B, C, H) row strip first, then the (B, C, W) column strip, both row-major. A kernel finds the column half at
``B * C * H`` itself, so the host passes one pointer and makes no views.

Map kernels, over (B, C, H, W) maps that are dense NCHW or dense channels_last (other strides are copied to
NCHW first); the tile shape follows the layout so the unit-stride axis is read in long runs:

- ``_strip_reduce``: one pass over the map giving per-row sums over W and per-column sums over H (float32,
  into a strip buffer). Plain, it gives the strip means; gated, it is the backward reduction of
  ``out = act(x * g_h * g_w + s)``: with ``d = dout * act'`` it gives ``sum_W(d * x * g_w)`` and
  ``sum_H(d * x * g_h)`` and can store ``d`` on the way (the shortcut's gradient).
- ``_strip_gate``: ``out = act(x * g_h[h] * g_w[w] + s_h * a_h[h] + s_w * a_w[w] + s)`` element-wise, one read
  and one write of the map. Forward: the gating with the residual add and ReLU of the host block fused in;
  backward: ``dx = d * g_h * g_w + dz_h / W + dz_w / H`` (gate gradient plus the strip means' gradient).

Strip kernels, ELA's gate ``y = sigmoid(GroupNorm(conv1d(z)))`` on both strips of every sample at once (one
grouped 1-D conv and one GroupNorm shared by both axes, as the paper's module):

- ``_ela_gates_fwd``: one program per (channel block, strip); the block holds whole conv groups and whole
  GroupNorm groups, so the conv, the group statistics and the sigmoid stay in registers.
- ``_ela_gates_fwd_g8``: the same op for conv groups of 8 (ELA-S / ELA-L) whose GroupNorm groups hold whole conv
  groups: each input row is loaded once per tap for its group's 8 output channels (one accumulator tile per
  output channel), a program runs several strips per tile; used where measured faster (see ``_G8_INFER``).
- ``_ela_gates_bwd``: the hand-written backward from the forward's conv output (kept when a gradient is
  recorded): GroupNorm and conv input gradients per strip, conv weight and GroupNorm affine gradients summed
  over a run of strips per program (partials the host adds up in one sum).

The map's height and width and each map's layout are compile-time constants in the map kernels (a ResNet
compiles one variant per stage shape; the batch size is not among them). Every launch of the fused ELA op
goes through a per-shape plan (:class:`_ELAPlan`) that replays the compiled kernels directly
(:mod:`attnzoo.kernels._launch`), so a block's host path is a dict lookup, a few allocations and the launches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from . import _launch
from ._backend import triton_interpreting

# ---------------------------------------------------------------------------------------------- map kernels


@triton.jit
def _offsets(b64, c3, h3, w3, C, H: tl.constexpr, W: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    # element offsets in a dense (B, C, H, W) map, NCHW or channels_last
    if CHANNELS_LAST:
        return b64 * C * (H * W) + (h3 * W + w3) * C + c3
    return b64 * C * (H * W) + c3 * (H * W) + h3 * W + w3


@triton.jit
def _strip_reduce(X, DOUT, OUT, G, DPRE, ROWS, STRIPS,
                  NB, C, NCB, NWB, row_scale, col_scale,
                  H: tl.constexpr, W: tl.constexpr, X_CL: tl.constexpr, D_CL: tl.constexpr,
                  GATED: tl.constexpr, RELU: tl.constexpr, STORE_DPRE: tl.constexpr,
                  BC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    pid, wb = tl.program_id(0), tl.program_id(1)
    b, cb = pid // NCB, pid % NCB
    b64 = b.to(tl.int64)  # element offsets of large maps pass 2**31
    w_half = (b64 * 0 + NB) * C * H  # start of the column strips in a strip buffer
    offs_c = cb * BC + tl.arange(0, BC)
    offs_w = wb * BW + tl.arange(0, BW)
    c_ok, w_ok = offs_c < C, offs_w < W
    bc_row = b64 * C + offs_c  # row index of (b, c) in the (B*C, L) strips
    cw_mask = c_ok[:, None] & w_ok[None, :]
    if GATED:
        gw = tl.load(G + w_half + bc_row[:, None] * W + offs_w[None, :], mask=cw_mask, other=0.0).to(tl.float32)
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
            gh = tl.load(G + bc_row[:, None] * H + offs_h[None, :], mask=ch_mask, other=0.0).to(tl.float32)
            dx = d * x
            rows = tl.sum(dx * gw[:, None, :], axis=2)
            col += dx * gh[:, :, None]
        else:
            rows = tl.sum(x, axis=2)
            col += x
        # ROWS is the strip buffer itself when one column block spans W, else (B, C, H, NWB) partials
        tl.store(ROWS + (bc_row[:, None] * H + offs_h[None, :]) * NWB + wb, rows * row_scale, mask=ch_mask)
    tl.store(STRIPS + w_half + bc_row[:, None] * W + offs_w[None, :], tl.sum(col, axis=1) * col_scale,
             mask=cw_mask)


@triton.jit
def _strip_gate(X, G, A, S, OUT,
                NB, C, NCB, ah_scale, aw_scale,
                H: tl.constexpr, W: tl.constexpr, X_CL: tl.constexpr, S_CL: tl.constexpr,
                HAS_ADD: tl.constexpr, HAS_SHORTCUT: tl.constexpr, RELU: tl.constexpr,
                BC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    pid, wb, hb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, cb = pid // NCB, pid % NCB
    b64 = b.to(tl.int64)
    w_half = (b64 * 0 + NB) * C * H
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
    h_offs, w_offs = bc_row[:, None] * H + offs_h[None, :], w_half + bc_row[:, None] * W + offs_w[None, :]
    gh = tl.load(G + h_offs, mask=ch_mask, other=0.0).to(tl.float32)
    gw = tl.load(G + w_offs, mask=cw_mask, other=0.0).to(tl.float32)
    y = x * gh[:, :, None] * gw[:, None, :]
    if HAS_ADD:
        ah = tl.load(A + h_offs, mask=ch_mask, other=0.0).to(tl.float32)
        aw = tl.load(A + w_offs, mask=cw_mask, other=0.0).to(tl.float32)
        y += ah[:, :, None] * ah_scale + aw[:, None, :] * aw_scale
    if HAS_SHORTCUT:
        s_offs = _offsets(b64, c3, h3, w3, C, H, W, S_CL)
        y += tl.load(S + s_offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(OUT + x_offs, y.to(OUT.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------------------------- strip kernels


@triton.jit
def _strip_tile(s, c0, NB, C, H, W, CPG, NCH: tl.constexpr, BCO: tl.constexpr, BL: tl.constexpr,
                BG: tl.constexpr):
    # Strip s < NB is sample s's row strip (length H), s >= NB sample s - NB's column strip (length W).
    # Returns its length, its offset in the strip buffer, the block's channels and the channel -> group map.
    is_row = s < NB
    s64 = tl.cast(s, tl.int64)  # s is a plain int in the interpreter's loops
    length = tl.where(is_row, H, W)
    base = tl.where(is_row, s64 * C * H, s64 * 0 + NB * C * H + (s64 - NB) * C * W)
    local = tl.arange(0, BCO)
    offs_c = c0 + local
    c_ok = (local < NCH) & (offs_c < C)
    offs_l = tl.arange(0, BL)
    mask = c_ok[:, None] & (offs_l < length)[None, :]
    onehot = ((local // CPG)[:, None] == tl.arange(0, BG)[None, :]) & c_ok[:, None]
    return length, base, offs_c, c_ok, offs_l, mask, onehot


@triton.jit
def _grouped_taps(S, WT, w_step, offs_l, c_ok, length, CG: tl.constexpr, K: tl.constexpr, SIGN: tl.constexpr,
                  BCO: tl.constexpr, BL: tl.constexpr):
    # acc[c, l] = sum_{i < CG, k < K} WT[c][i * w_step + k] * S[c, l][i * length + SIGN * (k - K // 2)], zero outside
    # the strip. S is a pointer tile at each row's conv-group start and position l, WT a pointer per row: the
    # per-tap work is a scalar offset, one load and one FMA (the masks depend on k alone and leave the i loop).
    acc = tl.zeros([BCO, BL], dtype=tl.float32)
    for i in range(CG):  # a loop, not unrolled: unrolling CG * K gathers multiplies compile time
        for k in tl.static_range(K):
            shift = SIGN * (k - K // 2)
            m = c_ok[:, None] & ((offs_l + shift >= 0) & (offs_l + shift < length))[None, :]
            v = tl.load(S + (i * length + shift), mask=m, other=0.0)
            w = tl.load(WT + (i * w_step + k), mask=c_ok, other=0.0).to(tl.float32)
            acc += w[:, None] * v
    return acc


@triton.jit
def _conv_strip(Z, CW, base, offs_c, c_ok, offs_l, length, CG: tl.constexpr, K: tl.constexpr, BCO: tl.constexpr,
                BL: tl.constexpr):
    # u[c, l] = sum_{i < CG, k < K} w[c, i, k] * z[first(c) + i, l + k - K // 2] with zero padding, where
    # first(c) is the first channel of c's conv group
    first = (offs_c // CG) * CG
    rows = Z + base + first[:, None] * length + offs_l[None, :]
    return _grouped_taps(rows, CW + offs_c * (CG * K), K, offs_l, c_ok, length, CG, K, 1, BCO, BL)


@triton.jit
def _group_mean(per_channel, onehot, count):
    # per-channel sums [BCO] -> each channel's GroupNorm group mean [BCO] (groups of any size, via the map)
    groups = tl.sum(tl.where(onehot, per_channel[:, None], 0.0), axis=0) / count
    return tl.sum(tl.where(onehot, groups[None, :], 0.0), axis=1)


@triton.jit
def _group_norm(u, mask, onehot, count, eps):
    # (normalized u, 1 / std per channel); biased variance, as torch's GroupNorm; zero outside the mask
    mean = _group_mean(tl.sum(tl.where(mask, u, 0.0), axis=1), onehot, count)
    d = tl.where(mask, u - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt_rn(_group_mean(tl.sum(d * d, axis=1), onehot, count) + eps)
    return d * rstd[:, None], rstd


@triton.jit
def _ela_gates_fwd(Z, CW, GAMMA, BETA, U, Y,
                   NB, C, H, W, CPG, eps,
                   NCH: tl.constexpr, CG: tl.constexpr, K: tl.constexpr, BCO: tl.constexpr, BL: tl.constexpr,
                   BG: tl.constexpr, STORE_U: tl.constexpr):
    c0, s = tl.program_id(0) * NCH, tl.program_id(1)
    length, base, offs_c, c_ok, offs_l, mask, onehot = _strip_tile(s, c0, NB, C, H, W, CPG, NCH, BCO, BL, BG)
    strip_offs = base + offs_c[:, None] * length + offs_l[None, :]
    u = _conv_strip(Z, CW, base, offs_c, c_ok, offs_l, length, CG, K, BCO, BL)
    if STORE_U:  # kept for the backward (training), which then needs no conv of its own
        tl.store(U + strip_offs, u, mask=mask)
    xhat, _ = _group_norm(u, mask, onehot, (CPG * length).to(tl.float32), eps)
    gamma = tl.load(GAMMA + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    beta = tl.load(BETA + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    y = tl.sigmoid(xhat * gamma[:, None] + beta[:, None])
    tl.store(Y + strip_offs, y, mask=mask)


@triton.jit
def _ela_gates_bwd(Z, U, CW, GAMMA, BETA, DY, DU, DZ, PART,
                   NB, C, H, W, CPG, SPP, eps,
                   NCH: tl.constexpr, CG: tl.constexpr, K: tl.constexpr, BCO: tl.constexpr, BL: tl.constexpr,
                   BG: tl.constexpr, BCK: tl.constexpr, BLC: tl.constexpr):
    pid_c, sb = tl.program_id(0), tl.program_id(1)
    c0 = pid_c * NCH
    local = tl.arange(0, BCO)
    offs_c0 = c0 + local
    c_ok0 = (local < NCH) & (offs_c0 < C)
    gamma = tl.load(GAMMA + offs_c0, mask=c_ok0, other=0.0).to(tl.float32)
    beta = tl.load(BETA + offs_c0, mask=c_ok0, other=0.0).to(tl.float32)
    first = (offs_c0 // CG) * CG
    tap = tl.arange(0, BCK)  # conv weight index i * K + k of one output channel
    tap_ok = tap < CG * K
    tap_i, tap_k = tap // K, tap % K
    acc_w = tl.zeros([BCO, BCK], dtype=tl.float32)
    acc_gamma = tl.zeros([BCO], dtype=tl.float32)
    acc_beta = tl.zeros([BCO], dtype=tl.float32)
    for s in range(sb * SPP, tl.minimum(sb * SPP + SPP, 2 * NB)):
        length, base, offs_c, c_ok, offs_l, mask, onehot = _strip_tile(s, c0, NB, C, H, W, CPG, NCH, BCO, BL, BG)
        count = (CPG * length).to(tl.float32)
        # GroupNorm and sigmoid again, from the forward's conv output
        strip_offs = base + offs_c[:, None] * length + offs_l[None, :]
        xhat, rstd = _group_norm(tl.load(U + strip_offs, mask=mask, other=0.0), mask, onehot, count, eps)
        y = tl.sigmoid(xhat * gamma[:, None] + beta[:, None])
        dy = tl.load(DY + strip_offs, mask=mask, other=0.0)
        da = tl.where(mask, dy * y * (1.0 - y), 0.0)  # through the sigmoid
        acc_gamma += tl.sum(da * xhat, axis=1)
        acc_beta += tl.sum(da, axis=1)
        dxhat = da * gamma[:, None]
        m1 = _group_mean(tl.sum(dxhat, axis=1), onehot, count)
        m2 = _group_mean(tl.sum(dxhat * xhat, axis=1), onehot, count)
        du = tl.where(mask, rstd[:, None] * (dxhat - m1[:, None] - xhat * m2[:, None]), 0.0)  # through GroupNorm
        # the conv's gradients need du shifted along the strip and across the conv group: through memory
        tl.store(DU + strip_offs, du, mask=mask)
        tl.debug_barrier()
        # weight gradient: acc_w[c, i * K + k] += sum_l du[c, l] * z[first(c) + i, l + k - K // 2], in chunks of
        # BLC positions (pointer tiles built once per strip, moved by l0)
        offs_lc = tl.arange(0, BLC)
        du_rows = DU + base + offs_c[:, None] * length + offs_lc[None, :]
        z_taps = (Z + base + (first[:, None, None] + tap_i[None, :, None]) * length
                  + (tap_k - K // 2)[None, :, None] + offs_lc[None, None, :])
        for l0 in range(0, length, BLC):
            lc_ok = l0 + offs_lc < length
            du_c = tl.load(du_rows + l0, mask=c_ok[:, None] & lc_ok[None, :], other=0.0)
            pos = l0 + offs_lc[None, :] + (tap_k - K // 2)[:, None]  # [BCK, BLC]
            tap_mask = tap_ok[:, None] & lc_ok[None, :] & (pos >= 0) & (pos < length)
            z = tl.load(z_taps + l0, mask=c_ok[:, None, None] & tap_mask[None, :, :], other=0.0)
            acc_w += tl.sum(du_c[:, None, :] * z, axis=2)
        # means gradient: dz[c, l] = sum_{j < CG, k} w[first(c) + j, c - first(c), k] * du[first(c) + j, l - k + K//2]
        du_groups = DU + base + first[:, None] * length + offs_l[None, :]
        w_cols = CW + first * (CG * K) + (offs_c - first) * K
        dz = _grouped_taps(du_groups, w_cols, CG * K, offs_l, c_ok, length, CG, K, -1, BCO, BL)
        tl.store(DZ + strip_offs, dz, mask=mask)
    # partial sums of this run of strips: [conv weight taps..., dgamma, dbeta] per channel
    row = (sb * C + offs_c0) * (CG * K + 2)
    tl.store(PART + row[:, None] + tap[None, :], acc_w, mask=c_ok0[:, None] & tap_ok[None, :])
    tl.store(PART + row + CG * K, acc_gamma, mask=c_ok0)
    tl.store(PART + row + CG * K + 1, acc_beta, mask=c_ok0)


# Forward for conv groups of 8 (ELA-S / ELA-L): each conv input row is loaded once per tap for all 8 output
# channels of its group, which live in 8 separate accumulator tiles [group, strip, position] (one per output
# channel of the group) so the reuse stays in registers: 5 loads per output value instead of 40 for ELA-S. A
# program runs NS strips at a time; GroupNorm groups must hold whole conv groups.


@triton.jit
def _strips_at(offs_s, NB, C, H, W):
    # (lengths, buffer offsets) of strips offs_s: s < NB sample s's row strip, else sample s - NB's column strip
    is_row = offs_s < NB
    s64 = offs_s.to(tl.int64)
    length = tl.where(is_row, H, W)
    return length, tl.where(is_row, s64 * C * H, (s64 * 0 + NB) * C * H + (s64 - NB) * C * W)


@triton.jit
def _tap(u, wp, g_ok, z):
    # u += w[g] * z[g, s, l] for one output channel of every group
    return u + tl.load(wp, mask=g_ok, other=0.0).to(tl.float32)[:, None, None] * z


@triton.jit
def _group_mean_gs(per_group, onehot, count):
    # per-conv-group sums [GP, NS] -> each conv group's GroupNorm group mean [GP, NS]; count [NS]
    sums = tl.sum(tl.where(onehot[:, :, None], per_group[:, None, :], 0.0), axis=0) / count[None, :]
    return tl.sum(tl.where(onehot[:, :, None], sums[None, :, :], 0.0), axis=1)


@triton.jit
def _gate_out(d, rstd, ch, g_ok, mask, GAMMA, BETA, Y, offs):
    # y = sigmoid(gamma * xhat + beta) of one output channel per group (channels ch [GP])
    gamma = tl.load(GAMMA + ch, mask=g_ok, other=0.0).to(tl.float32)
    beta = tl.load(BETA + ch, mask=g_ok, other=0.0).to(tl.float32)
    y = tl.sigmoid(d * rstd * gamma[:, None, None] + beta[:, None, None])
    tl.store(Y + offs, y, mask=mask)


@triton.jit
def _ela_gates_fwd_g8(Z, CW, GAMMA, BETA, U, Y,
                      NB, C, H, W, CPG, SPP, eps,
                      NCH: tl.constexpr, K: tl.constexpr, GP: tl.constexpr, NS: tl.constexpr, BL: tl.constexpr,
                      BG: tl.constexpr, STORE_U: tl.constexpr):
    c0, sb = tl.program_id(0) * NCH, tl.program_id(1)
    offs_g = tl.arange(0, GP)
    first = c0 + offs_g * 8  # first channel of each conv group
    g_ok = (offs_g * 8 < NCH) & (first < C)
    onehot = (((offs_g * 8) // CPG)[:, None] == tl.arange(0, BG)[None, :]) & g_ok[:, None]
    w0 = CW + first * (8 * K)  # w[first + o, i, k] at w0 + o * 8 * K + i * K + k
    offs_l = tl.arange(0, BL)
    s_hi = tl.minimum(sb * SPP + SPP, 2 * NB)
    for s0 in range(sb * SPP, s_hi, NS):
        offs_s = s0 + tl.arange(0, NS)
        length, base = _strips_at(offs_s, NB, C, H, W)
        len3 = length[None, :, None]
        s_ok = g_ok[:, None, None] & (offs_s < s_hi)[None, :, None]
        mask = s_ok & (offs_l[None, :] < length[:, None])[None, :, :]
        offs = base[None, :, None] + first[:, None, None] * len3 + offs_l[None, None, :]  # channel first's strips
        u0 = tl.zeros([GP, NS, BL], dtype=tl.float32)
        u1, u2, u3, u4, u5, u6, u7 = u0, u0, u0, u0, u0, u0, u0
        for k in tl.static_range(K):
            shift = k - K // 2
            pos = offs_l + shift
            m = s_ok & ((pos[None, :] >= 0) & (pos[None, :] < length[:, None]))[None, :, :]
            for i in range(8):  # input row first + i, loaded once for the group's 8 output channels
                z = tl.load(Z + offs + i * len3 + shift, mask=m, other=0.0)
                wp = w0 + i * K + k
                u0 = _tap(u0, wp, g_ok, z)
                u1 = _tap(u1, wp + 8 * K, g_ok, z)
                u2 = _tap(u2, wp + 16 * K, g_ok, z)
                u3 = _tap(u3, wp + 24 * K, g_ok, z)
                u4 = _tap(u4, wp + 32 * K, g_ok, z)
                u5 = _tap(u5, wp + 40 * K, g_ok, z)
                u6 = _tap(u6, wp + 48 * K, g_ok, z)
                u7 = _tap(u7, wp + 56 * K, g_ok, z)
        if STORE_U:  # kept for the backward (training), which then needs no conv of its own
            tl.store(U + offs, u0, mask=mask)
            tl.store(U + offs + len3, u1, mask=mask)
            tl.store(U + offs + 2 * len3, u2, mask=mask)
            tl.store(U + offs + 3 * len3, u3, mask=mask)
            tl.store(U + offs + 4 * len3, u4, mask=mask)
            tl.store(U + offs + 5 * len3, u5, mask=mask)
            tl.store(U + offs + 6 * len3, u6, mask=mask)
            tl.store(U + offs + 7 * len3, u7, mask=mask)
        # GroupNorm statistics per (conv group, strip), then per GroupNorm group (biased variance, as torch)
        count = (CPG * length).to(tl.float32)
        total = tl.where(mask, u0 + u1 + u2 + u3 + u4 + u5 + u6 + u7, 0.0)
        mean = _group_mean_gs(tl.sum(total, axis=2), onehot, count)[:, :, None]
        u0 = tl.where(mask, u0 - mean, 0.0)
        u1 = tl.where(mask, u1 - mean, 0.0)
        u2 = tl.where(mask, u2 - mean, 0.0)
        u3 = tl.where(mask, u3 - mean, 0.0)
        u4 = tl.where(mask, u4 - mean, 0.0)
        u5 = tl.where(mask, u5 - mean, 0.0)
        u6 = tl.where(mask, u6 - mean, 0.0)
        u7 = tl.where(mask, u7 - mean, 0.0)
        sq = u0 * u0 + u1 * u1 + u2 * u2 + u3 * u3 + u4 * u4 + u5 * u5 + u6 * u6 + u7 * u7
        rstd = (1.0 / tl.sqrt_rn(_group_mean_gs(tl.sum(sq, axis=2), onehot, count) + eps))[:, :, None]
        _gate_out(u0, rstd, first, g_ok, mask, GAMMA, BETA, Y, offs)
        _gate_out(u1, rstd, first + 1, g_ok, mask, GAMMA, BETA, Y, offs + len3)
        _gate_out(u2, rstd, first + 2, g_ok, mask, GAMMA, BETA, Y, offs + 2 * len3)
        _gate_out(u3, rstd, first + 3, g_ok, mask, GAMMA, BETA, Y, offs + 3 * len3)
        _gate_out(u4, rstd, first + 4, g_ok, mask, GAMMA, BETA, Y, offs + 4 * len3)
        _gate_out(u5, rstd, first + 5, g_ok, mask, GAMMA, BETA, Y, offs + 5 * len3)
        _gate_out(u6, rstd, first + 6, g_ok, mask, GAMMA, BETA, Y, offs + 6 * len3)
        _gate_out(u7, rstd, first + 7, g_ok, mask, GAMMA, BETA, Y, offs + 7 * len3)


# --------------------------------------------------------------------------------------------- host side


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _tiles(x: torch.Tensor, max_bw: int = 64, nchw_elements: int = 2048) -> tuple[int, int, int]:
    """(BC, BH, BW), shaped so the unit-stride axis is read in long runs: about 2048 elements for channels_last,
    ``nchw_elements`` (more channels per program) for NCHW."""
    _, c, h, w = x.shape
    bw = min(_pow2(w), max_bw)
    if _channels_last(x) and c > 1:  # channels_last: 32 channels (64 bytes of bf16) per position
        bc = min(_pow2(c), 32)
        bh = min(_pow2(h), max(1, 2048 // (bc * bw)))
    else:  # NCHW: each channel's plane is contiguous, whole rows per tile
        bh = min(_pow2(h), max(1, 1024 // bw))
        bc = min(_pow2(c), max(1, nchw_elements // (bw * bh)))
    return bc, bh, bw


# The means pass spans up to 128 columns per program (MobileNetV2's 112-wide maps in one column block) and, on
# NCHW maps, 4x the channels of the other passes: measured on an H100 at ResNet-50's stage shapes (batch 128,
# bf16), 0.127 / 0.053 / 0.035 ms at 56 / 28 / 14 px against 0.134 / 0.071 / 0.036 with 2048-element tiles
# (0.028 vs 0.026 at 7 px).
_REDUCE_MAX_BW = 128
_MEANS_NCHW_ELEMENTS = 8192


def _dense(t: torch.Tensor) -> torch.Tensor:
    # the kernels address dense NCHW or channels_last maps; anything else (views with gaps, expanded gradients
    # from .sum()) is copied to NCHW first
    return t if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last) else t.contiguous()


def _channels_last(t: torch.Tensor | None) -> bool:
    # for a dense map; where both layouts hold (C == 1 or H * W == 1) their offsets coincide
    return t is not None and not t.is_contiguous()


def pack_strips(a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
    """(B, C, H) and (B, C, W) -> one float32 strip buffer of B * C * (H + W) values (rows first)."""
    return torch.cat([a_h.reshape(-1).float(), a_w.reshape(-1).float()])


def unpack_strips(buf: torch.Tensor, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A strip buffer of a (B, C, H, W) map -> views (B, C, H), (B, C, W)."""
    b, c, h, w = shape
    return buf[: b * c * h].view(b, c, h), buf[b * c * h:].view(b, c, w)


class _Launch:
    """One kernel launch with a fixed grid, integer arguments and constexprs; after the first call it replays
    the compiled kernel directly (:class:`attnzoo.kernels._launch.DirectLaunch`) where it can. Callers keep
    each tensor argument's role, dtype and layout fixed per instance (the compiled kernel depends on them)."""

    __slots__ = ("kernel", "grid", "ints", "meta", "direct")

    def __init__(self, kernel: Any, grid: tuple[int, ...], ints: tuple[int, ...], meta: dict[str, Any]) -> None:
        self.kernel, self.grid, self.ints, self.meta = kernel, grid, ints, {"num_warps": 4, **meta}
        self.direct: Any = False  # False: not captured yet; None: replay impossible, use the normal launch

    def __call__(self, ptrs: Sequence[torch.Tensor], scalars: Sequence[float]) -> None:
        direct = self.direct
        if direct is False:
            if _launch.SUPPORTED and not triton_interpreting():
                self.direct = _launch.launch_and_capture(self.kernel, self.grid, ptrs, self.ints, scalars, self.meta)
                return
            self.direct = None
        elif direct is not None and direct(ptrs, scalars):
            return
        self.kernel[self.grid](*ptrs, *self.ints, *scalars, **self.meta)


def _reduce_launch(x: torch.Tensor, gated: bool, relu: bool, d_cl: bool, store_dpre: bool) -> tuple[_Launch, int]:
    b, c, h, w = x.shape
    bc, bh, bw = _tiles(x, _REDUCE_MAX_BW, 2048 if gated else _MEANS_NCHW_ELEMENTS)
    ncb, nwb = triton.cdiv(c, bc), triton.cdiv(w, bw)
    meta = dict(H=h, W=w, X_CL=_channels_last(x), D_CL=d_cl, GATED=gated, RELU=relu, STORE_DPRE=store_dpre,
                BC=bc, BH=bh, BW=bw)
    return _Launch(_strip_reduce, (b * ncb, nwb), (b, c, ncb, nwb), meta), nwb


def _gate_launch(x: torch.Tensor, s_cl: bool, has_add: bool, has_shortcut: bool, relu: bool) -> _Launch:
    b, c, h, w = x.shape
    bc, bh, bw = _tiles(x)
    ncb = triton.cdiv(c, bc)
    meta = dict(H=h, W=w, X_CL=_channels_last(x), S_CL=s_cl, HAS_ADD=has_add, HAS_SHORTCUT=has_shortcut,
                RELU=relu, BC=bc, BH=bh, BW=bw)
    return _Launch(_strip_gate, (b * ncb, triton.cdiv(w, bw), triton.cdiv(h, bh)), (b, c, ncb), meta)


_MAP_PLANS: dict[tuple, Any] = {}


def _map_plan(key: tuple, build: Callable[[], Any]) -> Any:
    plan = _MAP_PLANS.get(key)
    if plan is None:
        plan = _MAP_PLANS[key] = build()
    return plan


def _strip_sums(x: torch.Tensor, dout: torch.Tensor | None = None, out: torch.Tensor | None = None,
                gates: torch.Tensor | None = None, store_dpre: bool = False, row_scale: float = 1.0,
                col_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Strip buffer of the row sums over W (* row_scale) and column sums over H (* col_scale) of ``x`` (plain), or
    of ``d * x`` weighted by the other axis's gate (gated: ``dout`` and the ``gates`` strip buffer given;
    ``d = dout * (out > 0)`` when ``out`` is given, else ``dout``), plus ``d`` when ``store_dpre`` (in dout's
    dtype and layout). ``x`` and ``out`` share a layout (out came from the gating of the same x)."""
    b, c, h, w = x.shape
    gated = dout is not None
    d_cl = gated and _channels_last(dout)
    key = ("reduce", x.shape, x.dtype, _channels_last(x), x.device.index, gated, out is not None, d_cl,
           None if dout is None else dout.dtype, None if gates is None else gates.dtype, store_dpre)
    launch, nwb = _map_plan(key, lambda: _reduce_launch(x, gated, out is not None, d_cl, store_dpre))
    strips = torch.empty(b * c * (h + w), device=x.device, dtype=torch.float32)
    rows = strips if nwb == 1 else torch.empty((b, c, h, nwb), device=x.device, dtype=torch.float32)
    dpre = torch.empty_like(dout) if store_dpre else None
    launch((x, dout if gated else x, out if out is not None else x, gates if gated else strips,
            dpre if store_dpre else x, rows, strips), (row_scale, col_scale))
    if nwb > 1:  # maps wider than one column block: add up the blocks' partial row sums
        torch.sum(rows, dim=-1, out=strips[: b * c * h].view(b, c, h))
    return strips, dpre


def _apply_gates(x: torch.Tensor, gates: torch.Tensor, addends: torch.Tensor | None = None,
                 shortcut: torch.Tensor | None = None, relu: bool = False, out_dtype: torch.dtype | None = None,
                 a_scales: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """``act(x * g_h[..., None] * g_w[..., None, :] + s_h * a_h[..., None] + s_w * a_w[..., None, :] + shortcut)``
    in one pass (``(s_h, s_w) = a_scales``; ``gates`` and ``addends`` strip buffers), computed in float32 and
    stored in ``out_dtype`` (default x's dtype) with x's memory layout."""
    out_dtype = out_dtype or x.dtype
    s_cl = _channels_last(shortcut)
    key = ("gate", x.shape, x.dtype, _channels_last(x), x.device.index, gates.dtype,
           None if addends is None else addends.dtype, None if shortcut is None else shortcut.dtype, s_cl, relu,
           out_dtype)
    launch = _map_plan(key, lambda: _gate_launch(x, s_cl, addends is not None, shortcut is not None, relu))
    out = torch.empty_like(x, dtype=out_dtype)  # x's layout
    launch((x, gates, gates if addends is None else addends, x if shortcut is None else shortcut, out), a_scales)
    return out


# ------------------------------------------------------------------------- generic strip ops (any gate_fn)


def strip_means(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over W (B, C, H), mean over H (B, C, W)), float32, from one read of x."""
    x = _dense(x)
    strips, _ = _strip_sums(x, row_scale=1.0 / x.shape[3], col_scale=1.0 / x.shape[2])
    return unpack_strips(strips, x.shape)


def strip_gate(x: torch.Tensor, g_h: torch.Tensor, g_w: torch.Tensor, shortcut: torch.Tensor | None = None,
               relu: bool = False) -> torch.Tensor:
    """``act(x * g_h[..., None] * g_w[..., None, :] + shortcut)`` in one pass, in x's dtype and layout."""
    return _apply_gates(_dense(x), pack_strips(g_h, g_w), shortcut=None if shortcut is None else _dense(shortcut),
                        relu=relu)


def _gate_backward(dout: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None, gates: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, gate gradients as a strip buffer) for ``out = act(x * g_h * g_w [+ s])``: d = dout * act'."""
    relu = out is not None
    dgates, dpre = _strip_sums(x, dout, out, gates, store_dpre=relu)
    return (dpre if relu else dout), dgates


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
        x = _dense(x)
        gates = pack_strips(g_h, g_w)
        out = _apply_gates(x, gates, shortcut=None if shortcut is None else _dense(shortcut), relu=relu)
        ctx.meta = (g_h.dtype, g_w.dtype, None if shortcut is None else shortcut.dtype)
        ctx.save_for_backward(x, gates, out if relu else None)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, gates, out = ctx.saved_tensors
        gh_dtype, gw_dtype, s_dtype = ctx.meta
        d, dgates = _gate_backward(_dense(dout), x, out, gates)
        dg_h, dg_w = unpack_strips(dgates, x.shape)
        dx = _apply_gates(d, gates, out_dtype=x.dtype) if ctx.needs_input_grad[0] else None
        ds = None if s_dtype is None else d.to(s_dtype)
        return dx, dg_h.to(gh_dtype), dg_w.to(gw_dtype), ds, None


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
        x = _dense(x)
        z_h, z_w = strip_means(x)
        with torch.enable_grad():
            z_h.requires_grad_(), z_w.requires_grad_()
            y_h, y_w = gate_fn(z_h, z_w)
        gates = pack_strips(y_h.detach(), y_w.detach())
        out = _apply_gates(x, gates, shortcut=None if shortcut is None else _dense(shortcut), relu=relu)
        ctx.inner = (z_h, z_w, y_h, y_w)
        ctx.params = params
        ctx.shortcut_dtype = None if shortcut is None else shortcut.dtype
        ctx.save_for_backward(x, gates, out if relu else None)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, gates, out = ctx.saved_tensors
        z_h, z_w, y_h, y_w = ctx.inner
        del ctx.inner  # the recorded gate graph is used once
        d, dgates = _gate_backward(_dense(dout), x, out, gates)
        dg_h, dg_w = unpack_strips(dgates, x.shape)
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[4:]) if need]
        grads = torch.autograd.grad((y_h, y_w), [z_h, z_w, *(ctx.params[i] for i in wanted)],
                                    (dg_h.to(y_h.dtype), dg_w.to(y_w.dtype)), allow_unused=True)
        dz_h, dz_w = grads[0], grads[1]
        dparams: list[torch.Tensor | None] = [None] * len(ctx.params)
        for i, g in zip(wanted, grads[2:]):
            dparams[i] = g
        dx = None
        if ctx.needs_input_grad[0]:
            h, w = x.shape[2], x.shape[3]
            addends = pack_strips(torch.zeros_like(z_h) if dz_h is None else dz_h,
                                  torch.zeros_like(z_w) if dz_w is None else dz_w)
            dx = _apply_gates(d, gates, addends, out_dtype=x.dtype, a_scales=(1.0 / w, 1.0 / h))
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


# --------------------------------------------------------------------------- ELA: the whole op, three launches


# registers per program: a strip tile of BCO x BL and a weight-gradient tile of BCO x BCK x BLC stay under this
_MAX_TILE = 8192
_TILE_TARGET = 1024  # strip tile size the channel block grows to (fewer, fuller programs for small maps)
_BWD_PROGRAMS = 1024  # backward programs to aim for (several per SM); each sums the weight gradient of a strip run
# Forward kernel for conv groups of 8 (_ela_gates_fwd_g8): (values per [conv groups, strips, positions] tile,
# warps) for inference and for training (conv output kept), and the shortest strip tile that training uses it at.
# Measured per launch on an H100 at ResNet-50's stages (batch 128, ELA-S; docs/benchmarks.md, ELA round 3):
# inference 0.034 / 0.040 / 0.054 / 0.089 ms at 56 / 28 / 14 / 7 px (per-tap kernel 0.070 / 0.075 / 0.087 /
# 0.102); training 0.037 / 0.045 / 0.067 ms at 56 / 28 / 14 px (0.072 / 0.076 / 0.085), while at 7 px every
# tile tried (0.112-0.123 ms) lost to the per-tap kernel (0.105), which keeps it there.
_G8_INFER = (2048, 4)
_G8_TRAIN = (2048, 4)
_G8_TRAIN_MIN_BL = 16
_G8_STRIPS_PER_PROGRAM = 8  # at least; 32 measured slower
_USE_G8 = True


class _ELAPlan:
    """Launches of the fused ELA op for one (shape, layout, dtype, parameter) combination, built once.

    Forward: strip means (map pass), gates (strip kernel), gating (map pass). Backward: gated reduction (map
    pass), gate backward (strip kernel), one sum of its partials, dx (map pass).
    """

    def __init__(self, x: torch.Tensor, relu: bool, conv_weight: torch.Tensor, norm_groups: int) -> None:
        b, c, h, w = x.shape
        _, cg, k = conv_weight.shape
        cpg = c // norm_groups
        # channels per program: whole conv groups and whole GroupNorm groups, several while the tile stays small
        nch = math.lcm(cg, cpg)
        self.bl = _pow2(max(h, w))
        while 2 * nch <= c and _pow2(2 * nch) * self.bl <= _TILE_TARGET:
            nch *= 2
        self.shape, self.relu, self.taps = (b, c, h, w), relu, cg * k
        self.n_strips = b * c * (h + w)
        self.bco = _pow2(nch)
        bg = max(2, _pow2(nch // cpg))
        self.bck = _pow2(cg * k)
        self.fits = self.bco * self.bl <= _MAX_TILE and self.bco * self.bck <= _MAX_TILE
        warps = 4 if self.bco * self.bl <= 2048 else 8
        ncb = triton.cdiv(c, nch)
        self.strip_ints = (b, c, h, w, cpg)
        strip_meta = dict(NCH=nch, CG=cg, K=k, BCO=self.bco, BL=self.bl, BG=bg, num_warps=warps)
        # GroupNorm groups of whole conv groups of 8: the register-reuse forward
        self.g8 = _USE_G8 and cg == 8 and cpg % 8 == 0
        per_tap = dict(strip_meta, STORE_U=False)
        self.gates = (self._g8_launch(nch, k, bg, *_G8_INFER, False) if self.g8
                      else _Launch(_ela_gates_fwd, (ncb, 2 * b), self.strip_ints, per_tap))
        self.gates_keep = (self._g8_launch(nch, k, bg, *_G8_TRAIN, True) if self.g8 and self.bl >= _G8_TRAIN_MIN_BL
                           else _Launch(_ela_gates_fwd, (ncb, 2 * b), self.strip_ints, dict(per_tap, STORE_U=True)))
        n_sb = min(2 * b, max(1, _BWD_PROGRAMS // ncb))
        self.spp = triton.cdiv(2 * b, n_sb)
        self.n_sb = triton.cdiv(2 * b, self.spp)
        blc = min(self.bl, max(1, _MAX_TILE // (self.bco * self.bck)))  # powers of two: so is blc
        self.gates_bwd = _Launch(_ela_gates_bwd, (ncb, self.n_sb), (*self.strip_ints, self.spp),
                                 dict(strip_meta, BCK=self.bck, BLC=blc))

    def _g8_launch(self, nch: int, k: int, bg: int, tile: int, warps: int, store_u: bool) -> _Launch:
        """Launch of _ela_gates_fwd_g8: tiles of about ``tile`` values, a run of strips per program."""
        b, c = self.shape[:2]
        gp = _pow2(nch // 8)
        ns = min(_pow2(2 * b), max(1, tile // (gp * self.bl)))  # strips per tile
        spp = max(ns, _G8_STRIPS_PER_PROGRAM // ns * ns)  # strips per program, whole tiles
        meta = dict(NCH=nch, K=k, GP=gp, NS=ns, BL=self.bl, BG=bg, STORE_U=store_u, num_warps=warps)
        return _Launch(_ela_gates_fwd_g8, (triton.cdiv(c, nch), triton.cdiv(2 * b, spp)), (*self.strip_ints, spp),
                       meta)


_ELA_PLANS: dict[tuple, _ELAPlan] = {}


def _ela_plan(x: torch.Tensor, relu: bool, conv_weight: torch.Tensor, norm_weight: torch.Tensor,
              norm_groups: int, norm_bias: torch.Tensor | None = None) -> _ELAPlan:
    # the strip kernels are compiled for the parameters' dtypes (the map passes key their own launches)
    key = (x.shape, x.device.index, conv_weight.shape, conv_weight.dtype, norm_weight.dtype,
           norm_weight.dtype if norm_bias is None else norm_bias.dtype, norm_groups, relu)
    plan = _ELA_PLANS.get(key)
    if plan is None:
        plan = _ELA_PLANS[key] = _ELAPlan(x, relu, conv_weight, norm_groups)
    return plan


def _ela_forward(plan: _ELAPlan, x: torch.Tensor, conv_weight: torch.Tensor, norm_weight: torch.Tensor,
                 norm_bias: torch.Tensor, eps: float, shortcut: torch.Tensor | None, keep_conv: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(strip means, conv output if ``keep_conv``, gates, out); all strip buffers float32."""
    _, _, h, w = plan.shape
    means, _ = _strip_sums(x, row_scale=1.0 / w, col_scale=1.0 / h)
    gates = torch.empty(plan.n_strips, device=x.device, dtype=torch.float32)
    if keep_conv:
        conv_out = torch.empty_like(gates)
        plan.gates_keep((means, conv_weight, norm_weight, norm_bias, conv_out, gates), (eps,))
    else:
        conv_out = None
        plan.gates((means, conv_weight, norm_weight, norm_bias, gates, gates), (eps,))
    out = _apply_gates(x, gates, shortcut=shortcut, relu=plan.relu)
    return means, conv_out, gates, out


class ELAFunction(torch.autograd.Function):
    """ELA with the host block's tail: ``act(x * y_h * y_w + shortcut)``, ``y = sigmoid(GN(conv1d(mean(x))))``.

    Forward: three launches (strip means, both strips' gates, the gating). Backward: the gated reduction (gate
    gradients, ReLU mask, shortcut gradient), the strips' hand-written backward (conv and GroupNorm), one sum
    of its per-program partials, and dx; no autograd graph inside.
    """

    @staticmethod
    def forward(ctx, x, shortcut, conv_weight, norm_weight, norm_bias, plan, eps):
        means, conv_out, gates, out = _ela_forward(plan, x, conv_weight, norm_weight, norm_bias, eps, shortcut, True)
        ctx.plan, ctx.eps = plan, eps
        ctx.shortcut_dtype = None if shortcut is None else shortcut.dtype
        ctx.save_for_backward(x, out if plan.relu else None, means, conv_out, gates, conv_weight, norm_weight,
                              norm_bias)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, out, means, conv_out, gates, conv_weight, norm_weight, norm_bias = ctx.saved_tensors
        plan = ctx.plan
        _, c, h, w = plan.shape
        d, dgates = _gate_backward(_dense(dout), x, out, gates)
        du = torch.empty(plan.n_strips, device=x.device, dtype=torch.float32)
        dmeans = torch.empty_like(du)
        part = torch.empty((plan.n_sb, c, plan.taps + 2), device=x.device, dtype=torch.float32)
        plan.gates_bwd((means, conv_out, conv_weight, norm_weight, norm_bias, dgates, du, dmeans, part), (ctx.eps,))
        sums = part.sum(0)
        dconv = sums[:, : plan.taps].view(conv_weight.shape).to(conv_weight.dtype)
        dgamma = sums[:, plan.taps].to(norm_weight.dtype)
        dbeta = sums[:, plan.taps + 1].to(norm_bias.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _apply_gates(d, gates, dmeans, out_dtype=x.dtype, a_scales=(1.0 / w, 1.0 / h))
        ds = None if ctx.shortcut_dtype is None else d.to(ctx.shortcut_dtype)
        return dx, ds, dconv, dgamma, dbeta, None, None


def ela_attention(x: torch.Tensor, conv_weight: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                  norm_groups: int, eps: float, shortcut: torch.Tensor | None, relu: bool) -> torch.Tensor | None:
    """Entry for strip_gate.ela_attention on the triton backend (arguments checked there); None when the strip
    tiles would not fit in registers (the caller then runs the PyTorch expressions)."""
    plan = _ela_plan(x, relu, conv_weight, norm_weight, norm_groups, norm_bias)
    if not plan.fits:
        return None
    x = _dense(x)
    shortcut = None if shortcut is None else _dense(shortcut)
    if not conv_weight.is_contiguous():
        conv_weight = conv_weight.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or conv_weight.requires_grad or norm_weight.requires_grad
                                    or norm_bias.requires_grad or (shortcut is not None and shortcut.requires_grad)):
        return ELAFunction.apply(x, shortcut, conv_weight, norm_weight, norm_bias, plan, eps)
    return _ela_forward(plan, x, conv_weight, norm_weight, norm_bias, eps, shortcut)[3]
