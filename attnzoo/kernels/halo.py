"""HaloNet's blocked local self-attention with timm ``HaloAttn`` semantics.

The map is cut into ``block_size x block_size`` query blocks; each block attends to the
``win x win`` window (``win = block_size + 2 * halo_size``) centred on it, with keys and values
zero-padded around the map (padded keys take part in the softmax with logit = position logit only),
plus 2-D relative position logits from ``rel_height`` / ``rel_width`` (Vaswani et al., "Scaling Local
Self-Attention for Parameter Efficient Visual Backbones", 2021; timm ``timm/layers/halo_attn.py``).

Backends (:func:`attnzoo.kernels.set_backend`):
- ``"triton"``: fused forward and backward; reads k/v windows in place, zero padding by masked loads.
- ``"torch"``: timm's formulation (pad, ``unfold`` the windows, dense attention per block).
- ``"flex"``: FlexAttention on the zero-padded key map with a window block mask and a score_mod that
  adds the position logits.

Mapping timm's ``HaloAttn.forward`` onto :func:`halo_attention` (for a drop-in module with the same
parameters and state-dict keys; ``nh = num_heads``, ``dqk = dim_head_qk``, ``dv = dim_head_v``)::

    qc = attn.q(x)                                            # (B, nh*dqk, H/s, W/s), s = block_stride
    q = qc.unflatten(1, (nh, dqk)).permute(0, 3, 4, 1, 2)     # (B, H/s, W/s, nh, dqk)
    kv = attn.kv(x).unflatten(1, (nh, dqk + dv))              # channels per head: [k (dqk) | v (dv)]
    k = kv[:, :, :dqk].permute(0, 3, 4, 1, 2)                 # (B, H, W, nh, dqk)
    v = kv[:, :, dqk:].permute(0, 3, 4, 1, 2)                 # (B, H, W, nh, dv)
    o = halo_attention(q, k, v, attn.block_size, attn.halo_size,
                       attn.pos_embed.height_rel, attn.pos_embed.width_rel, scale=attn.scale,
                       block_stride=attn.block_stride, scale_pos_embed=attn.scale_pos_embed)
    out = attn.pool(o.flatten(3).permute(0, 3, 1, 2))         # (B, nh*dv, H/s, W/s) -> pool as timm
"""

from __future__ import annotations

import torch

from ._backend import resolve_backend
from ._checks import register_check
from .routed import _KernelContext

