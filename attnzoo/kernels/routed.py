"""BiFormer's bi-level routing attention: the coarse region routing and the token-to-token stage.

The feature map is split into ``nh x nw`` regions (row-major region ids ``r = ry * nw + rx``); each
query region attends to all tokens of the ``topk`` key/value regions the router chose for it, all heads
sharing one routing (Zhu et al., "BiFormer", CVPR 2023; official ``ops/bra_legacy.py``).

Backends (:func:`attnzoo.kernels.set_backend`):
- ``"triton"``: fused forward and backward that read the selected regions of k and v in place
  (online softmax, no gathered copy; dk/dv through an inverse routing table, no atomics). For small maps
  of tiny regions (at most 64 regions of under 16 tokens, at least 1/4 of them routed: BiFormer stage 3
  at 224) the kernels instead run dense tiles over the whole map with the routing as a per-pair mask.
- ``"torch"``: the official formulation: gather the selected regions, then attention per query region
  (``scaled_dot_product_attention``).
- ``"flex"``: FlexAttention over the whole map with a block mask built from the routing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._logging import log_once
from ._backend import logger, resolve_backend
from ._checks import register_check
from ._flex import flex_attention_fn

__all__ = ["bilevel_routing_attention", "region_routing", "routed_attention"]


def _region_grid(num_regions: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(num_regions, int):
        return num_regions, num_regions
    nh, nw = (int(n) for n in num_regions)
    return nh, nw


def _check_divisible(height: int, width: int, nh: int, nw: int) -> None:
    for axis, size, n in (("height", height, nh), ("width", width, nw)):
        if n < 1:
            raise ValueError(f"num_regions must be >= 1 per axis, got {n} on the {axis} axis")
        if size % n:
            pad = (n - size % n) % n
            raise ValueError(
                f"feature map {axis} {size} is not divisible by {n} regions; pad it by {pad} "
                f"(to {size + pad}) as BiFormer's auto_pad does, or choose a region count that divides it"
            )


def region_routing(q: torch.Tensor, k: torch.Tensor, num_regions: int | tuple[int, int], topk: int,
                   scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BiFormer's coarse routing stage (plain torch ops): region means, region affinity, top-k.

    Args:
        q, k: (batch, H, W, C) queries and keys with all channels (not split into heads).
        num_regions: regions per axis, ``n`` or ``(nh, nw)``; H % nh == 0 and W % nw == 0.
        topk: regions kept per query region, 1 <= topk <= nh * nw.
        scale: logit scale; default ``C ** -0.5`` (BiFormer's ``qk_scale or qk_dim ** -0.5``).

    Returns:
        ``(weight, index)``: ``weight`` (batch, nh*nw, topk), the softmax over the kept logits, in q's
        dtype; ``index`` (batch, nh*nw, topk) int64, the chosen key regions in decreasing affinity.
        Logits are ``(mean_q(r) * scale) @ mean_k(s)^T`` with region means over the region's tokens.
        Nothing is detached: BiFormer (``diff_routing=False``) passes ``q.detach(), k.detach()``.

    Backends: plain torch ops (means, matmul, ``torch.topk``, softmax; differentiable in ``weight``) on the
    torch and flex backends and wherever q or k needs a gradient. On the triton backend, when no gradient is
    needed (BiFormer's detached routing), fused kernels (one for small maps, else three: region sums,
    affinity, top-k) compute the same quantities with fp32 region sums and fp32-accumulated logits (fp32 dots
    for fp32 inputs, tf32 for half inputs; the torch ops round means and logits to q's dtype, so in bf16 the
    two may order or pick differently among regions whose logits nearly tie); ties go to the lower region id.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both be (batch, H, W, C) of one shape, got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    b, h, w, c = q.shape
    nh, nw = _region_grid(num_regions)
    _check_divisible(h, w, nh, nw)
    if not 1 <= topk <= nh * nw:
        raise ValueError(f"topk {topk} must lie in [1, {nh * nw}] (the number of regions {nh}x{nw})")
    scale = c ** -0.5 if scale is None else scale
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if not needs_grad and not torch.compiler.is_compiling() and resolve_backend(q.device, "region_routing") == "triton":
        from ._routed_triton import region_routing_triton

        return region_routing_triton(q, k, nh, nw, topk, float(scale))
    q_mean = q.reshape(b, nh, h // nh, nw, w // nw, c).mean((2, 4)).reshape(b, nh * nw, c)
    k_mean = k.reshape(b, nh, h // nh, nw, w // nw, c).mean((2, 4)).reshape(b, nh * nw, c)
    logits = (q_mean * scale) @ k_mean.transpose(-1, -2)  # (batch, R, R)
    top_logits, index = torch.topk(logits, k=topk, dim=-1)
    return top_logits.softmax(-1), index


def _validate_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  num_regions: int | tuple[int, int]) -> tuple[int, int]:
    if q.dim() != 5 or k.dim() != 5 or v.dim() != 5:
        raise ValueError("q, k, v must be (batch, H, W, heads, head_dim); got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape != k.shape or v.shape[:4] != q.shape[:4]:
        raise ValueError(f"q and k must match and v must match them except in head_dim; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    h, w = q.shape[1:3]
    nh, nw = _region_grid(num_regions)
    _check_divisible(h, w, nh, nw)
    return nh, nw


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region_index: torch.Tensor,
              num_regions: int | tuple[int, int]) -> tuple[int, int]:
    nh, nw = _validate_qkv(q, k, v, num_regions)
    b = q.shape[0]
    if region_index.dim() != 3 or region_index.shape[:2] != (b, nh * nw):
        raise ValueError(f"region_index must be (batch, nh*nw, topk) = ({b}, {nh * nw}, topk), got "
                         f"{tuple(region_index.shape)}")
    if region_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"region_index must be int64 (as torch.topk returns), got {region_index.dtype}")
    if region_index.device != q.device:
        raise ValueError(f"region_index is on {region_index.device} but q on {q.device}")
    # A CUDA check would sync every call, and under torch.compile reading values is a graph break: eager CPU only.
    if region_index.device.type != "cuda" and region_index.numel() and not torch.compiler.is_compiling():
        lo, hi = int(region_index.min()), int(region_index.max())
        if lo < 0 or hi >= nh * nw:
            raise ValueError(f"region_index values must lie in [0, {nh * nw}), found [{lo}, {hi}]")
    return nh, nw


def _to_regions(x: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    """(batch, H, W, heads, d) -> (batch, R, region tokens, heads, d), row-major regions and tokens."""
    b, h, w, heads, d = x.shape
    x = x.reshape(b, nh, h // nh, nw, w // nw, heads, d).permute(0, 1, 3, 2, 4, 5, 6)
    return x.reshape(b, nh * nw, (h // nh) * (w // nw), heads, d)


def _from_regions(x: torch.Tensor, nh: int, nw: int, h: int, w: int) -> torch.Tensor:
    b, _, _, heads, d = x.shape
    x = x.reshape(b, nh, nw, h // nh, w // nw, heads, d).permute(0, 1, 3, 2, 4, 5, 6)
    return x.reshape(b, h, w, heads, d)


def _routed_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region_index: torch.Tensor, nh: int, nw: int,
                  scale: float) -> torch.Tensor:
    """The official formulation: gather the top-k kv regions per query region, then dense attention."""
    b, h, w, heads, _ = q.shape
    region_index = region_index.long()
    topk = region_index.shape[-1]
    q_reg = _to_regions(q, nh, nw)  # (b, R, t, heads, d)
    k_reg, v_reg = _to_regions(k, nh, nw), _to_regions(v, nh, nw)
    batch = torch.arange(b, device=q.device)[:, None, None]
    k_sel = k_reg[batch, region_index]  # (b, R, topk, t, heads, d): the copy the fused kernel avoids
    v_sel = v_reg[batch, region_index]
    r, t = q_reg.shape[1:3]
    qf = q_reg.reshape(b * r, t, heads, -1).transpose(1, 2)
    kf = k_sel.reshape(b * r, topk * t, heads, -1).transpose(1, 2)
    vf = v_sel.reshape(b * r, topk * t, heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(qf, kf, vf, scale=scale)  # (b*R, heads, t, dv)
    return _from_regions(out.transpose(1, 2).reshape(b, r, t, heads, -1), nh, nw, h, w)




def _routed_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region_index: torch.Tensor, nh: int, nw: int,
                 scale: float) -> torch.Tensor:
    """FlexAttention over the flattened map; the mask allows (query, key) when key's region is routed."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, h, w, heads, _ = q.shape
    r = nh * nw
    region_index = region_index.long()
    allowed = torch.zeros(b, r, r, dtype=torch.int32, device=q.device)
    allowed.scatter_add_(2, region_index, torch.ones_like(region_index, dtype=torch.int32))
    if q.device.type != "cuda" and bool((allowed > 1).any()):
        raise ValueError("the flex backend needs distinct regions per row of region_index (a mask cannot count "
                         "a region twice); use the torch or triton backend")
    allowed = allowed > 0
    rh, rw = h // nh, w // nw
    ys = torch.arange(h * w, device=q.device) // w
    xs = torch.arange(h * w, device=q.device) % w
    token_region = (ys // rh) * nw + xs // rw

    def mask_mod(bi, hi, qi, ki):
        return allowed[bi, token_region[qi], token_region[ki]]

    mask = create_block_mask(mask_mod, b, None, h * w, h * w, device=q.device)
    qf, kf, vf = (x.reshape(b, h * w, heads, -1).transpose(1, 2) for x in (q, k, v))
    out = flex_attention_fn(q.device)(qf, kf, vf, block_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(b, h, w, heads, -1)


class _KernelContext:
    """Stands in for an autograd ctx so that a fused kernel's ``autograd.Function`` forward and backward run as
    plain functions inside the custom ops below (the ops own autograd; the Function keeps the launch code)."""

    saved_tensors: tuple[torch.Tensor | None, ...] = ()

    def save_for_backward(self, *tensors: torch.Tensor | None) -> None:
        self.saved_tensors = tensors


# The fused Triton path under torch.compile, as torch.library custom ops: the compiler keeps them in its
# graph as opaque calls (no graph break), the fake implementations give the output shapes, and the autograd
# formula calls the fused backward. The forward also returns the logsumexp the backward needs (not
# differentiable). Eager calls use the kernels' autograd.Function directly (no op dispatch cost).
# Schemas spelled out as in na.py.


_ROUTED_FORWARD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor region_index, SymInt nh, SymInt nw, "
                          "float scale) -> (Tensor, Tensor)")


@torch.library.custom_op("attnzoo::routed_forward", mutates_args=(), schema=_ROUTED_FORWARD_SCHEMA)
def _routed_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region_index: torch.Tensor, nh: int,
                       nw: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: (out (batch, H, W, heads, d_v) in q's dtype, lse (batch, heads, H*W) float32)."""
    from ._routed_triton import _RoutedAttention

    ctx = _KernelContext()
    out = _RoutedAttention.forward(ctx, q, k, v, region_index, nh, nw, scale)
    return out, ctx.saved_tensors[-1]


@_routed_forward_op.register_fake
def _(q, k, v, region_index, nh, nw, scale):
    b, h, w, heads, _ = q.shape
    return q.new_empty((b, h, w, heads, v.shape[-1])), q.new_empty((b, heads, h * w), dtype=torch.float32)


_ROUTED_BACKWARD_SCHEMA = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor region_index, Tensor out, "
                           "Tensor lse, SymInt nh, SymInt nw, float scale) -> (Tensor, Tensor, Tensor)")


@torch.library.custom_op("attnzoo::routed_backward", mutates_args=(), schema=_ROUTED_BACKWARD_SCHEMA)
def _routed_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        region_index: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, nh: int, nw: int,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward: (dq, dk, dv), dense, shaped and typed like q, k, v."""
    from ._routed_triton import _last_contiguous, _RoutedAttention

    ctx = _KernelContext()
    # the tensors _RoutedAttention.forward saves: unit-stride channels, the routing table as given
    ctx.save_for_backward(_last_contiguous(q), _last_contiguous(k), _last_contiguous(v), region_index, out, lse)
    ctx.geometry = (nh, nw, scale)
    dq, dk, dv = _RoutedAttention.backward(ctx, grad_out)[:3]
    return dq, dk, dv


@_routed_backward_op.register_fake
def _(grad_out, q, k, v, region_index, out, lse, nh, nw, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _routed_setup_context(ctx, inputs, output):
    q, k, v, region_index, nh, nw, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, region_index, out, lse)
    ctx.geometry = (nh, nw, scale)
    ctx.set_materialize_grads(False)


def _routed_autograd_backward(ctx, grad_out, grad_lse):
    if grad_out is None:
        return (None,) * 7
    q, k, v, region_index, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.attnzoo.routed_backward(grad_out, q, k, v, region_index, out, lse, *ctx.geometry)
    return dq, dk, dv, None, None, None, None


_routed_forward_op.register_autograd(_routed_autograd_backward, setup_context=_routed_setup_context)


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region_index: torch.Tensor,
                     num_regions: int | tuple[int, int], scale: float | None = None) -> torch.Tensor:
    """Token-to-token stage of BiFormer's bi-level routing attention.

    Args:
        q, k: (batch, H, W, heads, d_qk); v: (batch, H, W, heads, d_v) (d_v may differ from d_qk).
            fp32, fp16 or bf16; any strides.
        region_index: (batch, nh*nw, topk) int64 (e.g. the index from :func:`region_routing`): query
            region r attends to every token of regions ``region_index[b, r, :]``, shared by all heads.
            Regions are row-major (``r = ry * nw + rx``); a region named twice counts twice (as in a
            gather). It gets no gradient. Values must lie in [0, nh*nw) (checked on the CPU only).
        num_regions: regions per axis, ``n`` or ``(nh, nw)``; H % nh == 0 and W % nw == 0, else a
            ValueError naming the padding needed.
        scale: logit scale, default ``d_qk ** -0.5``. BiFormer uses ``qk_dim ** -0.5`` with qk_dim the
            full channel count (heads * d_qk): pass it explicitly to match the official model.

    Returns:
        (batch, H, W, heads, d_v) in q's dtype. Differentiable in q, k, v on every backend.
    """
    nh, nw = _validate(q, k, v, region_index, num_regions)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = resolve_backend(q.device, "routed_attention")
    if backend == "triton":
        if torch.compiler.is_compiling():
            return torch.ops.attnzoo.routed_forward(q, k, v, region_index, nh, nw, scale)[0]
        from ._routed_triton import routed_attention_triton  # eager: the Function, without op dispatch

        return routed_attention_triton(q, k, v, region_index, nh, nw, scale)
    if backend == "flex":
        return _routed_flex(q, k, v, region_index, nh, nw, scale)
    return _routed_torch(q, k, v, region_index, nh, nw, scale)


def bilevel_routing_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_regions: int | tuple[int, int],
                              topk: int, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BiFormer's bi-level routing attention, both stages: routing on detached q, k, then routed attention.

    Same result as ``region_routing(q.detach().flatten(3), k.detach().flatten(3), num_regions, topk)`` followed
    by ``routed_attention(q, k, v, index, num_regions, scale)`` (the official model's order), in one call.

    Args:
        q, k: (batch, H, W, heads, d_qk); v: (batch, H, W, heads, d_v); fp32, fp16 or bf16, any strides. The
            routing sees all heads' channels (heads * d_qk, as the official model routes before splitting).
        num_regions: regions per axis, ``n`` or ``(nh, nw)``; H % nh == 0 and W % nw == 0.
        topk: key regions per query region, 1 <= topk <= nh * nw.
        scale: attention logit scale, default ``d_qk ** -0.5``; BiFormer passes ``(heads * d_qk) ** -0.5``. The
            routing's choice does not depend on it.

    Returns:
        ``(out, index)``: out (batch, H, W, heads, d_v) in q's dtype, differentiable in q, k, v (the routing
        gets no gradient, as in BiFormer); index (batch, nh*nw, topk) int64, the chosen key regions in
        decreasing affinity (ties to the lower region id).

    Backends: on the triton backend, for maps of at most 64 regions of under 16 tokens with at least 1/4 of
    them routed (BiFormer stage 3 at 224), the routing runs as two small kernels that write a 64-bit routing
    word per query region (one-warp programs per (batch, 16 query regions, head) each compute one head's
    share of the region affinity; then one-warp programs per two routing rows sum the heads' shares and take
    the top-k), and the dense region-masked attention kernel reads one word per query instead of topk
    indices; the backward is the dense one of :func:`routed_attention`, also reading the words. The affinity
    is accumulated in fp32 per head (tf32 dots for half inputs), so in bf16 it may pick differently from the
    torch formulation of ``region_routing`` among regions whose affinities nearly tie. Elsewhere (other
    geometries, other backends, under ``torch.compile``) the two functions run one after the other.

    Example:
        >>> q, k, v = (torch.randn(2, 14, 14, 8, 32) for _ in range(3))
        >>> out, index = bilevel_routing_attention(q, k, v, num_regions=7, topk=16, scale=256 ** -0.5)
        >>> out.shape, index.shape
        (torch.Size([2, 14, 14, 8, 32]), torch.Size([2, 49, 16]))
    """
    nh, nw = _validate_qkv(q, k, v, num_regions)
    h, w = q.shape[1:3]
    if not 1 <= topk <= nh * nw:
        raise ValueError(f"topk {topk} must lie in [1, {nh * nw}] (the number of regions {nh}x{nw})")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if resolve_backend(q.device, "routed_attention") == "triton" and not torch.compiler.is_compiling():
        from ._routed_triton import bilevel_routing_attention_triton, routing_words_supported

        t = (h // nh) * (w // nw)
        if routing_words_supported(nh * nw, t, topk):
            log_once(logger, "bilevel_routing_attention: routing-words kernel + dense region-masked attention")
            return bilevel_routing_attention_triton(q, k, v, nh, nw, topk, scale)
        log_once(logger, f"bilevel_routing_attention: {nh}x{nw} regions of {t} tokens, topk {topk}: routing "
                         "kernel, then routed_attention (routing words cover <= 64 regions of < 16 tokens with "
                         "topk >= regions / 4)")
    _, index = region_routing(q.detach().flatten(3), k.detach().flatten(3), (nh, nw), topk)
    return routed_attention(q, k, v, index, (nh, nw), scale), index


@register_check("routed_attention")
def _check(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, str]:
    from .reference import routed_attention_reference

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, 12, 2, 16, generator=gen) for _ in range(3))
    _, index = region_routing(q.flatten(3), k.flatten(3), (2, 3), topk=2)
    out = routed_attention(q.to(device), k.to(device), v.to(device), index.to(device), (2, 3))
    return out.cpu(), routed_attention_reference(q, k, v, index, (2, 3)), resolve_backend(device, "routed_attention")
