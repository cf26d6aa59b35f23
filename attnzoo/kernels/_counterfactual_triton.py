"""Counterfactual attention forward in Triton (see :mod:`attnzoo.kernels.counterfactual_attention`).

One program owns BLOCK_M queries of one (batch, head) and sweeps the keys once with the flash-attention online
softmax: running maximum ``m``, denominator ``l = sum p_j`` and weighted value sum ``acc = sum p_j v_j``, with
``p_j = exp(s_j - m)``. The largest weight of a row is ``1 / l`` (the maximum's own term is ``exp(0) = 1``), so
with ``D = sum_j (1 - p_j) v_j`` and ``R = sum_j (1 - p_j)`` over the kept keys the edited outputs need no second
pass:

    reverse            sum_j (1/l - p_j/l) v_j                       = D / l
    reverse_normalize  that / sum_j (1/l - p_j/l)                    = D / R   (0 where R = 0: one key, a flat row)
    uniform            sum_j v_j / real_keys[b]

``D`` and ``R`` are accumulated directly (one more dot per tile), not as ``S - acc`` and ``n - l``, which cancel
in nearly flat rows.

The CPU interpreter computes bfloat16 ``tl.dot`` wrongly (triton 3.8), so there bfloat16 tiles are upcast to
float32 before the dots. Imported lazily (only when the triton backend runs). Forward only.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._backend import triton_interpreting
from ._grouped_attention_triton import _INTERPRETING, SpecializedLaunches, _key_rows, _masked, _query_tile

LOG2E = 1.4426950408889634
KIND_IDS = {"reverse": 0, "reverse_normalize": 1, "uniform": 2}


@triton.jit
def _counterfactual_fwd_kernel(
    Q, K, V, MASK, REAL, O,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mq, stride_ob, stride_oh, stride_on,
    H, GROUP, Lq, Lkv, qk_scale,
    KIND: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid, b, h, kvh, qi, q_ok, q_pos, d, d_ok, q = _query_tile(Q, stride_qb, stride_qh, stride_qn, H, GROUP, Lq, Lkv,
                                                              HEAD_DIM, BLOCK_D, BLOCK_M, DOT_F32)

    # online softmax in base 2; the finite floor keeps rows with no key in a tile NaN-free
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    n_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    sv = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    kv_end = Lkv
    if CAUSAL:
        kv_end = tl.minimum(Lkv, Lkv - Lq + (pid + 1) * BLOCK_M)  # keys after the tile's last query never count
    for start in range(0, kv_end, BLOCK_N):
        kn = start + tl.arange(0, BLOCK_N)
        kv_ok = kn < Lkv
        keep = _masked(kv_ok[None, :] & q_ok[:, None], MASK, b, h, qi, kn, q_ok, kv_ok, q_pos, stride_mb, stride_mh,
                       stride_mq, CAUSAL, HAS_MASK)
        vt = _key_rows(v_base, kn, kv_ok, stride_vn, d, d_ok, DOT_F32)
        if KIND == 2:  # uniform needs no scores; 0/1 weights are exact in every dtype (fp32 accumulation)
            sv += tl.dot(keep.to(vt.dtype), vt, input_precision=DOT_PREC)
        else:
            kt = _key_rows(k_base, kn, kv_ok, stride_kn, d, d_ok, DOT_F32)
            s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            # sv - acc and n - l accumulated directly, as sums of (1 - p_j) >= 0: no cancellation, and the
            # weights rounded for the dot are the small (1 - p_j) themselves (as the explicit path rounds
            # w_max - w_j). A new maximum turns the old (1 - p_j) into (1 - alpha p_j): add (1 - alpha) * acc / l.
            rest_p = tl.where(keep, 1.0 - p, 0.0)
            grow = 1.0 - alpha
            sv = sv + grow[:, None] * acc + tl.dot(rest_p.to(vt.dtype), vt, input_precision=DOT_PREC)
            n_i = n_i + grow * l_i + tl.sum(rest_p, 1)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
            m_i = m_new

    # sv: sum_j (1 - p_j) v_j = l * (w_max S - O); n_i: sum_j (1 - p_j) = l * (w_max n - 1)
    if KIND == 0:  # divided by l; a query with no key left (l = 0) gets zeros
        inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
        out = sv * inv[:, None]
    elif KIND == 1:  # divided by n - l, which is 0 exactly for one key or a flat row: zeros, like 0 / 0 -> 0
        inv = tl.where(n_i > 0, 1.0 / tl.where(n_i > 0, n_i, 1.0), 0.0)
        out = sv * inv[:, None]
    else:
        out = sv / tl.load(REAL + b)
    tl.store(O + b * stride_ob + h * stride_oh + qi[:, None] * stride_on + d[None, :],
             out.to(O.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get float32-accurate dots (3xTF32 on tensor cores; numpy in the interpreter)."""
    if dtype != torch.float32:
        return "tf32"  # ignored for 16-bit inputs
    return "ieee" if triton_interpreting() else "tf32x3"