__all__ = ["halo_attention"]


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, halo_size: int,
              rel_height: torch.Tensor | None, rel_width: torch.Tensor | None, block_stride: int) -> None:
    if q.dim() != 5 or k.dim() != 5 or v.dim() != 5:
        raise ValueError("q, k, v must be (batch, H, W, heads, head_dim); got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if block_size < 1 or halo_size < 0:
        raise ValueError(f"need block_size >= 1 and halo_size >= 0, got {block_size} and {halo_size}")
    if block_stride < 1 or block_size % block_stride:
        raise ValueError(f"block_size {block_size} is not divisible by block_stride {block_stride}; timm then "
                         "uses block_stride=1 and average-pools the output: do the same")
    b, h, w, heads, dqk = k.shape
    for axis, size in (("height", h), ("width", w)):
        if size % block_size:
            pad = block_size - size % block_size
            raise ValueError(f"feature map {axis} {size} is not divisible by block_size {block_size}; pad it by "
                             f"{pad} (to {size + pad}) or feed an input size divisible at every stage")
    if v.shape[:4] != k.shape[:4]:
        raise ValueError(f"v must match k except in head_dim, got {tuple(v.shape)} and {tuple(k.shape)}")
    want_q = (b, h // block_stride, w // block_stride, heads, dqk)
    if tuple(q.shape) != want_q:
        raise ValueError(f"q must be (batch, H/block_stride, W/block_stride, heads, d_qk) = {want_q} for k of "
                         f"shape {tuple(k.shape)}, got {tuple(q.shape)}")
    if (rel_height is None) != (rel_width is None):
        raise ValueError("pass both rel_height and rel_width, or neither")
    win = block_size + 2 * halo_size
    for name, rel in (("rel_height", rel_height), ("rel_width", rel_width)):
        if rel is not None and tuple(rel.shape) != (2 * win - 1, dqk):
            raise ValueError(f"{name} must be (2 * (block_size + 2 * halo_size) - 1, d_qk) = {(2 * win - 1, dqk)}, "
                             f"got {tuple(rel.shape)}")


def _rel_bias(q: torch.Tensor, rel_height: torch.Tensor, rel_width: torch.Tensor, block_q: int,
              win: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decomposed position logits: (bias over key rows, bias over key columns), each (B, Hq, Wq, heads, win).

    For the query at in-block offset (iy, ix): bias_rows[..., ky] = q . rel_height[ky - iy + win - 1] and
    bias_cols[..., kx] = q . rel_width[kx - ix + win - 1]; the logit of window key (ky, kx) adds both.
    Computed in float32 (autograd flows to q and both tables).
    """
    b, hq, wq, heads, d = q.shape
    offs = torch.arange(win, device=q.device)
    inblock = torch.arange(block_q, device=q.device)
    rel_index = offs[None, :] - inblock[:, None] + win - 1  # (block_q, win)
    qf = q.float()
    rows = torch.einsum("bnixhd,ikd->bnixhk", qf.reshape(b, hq // block_q, block_q, wq, heads, d),
                        rel_height.float()[rel_index]).reshape(b, hq, wq, heads, win)
    cols = torch.einsum("bynihd,ikd->bynihk", qf.reshape(b, hq, wq // block_q, block_q, heads, d),
                        rel_width.float()[rel_index]).reshape(b, hq, wq, heads, win)
    return rows, cols


def _halo_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_rows: torch.Tensor | None,
                bias_cols: torch.Tensor | None, block_size: int, halo_size: int, block_stride: int,
                scale: float) -> torch.Tensor:
    """timm's formulation: zero-pad k/v, unfold overlapping windows, dense attention per query block."""
    b, hq, wq, heads, dqk = q.shape
    dv = v.shape[-1]
    win, bq = block_size + 2 * halo_size, block_size // block_stride
    nby, nbx = hq // bq, wq // bq
    pad = [0, 0, 0, 0, halo_size, halo_size, halo_size, halo_size]
    # (B, nby, nbx, heads, d, win, win) -> (B, nby, nbx, heads, win*win, d)
    kw = torch.nn.functional.pad(k, pad).unfold(1, win, block_size).unfold(2, win, block_size)
    vw = torch.nn.functional.pad(v, pad).unfold(1, win, block_size).unfold(2, win, block_size)
    kw = kw.flatten(5).transpose(-1, -2)
    vw = vw.flatten(5).transpose(-1, -2)
    qb = q.reshape(b, nby, bq, nbx, bq, heads, dqk).permute(0, 1, 3, 5, 2, 4, 6).reshape(b, nby, nbx, heads, -1, dqk)
    logits = (qb @ kw.transpose(-1, -2)) * scale  # (B, nby, nbx, heads, bq*bq, win*win)
    if bias_rows is not None:
        def blocks(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, nby, bq, nbx, bq, heads, win).permute(0, 1, 3, 5, 2, 4, 6).reshape(
                b, nby, nbx, heads, bq * bq, win)

        pos = blocks(bias_rows)[..., :, None] + blocks(bias_cols)[..., None, :]
        logits = logits + pos.flatten(-2)
    attn = logits.softmax(-1).to(vw.dtype)
    out = attn @ vw  # (B, nby, nbx, heads, bq*bq, dv)
    return out.reshape(b, nby, nbx, heads, bq, bq, dv).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, hq, wq, heads, dv)


def _halo_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_rows: torch.Tensor | None,
               bias_cols: torch.Tensor | None, block_size: int, halo_size: int, block_stride: int,
               scale: float) -> torch.Tensor:
    """FlexAttention on the zero-padded key map: window mask per query block, position logits as score_mod."""
    from torch.nn.attention.flex_attention import create_block_mask

    from ._flex import flex_attention_fn

    b, hq, wq, heads, dqk = q.shape
    win, bq = block_size + 2 * halo_size, block_size // block_stride
    pad = [0, 0, 0, 0, halo_size, halo_size, halo_size, halo_size]
    kp, vp = torch.nn.functional.pad(k, pad), torch.nn.functional.pad(v, pad)
    hp, wp = kp.shape[1:3]
    dev = q.device

    def window_offsets(qi, ki):
        # offset of padded key (ky, kx) inside the window of the query's block
        return (ki // wp) - (qi // wq) // bq * block_size, (ki % wp) - (qi % wq) // bq * block_size

    def mask_mod(bi, hi, qi, ki):
        ry, rx = window_offsets(qi, ki)
        return (ry >= 0) & (ry < win) & (rx >= 0) & (rx < win)

    score_mod = None
    if bias_rows is not None:
        rows = bias_rows.permute(0, 3, 1, 2, 4).reshape(b, heads, hq * wq, win)
        cols = bias_cols.permute(0, 3, 1, 2, 4).reshape(b, heads, hq * wq, win)

        def score_mod(score, bi, hi, qi, ki):
            ry, rx = window_offsets(qi, ki)
            ry, rx = ry.clamp(0, win - 1), rx.clamp(0, win - 1)  # masked pairs index in range too
            return score + rows[bi, hi, qi, ry] + cols[bi, hi, qi, rx]

    mask = create_block_mask(mask_mod, None, None, hq * wq, hp * wp, device=dev)
    qf = q.reshape(b, hq * wq, heads, -1).transpose(1, 2)
    kf = kp.reshape(b, hp * wp, heads, -1).transpose(1, 2)
    vf = vp.reshape(b, hp * wp, heads, -1).transpose(1, 2)
    out = flex_attention_fn(dev)(qf, kf, vf, score_mod=score_mod, block_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(b, hq, wq, heads, -1)


# The fused Triton path under torch.compile, as torch.library custom ops: the compiler keeps them in its
# graph as opaque calls (no graph break), the fake implementations give the output shapes, and the autograd
# formula calls the fused backward. The forward also returns the logsumexp the backward needs (not
# differentiable). Eager calls use the kernels' autograd.Function directly (no op dispatch cost).
# Schemas spelled out as in na.py.


_HALO_FORWARD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? qr, SymInt block_size, SymInt halo_size, "
                        "SymInt block_stride, float scale, float bias_scale) -> (Tensor, Tensor)")


@torch.library.custom_op("attnzoo::halo_forward", mutates_args=(), schema=_HALO_FORWARD_SCHEMA)
def _halo_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qr: torch.Tensor | None, block_size: int,
                     halo_size: int, block_stride: int, scale: float,
                     bias_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: (out (batch, Hq, Wq, heads, d_v) in q's dtype, lse (batch, heads, Hq*Wq) float32).

    ``qr`` (batch, Hq, Wq, heads, 2 * (2 * win - 1)): q against both position tables, or None; its logits
    are scaled by ``bias_scale``.
    """
    from ._halo_triton import _HaloAttention

    ctx = _KernelContext()
    out = _HaloAttention.forward(ctx, q, k, v, qr, block_size, halo_size, block_stride, scale, bias_scale)
    return out, ctx.saved_tensors[-1]


@_halo_forward_op.register_fake
def _(q, k, v, qr, block_size, halo_size, block_stride, scale, bias_scale):
    b, hq, wq, heads, _ = q.shape
    return q.new_empty((b, hq, wq, heads, v.shape[-1])), q.new_empty((b, heads, hq * wq), dtype=torch.float32)


_HALO_BACKWARD_SCHEMA = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? qr, Tensor out, Tensor lse, "
                         "SymInt block_size, SymInt halo_size, SymInt block_stride, float scale, "
                         "float bias_scale) -> Tensor[]")


@torch.library.custom_op("attnzoo::halo_backward", mutates_args=(), schema=_HALO_BACKWARD_SCHEMA)
def _halo_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      qr: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, block_size: int, halo_size: int,
                      block_stride: int, scale: float, bias_scale: float) -> list[torch.Tensor]:
    """Fused backward: [dq, dk, dv] (+ [dqr] when ``qr`` is given), each shaped and typed like its input."""
    from ._halo_triton import _HaloAttention

    ctx = _KernelContext()
    ctx.save_for_backward(q, k, v, None if qr is None else qr.contiguous(), out, lse)  # as the forward saves them
    ctx.config = (block_size, halo_size, block_stride, scale, bias_scale, qr is not None)
    grads = _HaloAttention.backward(ctx, grad_out)[:4]
    return [g.contiguous() for g in grads if g is not None]  # dense, as the fake implementation promises


@_halo_backward_op.register_fake
def _(grad_out, q, k, v, qr, out, lse, block_size, halo_size, block_stride, scale, bias_scale):
    return [t.new_empty(t.shape) for t in (q, k, v, qr) if t is not None]


def _halo_setup_context(ctx, inputs, output):
    q, k, v, qr, *config = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, qr, out, lse)
    ctx.config = config
    ctx.set_materialize_grads(False)


def _halo_autograd_backward(ctx, grad_out, grad_lse):
    if grad_out is None:
        return (None,) * 9
    q, k, v, qr, out, lse = ctx.saved_tensors
    grads = torch.ops.attnzoo.halo_backward(grad_out, q, k, v, qr, out, lse, *ctx.config)
    dqr = grads[3] if qr is not None else None
    return grads[0], grads[1], grads[2], dqr, None, None, None, None, None


_halo_forward_op.register_autograd(_halo_autograd_backward, setup_context=_halo_setup_context)


def halo_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, halo_size: int,
                   rel_height: torch.Tensor | None = None, rel_width: torch.Tensor | None = None,
                   scale: float | None = None, block_stride: int = 1, scale_pos_embed: bool = False) -> torch.Tensor:
    """Halo attention (HaloNet) with exactly timm ``HaloAttn``'s semantics.

    Args:
        q: (batch, H // block_stride, W // block_stride, heads, d_qk), queries on the (subsampled) grid.
        k: (batch, H, W, heads, d_qk); v: (batch, H, W, heads, d_v). fp32, fp16 or bf16; any strides.
        block_size: query block edge on the key grid; H and W must be multiples of it (ValueError with the
            padding needed otherwise).
        halo_size: halo around each block; the key window is ``win = block_size + 2 * halo_size`` per axis,
            zero-padded outside the map (padded keys stay in the softmax, as in timm).
        rel_height, rel_width: (2 * win - 1, d_qk) relative position tables shared by all heads (timm's
            ``pos_embed.height_rel`` / ``width_rel``), or both None for no position logits. For the
            query at in-block offset (iy, ix) and window key (ky, kx) the logit is
            ``scale * q.k + q.rel_height[ky - iy + win - 1] + q.rel_width[kx - ix + win - 1]``.
        scale: default ``d_qk ** -0.5`` (timm's ``dim_head_qk ** -0.5``).
        block_stride: query subsampling (timm's ``block_stride``, 1 or 2): query blocks are
            ``block_size // block_stride`` on q's grid; block_size must be divisible by it.
        scale_pos_embed: timm's flag; scale the position logits too: ``scale * (q.k + pos)``.

    Returns:
        (batch, H // block_stride, W // block_stride, heads, d_v) in q's dtype. Gradients flow to q, k,
        v, rel_height and rel_width on every backend.
    """
    _validate(q, k, v, block_size, halo_size, rel_height, rel_width, block_stride)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = resolve_backend(q.device, "halo_attention")
    if backend == "triton":
        # Position logits as one matmul, q @ [rel_height; rel_width]^T (B, Hq, Wq, heads, 2 * (2 * win - 1)),
        # whose entries the kernels pick per (query, key); autograd takes their gradient on to q and the tables.
        qr = None if rel_height is None else q @ torch.cat([rel_height, rel_width]).to(q.dtype).T
        args = (q, k, v, qr, block_size, halo_size, block_stride, scale, scale if scale_pos_embed else 1.0)
        if torch.compiler.is_compiling():
            return torch.ops.attnzoo.halo_forward(*args)[0]
        from ._halo_triton import _HaloAttention  # eager: the Function, without op dispatch

        return _HaloAttention.apply(*args)
    win, block_q = block_size + 2 * halo_size, block_size // block_stride
    bias_rows = bias_cols = None
    if rel_height is not None:
        bias_rows, bias_cols = _rel_bias(q, rel_height, rel_width, block_q, win)
        if scale_pos_embed:
            bias_rows, bias_cols = bias_rows * scale, bias_cols * scale
    args = (bias_rows, bias_cols, block_size, halo_size, block_stride, scale)
    if backend == "flex":
        out = _halo_flex(q, k, v, *args)
    else:
        out = _halo_torch(q, k, v, *args)
    return out.to(q.dtype)


@register_check("halo_attention")
def _check(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, str]:
    from .reference import halo_attention_reference

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 12, 2, 16, generator=gen) for _ in range(3))
    rel_h, rel_w = (0.2 * torch.randn(2 * 8 - 1, 16, generator=gen) for _ in range(2))
    out = halo_attention(*(t.to(device) for t in (q, k, v)), 4, 2, rel_h.to(device), rel_w.to(device))
    ref = halo_attention_reference(q, k, v, 4, 2, rel_h, rel_w)
    return out.cpu(), ref, resolve_backend(device, "halo_attention")
