"""Fused key-group attention forward in Triton (see :mod:`attnzoo.kernels.grouped_attention`).

Every program owns BLOCK_M queries of one (batch, head) and sweeps the keys in tiles of BLOCK_N with one
online softmax (the flash-attention forward). The only difference from plain attention is the accumulator:
instead of one ``(BLOCK_M, D)`` output it keeps one per key group, stacked as ``(BLOCK_M * G, D)`` rows, and
fills it with a single matmul of the group-expanded weights ``(BLOCK_M * G, BLOCK_N)`` (row ``m * G + g``
holds query m's weights on the keys of group g, zeros elsewhere) with the value tile. The per-group masses
are the row sums of the same expanded weights. All partial results share the running maximum and the
running denominator, so one rescale per tile serves every group and the final division normalises them all.

The CPU interpreter computes bfloat16 ``tl.dot`` wrongly (triton 3.8), so there bfloat16 tiles are upcast to
float32 before the dots. Imported lazily (only when the triton backend runs). Forward only.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from ._backend import triton_interpreting

LOG2E = 1.4426950408889634


# --- pieces the decoder-attention kernels share (here and in _counterfactual_triton) -----------------------

@triton.jit
def _query_tile(Q, stride_qb, stride_qh, stride_qn, H, GROUP, Lq, Lkv, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, DOT_F32: tl.constexpr):
    """This program's batch, head, kv head and BLOCK_M queries (positions lower-right aligned), and their q tile."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # 64-bit batch offsets
    h = bh % H
    kvh = h // GROUP
    qi = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = qi < Lq
    q_pos = Lkv - Lq + qi  # the query's own key position
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + qi[:, None] * stride_qn + d[None, :],
                mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    return pid, b, h, kvh, qi, q_ok, q_pos, d, d_ok, q