@functools.lru_cache(maxsize=64)
def _config(decode: bool, dim: int, dtype: torch.dtype, kind: str, causal: bool, has_mask: bool,
            interpreting: bool) -> tuple[dict, int, tuple]:
    """Launch constants, computed once per shape class (decode runs per layer per token: host work counts):
    ``(meta, BLOCK_M, tail)`` with ``tail`` the constexpr values in the kernel's argument order."""
    if interpreting:
        block_m, block_n, warps = 16, 32, 4
    else:
        block_m, block_n, warps = (16, 64, 4) if decode else (64, 64, 8)
    meta = dict(KIND=KIND_IDS[kind], CAUSAL=causal and not has_mask, HAS_MASK=has_mask, HEAD_DIM=dim,
                BLOCK_D=max(16, triton.next_power_of_2(dim)), DOT_F32=interpreting and dtype == torch.bfloat16,
                DOT_PREC=_dot_precision(dtype), BLOCK_M=block_m, BLOCK_N=block_n)
    names = _counterfactual_fwd_kernel.arg_names
    tail = tuple(meta[name] for name in names[names.index("KIND"):])
    return dict(meta, num_warps=warps), block_m, tail


LAUNCHES = SpecializedLaunches(_counterfactual_fwd_kernel)


def counterfactual_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, scale: float,
                                    causal: bool, mask: torch.Tensor | None, real_keys: torch.Tensor | None,
                                    out: torch.Tensor) -> torch.Tensor:
    """Triton backend of :func:`attnzoo.kernels.counterfactual_attention` (arguments validated; ``out`` a
    ``(B, H, Lq, D)`` tensor of any strides with unit stride on D, ``real_keys`` float32 ``(B,)`` for uniform).
    On CUDA with triton >= 3.4 the launch skips triton's per-call argument binding (:class:`SpecializedLaunches`)."""
    batch, heads, q_len, dim = q.shape
    # one stride() call per tensor: the host work around the launch counts at decode
    q_strides, k_strides, v_strides, out_strides = q.stride(), k.stride(), v.stride(), out.stride()
    if q_strides[3] != 1:
        q = q.contiguous()
        q_strides = q.stride()
    if k_strides[3] != 1:
        k = k.contiguous()
        k_strides = k.stride()
    if v_strides[3] != 1:
        v = v.contiguous()
        v_strides = v.stride()
    if mask is not None:
        mask_t = mask.view(torch.uint8) if mask.stride(-1) == 1 else mask.contiguous().view(torch.uint8)
        m_strides = mask_t.stride()
        mask_strides = (m_strides[0], 0 if mask_t.shape[1] == 1 else m_strides[1], m_strides[2])
    else:
        mask_t, mask_strides = q, (0, 0, 0)  # never read (HAS_MASK is False)
    config = (q_len <= 16, dim, q.dtype, kind, causal, mask is not None, _INTERPRETING)
    meta, block_m, tail = _config(*config)
    config = (*config, real_keys is None)  # the REAL pointer's dtype
    ints = (q_strides[0], q_strides[1], q_strides[2], k_strides[0], k_strides[1], k_strides[2],
            v_strides[0], v_strides[1], v_strides[2], *mask_strides, out_strides[0], out_strides[1], out_strides[2],
            heads, heads // k.shape[1], q_len, k.shape[2])
    LAUNCHES((-(-q_len // block_m), batch * heads),  # plain ints: cheap on the host
             (q, k, v, mask_t, q if real_keys is None else real_keys, out), ints, (scale * LOG2E,), meta, tail,
             config, q.get_device())
    return out