@triton.jit
def _key_rows(base, kn, kv_ok, stride_n, d, d_ok, DOT_F32: tl.constexpr):
    """A (BLOCK_N, BLOCK_D) tile of keys or values, zeros past the end."""
    t = tl.load(base + kn[:, None] * stride_n + d[None, :], mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        t = t.to(tl.float32)
    return t


@triton.jit
def _masked(keep, MASK, b, h, qi, kn, q_ok, kv_ok, q_pos, stride_mb, stride_mh, stride_mq,
            CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """``keep`` and the attention mask: the bool mask when one is given, else causal order when asked."""
    if HAS_MASK:
        mk = tl.load(MASK + b * stride_mb + h * stride_mh + qi[:, None] * stride_mq + kn[None, :],
                     mask=q_ok[:, None] & kv_ok[None, :], other=0)
        keep = keep & (mk != 0)
    elif CAUSAL:
        keep = keep & (kn[None, :] <= q_pos[:, None])
    return keep


@triton.jit
def _key_group_fwd_kernel(
    Q, K, V, GID, MASK, O, MASS,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_gb, stride_mb, stride_mh, stride_mq,
    stride_ob, stride_oh, stride_on, stride_og, stride_sb, stride_sh, stride_sn,
    H, GROUP, Lq, Lkv, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_GROUPS: tl.constexpr, BLOCK_G: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid, b, h, kvh, qi, q_ok, q_pos, d, d_ok, q = _query_tile(Q, stride_qb, stride_qh, stride_qn, H, GROUP, Lq, Lkv,
                                                              HEAD_DIM, BLOCK_D, BLOCK_M, DOT_F32)
    g_idx = tl.arange(0, BLOCK_G)

    # Online softmax in base 2; the finite floor keeps rows with no key in a tile NaN-free.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    mass = tl.zeros([BLOCK_M, BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M * BLOCK_G, BLOCK_D], dtype=tl.float32)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    kv_end = Lkv
    if CAUSAL:
        kv_end = tl.minimum(Lkv, Lkv - Lq + (pid + 1) * BLOCK_M)  # keys after the tile's last query never count
    for start in range(0, kv_end, BLOCK_N):
        kn = start + tl.arange(0, BLOCK_N)
        kv_ok = kn < Lkv
        gid = tl.load(GID + b * stride_gb + kn, mask=kv_ok, other=-1)
        kt = _key_rows(k_base, kn, kv_ok, stride_kn, d, d_ok, DOT_F32)
        s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
        keep = (gid >= 0)[None, :] & q_ok[:, None]
        keep = _masked(keep, MASK, b, h, qi, kn, q_ok, kv_ok, q_pos, stride_mb, stride_mh, stride_mq, CAUSAL, HAS_MASK)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # group-expanded weights: (BLOCK_M, BLOCK_G, BLOCK_N), zero outside each row's group
        member = gid[None, :] == g_idx[:, None]
        p_groups = tl.where(member[None, :, :], p[:, None, :], 0.0)
        mass = mass * alpha[:, None] + tl.sum(p_groups, 2)
        alpha_rows = tl.reshape(tl.broadcast_to(alpha[:, None], (BLOCK_M, BLOCK_G)), (BLOCK_M * BLOCK_G,))
        vt = _key_rows(v_base, kn, kv_ok, stride_vn, d, d_ok, DOT_F32)
        p_rows = tl.reshape(p_groups, (BLOCK_M * BLOCK_G, BLOCK_N))
        acc = acc * alpha_rows[:, None] + tl.dot(p_rows.to(vt.dtype), vt, input_precision=DOT_PREC)
        m_i = m_new

    inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)  # a query with no key left: zeros
    mass = mass * inv[:, None]
    g_ok = g_idx < NUM_GROUPS
    tl.store(MASS + b * stride_sb + h * stride_sh + qi[:, None] * stride_sn + g_idx[None, :], mass,
             mask=q_ok[:, None] & g_ok[None, :])
    inv_rows = tl.reshape(tl.broadcast_to(inv[:, None], (BLOCK_M, BLOCK_G)), (BLOCK_M * BLOCK_G,))
    acc = acc * inv_rows[:, None]
    r = tl.arange(0, BLOCK_M * BLOCK_G)
    r_q = pid * BLOCK_M + r // BLOCK_G
    r_g = r % BLOCK_G
    r_ok = (r_q < Lq) & (r_g < NUM_GROUPS)
    tl.store(O + b * stride_ob + h * stride_oh + r_q[:, None] * stride_on + r_g[:, None] * stride_og + d[None, :],
             acc, mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def _var_fwd_kernel(
    Q, K, V, GID, AFTER, IMAGE_EPS, MASK, O,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_gb, stride_mb, stride_mh, stride_mq, stride_ob, stride_on, stride_oh,
    H, GROUP, Lq, Lkv, Lg, qk_scale, keep_sink, summ, rho,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # VAR in one pass: the online softmax keeps the plain output, the non-sink image keys' output and the sink
    # keys' output (three accumulators, one dot each) and the masses of groups 1-3; the epilogue decides per
    # (head, query) whether the cell is image-centric and writes the edited output in the input dtype.
    pid, b, h, kvh, qi, q_ok, q_pos, d, d_ok, q = _query_tile(Q, stride_qb, stride_qh, stride_qn, H, GROUP, Lq, Lkv,
                                                              HEAD_DIM, BLOCK_D, BLOCK_M, DOT_F32)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    mass_image = tl.zeros([BLOCK_M], dtype=tl.float32)
    mass_vsink = tl.zeros([BLOCK_M], dtype=tl.float32)
    mass_tsink = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_image = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_sink = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    kv_end = Lkv
    if CAUSAL:
        kv_end = tl.minimum(Lkv, Lkv - Lq + (pid + 1) * BLOCK_M)  # keys after the tile's last query never count
    for start in range(0, kv_end, BLOCK_N):
        kn = start + tl.arange(0, BLOCK_N)
        kv_ok = kn < Lkv
        gid = tl.load(GID + b * stride_gb + kn, mask=kn < Lg, other=0)  # keys past the ids: generated text
        kt = _key_rows(k_base, kn, kv_ok, stride_kn, d, d_ok, DOT_F32)
        s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * qk_scale
        keep = (kv_ok & (gid >= 0))[None, :] & q_ok[:, None]
        keep = _masked(keep, MASK, b, h, qi, kn, q_ok, kv_ok, q_pos, stride_mb, stride_mh, stride_mq, CAUSAL, HAS_MASK)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p_image = tl.where((gid == 1)[None, :], p, 0.0)
        p_vsink = tl.where((gid == 2)[None, :], p, 0.0)
        p_tsink = tl.where((gid == 3)[None, :], p, 0.0)
        mass_image = mass_image * alpha + tl.sum(p_image, 1)
        mass_vsink = mass_vsink * alpha + tl.sum(p_vsink, 1)
        mass_tsink = mass_tsink * alpha + tl.sum(p_tsink, 1)
        vt = _key_rows(v_base, kn, kv_ok, stride_vn, d, d_ok, DOT_F32)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
        acc_image = acc_image * alpha[:, None] + tl.dot(p_image.to(vt.dtype), vt, input_precision=DOT_PREC)
        acc_sink = acc_sink * alpha[:, None] + tl.dot((p_vsink + p_tsink).to(vt.dtype), vt,
                                                      input_precision=DOT_PREC)
        m_i = m_new

    inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)  # a query with no key left: zeros
    mass_image = mass_image * inv
    mass_vsink = mass_vsink * inv
    mass_tsink = mass_tsink * inv
    on_image = mass_image + mass_vsink
    share = mass_vsink / (on_image + tl.load(IMAGE_EPS + b))  # the official +1e-6 per image key
    selected = (share <= rho) & (on_image >= summ) & (q_pos > tl.load(AFTER + b))
    # selected cells: sinks keep keep_sink of their weight, the freed mass goes to the non-sink image keys in
    # proportion, i.e. out = plain + gain * O_image + (keep_sink - 1) * O_sink
    gain = (1.0 - keep_sink) * (mass_vsink + mass_tsink) / tl.maximum(mass_image, 1.1754943508222875e-38)
    image_weight = tl.where(selected, gain, 0.0) * inv
    sink_weight = tl.where(selected, keep_sink - 1.0, 0.0) * inv
    out = acc * inv[:, None] + acc_image * image_weight[:, None] + acc_sink * sink_weight[:, None]
    tl.store(O + b * stride_ob + qi[:, None] * stride_on + h * stride_oh + d[None, :],
             out.to(O.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get float32-accurate dots (3xTF32 on tensor cores; numpy in the interpreter)."""
    if dtype != torch.float32:
        return "tf32"  # ignored for 16-bit inputs
    return "ieee" if triton_interpreting() else "tf32x3"


def _blocks(q_len: int, head_dim: int, groups: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): small tiles in the interpreter, H100-sized ones on the GPU."""
    if triton_interpreting():
        return 16, 32, 4
    block_m = 16 if q_len <= 16 else 32
    rows = block_m * groups
    return block_m, 64 if head_dim <= 128 else 32, 8 if rows * head_dim >= 128 * 128 else 4


def key_group_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_groups: torch.Tensor,
                               num_groups: int, scale: float, causal: bool = True,
                               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of :func:`attnzoo.kernels.key_group_attention` (arguments already validated)."""
    batch, heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    gid = key_groups.to(torch.int32).contiguous()
    outputs = torch.empty(batch, heads, q_len, num_groups, dim, device=q.device, dtype=torch.float32)
    masses = torch.empty(batch, heads, q_len, num_groups, device=q.device, dtype=torch.float32)
    if mask is not None:
        mask_t = mask.contiguous().view(torch.uint8)
        mask_strides = (mask_t.stride(0), 0 if mask_t.shape[1] == 1 else mask_t.stride(1), mask_t.stride(2))
    else:
        mask_t, mask_strides = gid, (0, 0, 0)  # never read (HAS_MASK is False)
    block_m, block_n, warps = _blocks(q_len, dim, triton.next_power_of_2(num_groups))
    block_g = max(triton.next_power_of_2(num_groups), 1)
    if block_m * block_g < 16:  # tl.dot needs at least 16 rows
        block_m = 16 // block_g
    grid = (triton.cdiv(q_len, block_m), batch * heads)
    _key_group_fwd_kernel[grid](
        q, k, v, gid, mask_t, outputs, masses,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), gid.stride(0), *mask_strides,
        outputs.stride(0), outputs.stride(1), outputs.stride(2), outputs.stride(3),
        masses.stride(0), masses.stride(1), masses.stride(2),
        heads, heads // k.shape[1], q_len, kv_len, scale * LOG2E,
        HEAD_DIM=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)), NUM_GROUPS=num_groups, BLOCK_G=block_g,
        CAUSAL=bool(causal) and mask is None, HAS_MASK=mask is not None,
        DOT_F32=triton_interpreting() and q.dtype == torch.bfloat16, DOT_PREC=_dot_precision(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return outputs, masses


@functools.lru_cache(maxsize=64)
def _var_config(decode: bool, dim: int, dtype: torch.dtype, causal: bool, has_mask: bool,
                interpreting: bool) -> tuple[dict, int, tuple]:
    """Launch constants of :func:`var_attention_triton`, computed once per shape class (decode runs per layer
    per token, so the host work around the launch counts): ``(meta, BLOCK_M, tail)`` with ``tail`` the
    constexpr values in the kernel's argument order (what a direct launch passes after the scalars)."""
    if interpreting:
        block_m, block_n, warps = 16, 32, 4
    else:  # sm_90 (ptxas -v, bf16, D=128): no register spills without a mask, < 64 bytes with one
        block_m, block_n, warps = (16, 64, 4) if decode else (32, 64, 8)
    meta = dict(HEAD_DIM=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)), CAUSAL=causal and not has_mask,
                HAS_MASK=has_mask, DOT_F32=interpreting and dtype == torch.bfloat16, DOT_PREC=_dot_precision(dtype),
                BLOCK_M=block_m, BLOCK_N=block_n)
    names = _var_fwd_kernel.arg_names
    tail = tuple(meta[name] for name in names[names.index("HEAD_DIM"):])
    return dict(meta, num_warps=warps), block_m, tail


_INTERPRETING = triton_interpreting()  # as when the kernels above were decorated (interpreted or compiled)


def _int_specialization(values: tuple[int, ...]) -> tuple:
    """What triton specializes an integer argument on: 1, divisibility by 16, and whether it fits 32 bits."""
    return tuple((x == 1, x % 16 == 0, -2**31 <= x < 2**31) for x in values)


class SpecializedLaunches:
    """Direct launches (:class:`attnzoo.kernels._launch.DirectLaunch`) of one kernel whose integer arguments change
    between calls: a decoder-attention kernel at decode gets a new key length and new cache strides every step,
    the same in every layer of that step. A compiled kernel serves every integer set with the same
    specialization (value 1, divisibility by 16, 32-bit range), so this keeps one compiled kernel per
    specialization and one launcher per integer set (the last few), and launches the normal way only the first
    time a specialization is seen or when a direct launch does not apply (interpreter, old triton, misaligned
    pointers, a profiler's launch hook).

    Arguments of a call: ``ptrs`` (tensors), ``ints``, ``scalars`` (floats) in the kernel's argument order, then
    the constexprs: ``meta`` (with launch options such as ``num_warps``) and ``tail`` (their values in argument
    order); ``config`` a hashable that fixes the constexprs and the pointers' dtypes.
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.enabled = True  # False: every launch the normal way (benchmarks time the normal launch path so)
        self.compiled: dict[tuple, Any] = {}
        self.direct: dict[tuple, Any] = {}

    def __call__(self, grid: tuple[int, int], ptrs: tuple, ints: tuple, scalars: tuple, meta: dict, tail: tuple,
                 config: tuple, device: int) -> None:
        key = (grid, ints, config, device)
        launch = self.direct.get(key) if self.enabled else None
        if launch is not None and launch(ptrs, scalars):
            return
        from . import _launch

        if launch is None and self.enabled and _launch.SUPPORTED and not _INTERPRETING \
                and not any(t.data_ptr() & 15 for t in ptrs):  # compiled for aligned pointers: replay only those
            spec = (_int_specialization(ints), config, device)
            compiled = self.compiled.get(spec)
            launched = compiled is None
            if launched:  # first launch of this specialization: compile (or find) it the normal way
                compiled = self.kernel[grid](*ptrs, *ints, *scalars, **meta)
                if compiled is None or not hasattr(compiled, "packed_metadata"):
                    return
                self.compiled[spec] = compiled
            if len(self.direct) >= 16:  # old decode steps' integer sets
                self.direct.clear()
            launch = self.direct[key] = _launch.DirectLaunch(compiled, (*grid, 1), ints, tail)
            if launched or launch(ptrs, scalars):
                return
        self.kernel[grid](*ptrs, *ints, *scalars, **meta)


VAR_LAUNCHES = SpecializedLaunches(_var_fwd_kernel)


def var_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_groups: torch.Tensor,
                         redistribute_after: torch.Tensor, image_eps: torch.Tensor, p: float, summ: float,
                         rho: float, scale: float, causal: bool = True, mask: torch.Tensor | None = None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton backend of :func:`attnzoo.kernels.var_attention` (arguments already validated): one launch, the
    edited output written as ``(B, Lq, H, D)`` in the input dtype (into ``out`` when given). On CUDA with
    triton >= 3.4 the launch skips triton's per-call argument binding (:mod:`attnzoo.kernels._launch`)."""
    batch, heads, q_len, dim = q.shape
    # the host work around the launch counts at decode (once per edited layer per token): one stride() call per
    # tensor, the interpreter flag read once (the kernel object was made for it at import)
    q_strides, k_strides, v_strides = q.stride(), k.stride(), v.stride()
    if q_strides[3] != 1:
        q = q.contiguous()
        q_strides = q.stride()
    if k_strides[3] != 1:
        k = k.contiguous()
        k_strides = k.stride()
    if v_strides[3] != 1:
        v = v.contiguous()
        v_strides = v.stride()
    if out is None:
        out = q.new_empty((batch, q_len, heads, dim))
    out_strides = out.stride()
    if mask is not None:
        mask_t = mask.view(torch.uint8) if mask.stride(-1) == 1 else mask.contiguous().view(torch.uint8)
        m_strides = mask_t.stride()
        mask_strides = (m_strides[0], 0 if mask_t.shape[1] == 1 else m_strides[1], m_strides[2])
    else:
        mask_t, mask_strides = key_groups, (0, 0, 0)  # never read (HAS_MASK is False)
    config = (q_len <= 16, dim, q.dtype, causal, mask is not None, _INTERPRETING)
    meta, block_m, tail = _var_config(*config)
    ints = (q_strides[0], q_strides[1], q_strides[2], k_strides[0], k_strides[1], k_strides[2],
            v_strides[0], v_strides[1], v_strides[2], key_groups.stride(0), *mask_strides,
            out_strides[0], out_strides[1], out_strides[2],
            heads, heads // k.shape[1], q_len, k.shape[2], key_groups.shape[1])
    VAR_LAUNCHES((-(-q_len // block_m), batch * heads),  # plain ints: triton.cdiv is slow on the host
                (q, k, v, key_groups, redistribute_after, image_eps, mask_t, out), ints,
                (scale * LOG2E, float(p), float(summ), float(rho)), meta, tail, config, q.get_device())
    return out
