"""Key-group attention: softmax attention split by groups of keys, in one pass, without the attention matrix.

For every (batch, head, query) cell with post-softmax weights ``P`` over the keys, and a group id per key,
:func:`key_group_attention` returns the per-group partial outputs and masses

    O_g = sum_{j in g} P_j v_j        M_g = sum_{j in g} P_j

so that ``sum_g O_g`` is the ordinary attention output and any re-weighting of whole key groups,
``sum_g w_g O_g`` with ``w_g`` decided per cell from the masses, is exact. This is what attention-level
hallucination-mitigation passes such as VAR (which scales sink keys and moves the freed mass to the image)
need during prefill; the Triton kernel computes it with one online softmax over the keys (fp32 accumulators,
the (Lq x Lkv) matrix is never stored).

:func:`var_attention` is VAR's re-weighting fused into the same pass: the kernel's epilogue makes VAR's
per-cell decision from the group masses and writes the edited output directly (one launch per layer).

Backends (see :func:`attnzoo.kernels.set_backend`): a fused Triton forward on CUDA, a PyTorch path chunked
over queries on the CPU ("flex" falls back to it). Forward only: this op serves inference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._backend import resolve_backend

__all__ = ["key_group_attention", "var_attention", "var_attention_backend"]

# The PyTorch backend materialises at most this many fp32 scores per query chunk (256 MiB).
_TORCH_CHUNK_ELEMENTS = 1 << 26


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_groups: torch.Tensor, num_groups: int,
              mask: torch.Tensor | None) -> None:
    fn = "key_group_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be a 4-D tensor (batch, heads, length, head_dim), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"{fn}: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == key_groups.device):
        raise ValueError(f"{fn}: q, k, v, key_groups must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}, {key_groups.device}")
    batch, heads, _, dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[-1] != dim:
        raise ValueError(f"{fn}: k {tuple(k.shape)} and v {tuple(v.shape)} must be (batch, kv_heads, kv_length, "
                         f"head_dim) matching q {tuple(q.shape)} in batch and head_dim")
    if heads % k.shape[1] != 0:
        raise ValueError(f"{fn}: kv heads ({k.shape[1]}) must divide q heads ({heads}) for GQA/MQA")
    if key_groups.shape != (batch, k.shape[2]) or key_groups.dtype.is_floating_point or key_groups.dtype == torch.bool:
        raise ValueError(f"{fn}: key_groups must be an integer tensor of shape (batch, kv_length) = "
                         f"{(batch, k.shape[2])}, got {key_groups.dtype} {tuple(key_groups.shape)}")
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"{fn}: num_groups must be a positive int, got {num_groups!r}")
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] != batch or mask.shape[1] not in (1, heads) \
                or tuple(mask.shape[2:]) != (q.shape[2], k.shape[2]):
            raise ValueError(f"{fn}: mask must be bool of shape (batch, 1 or heads, q_length, kv_length) = "
                             f"({batch}, 1|{heads}, {q.shape[2]}, {k.shape[2]}), got {mask.dtype} "
                             f"{tuple(mask.shape)}")


def key_group_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_groups: torch.Tensor,
                        num_groups: int, scale: float | None = None, causal: bool = True,
                        mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention split into per-key-group partial outputs and masses, in one pass.

    Args:
        q: ``(B, H, Lq, D)`` queries (float32, float16 or bfloat16).
        k, v: ``(B, Hkv, Lkv, D)`` keys and values, same dtype; ``Hkv`` divides ``H`` (GQA: query head ``h``
            reads kv head ``h // (H // Hkv)``), not repeated.
        key_groups: ``(B, Lkv)`` integer group id of every key, in ``[0, num_groups)``; a negative id removes
            the key (e.g. padding).
        num_groups: ``G``, the number of groups.
        scale: softmax scale (default ``D ** -0.5``).
        causal: keys after the query are masked; lower-right aligned (query ``i`` sits at key position
            ``Lkv - Lq + i``, as with a KV cache). Ignored when ``mask`` is given.
        mask: optional bool keep-mask ``(B, 1 or H, Lq, Lkv)``, True = attend; replaces ``causal``.

    Returns:
        ``(outputs, masses)``: ``outputs`` ``(B, H, Lq, G, D)`` float32 with ``outputs[..., g, :] = sum over
        keys j of group g of P_j v_j``, and ``masses`` ``(B, H, Lq, G)`` float32 with the summed weights
        ``P_j`` of each group, where ``P`` is the softmax over all unmasked keys of the cell (so the masses
        of a cell sum to 1 and ``outputs.sum(-2)`` is the plain attention output). A query with no key
        left gets zeros in both.
    """
    _validate(q, k, v, key_groups, num_groups, mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = resolve_backend(q.device, "key_group_attention")
    if backend == "triton":
        from ._grouped_attention_triton import key_group_attention_triton

        return key_group_attention_triton(q, k, v, key_groups, num_groups, scale, causal, mask)
    return key_group_attention_torch(q, k, v, key_groups, num_groups, scale, causal, mask)


def _keep_mask(key_groups: torch.Tensor, q_len: int, causal: bool, mask: torch.Tensor | None,
               q_start: int, q_stop: int) -> torch.Tensor:
    """``(B, 1 or H, q_stop - q_start, Lkv)`` bool keep-mask of a query chunk."""
    kv_len = key_groups.shape[1]
    valid = (key_groups >= 0)[:, None, None, :]
    if mask is not None:
        return mask[:, :, q_start:q_stop] & valid
    if not causal:
        return valid
    positions = torch.arange(kv_len - q_len + q_start, kv_len - q_len + q_stop, device=key_groups.device)
    return valid & (positions[:, None] >= torch.arange(kv_len, device=key_groups.device)[None, :])


def key_group_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_groups: torch.Tensor,
                              num_groups: int, scale: float, causal: bool = True,
                              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch backend of :func:`key_group_attention` (same arguments, validated): float32 math, queries in
    chunks so that at most ``_TORCH_CHUNK_ELEMENTS`` scores exist at a time.

    One matmul per chunk gives every group's output and mass: the values are spread over ``G`` column blocks
    (key j's value in block ``group(j)``, zeros elsewhere) followed by the keys' one-hot group columns."""
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    rep = heads // kv_heads
    one_hot = torch.nn.functional.one_hot(key_groups.long().clamp_min(0), num_groups).float()
    one_hot = one_hot * (key_groups >= 0)[..., None]  # (B, Lkv, G)
    spread = (v.float()[:, :, :, None, :] * one_hot[:, None, :, :, None]).flatten(3)  # (B, Hkv, Lkv, G * D)
    spread = torch.cat([spread, one_hot[:, None].expand(-1, kv_heads, -1, -1)], dim=-1)  # + (G) mass columns
    # GQA without copies of k/v: the query heads of one kv head are stacked along the query axis
    qg = q.float().view(batch, kv_heads, rep, q_len, dim)
    kt = k.float().transpose(-1, -2)
    outputs = q.new_empty(batch, heads, q_len, num_groups, dim, dtype=torch.float32)
    masses = q.new_empty(batch, heads, q_len, num_groups, dtype=torch.float32)
    chunk = max(1, _TORCH_CHUNK_ELEMENTS // max(1, batch * heads * kv_len))
    for start in range(0, q_len, chunk):
        stop = min(q_len, start + chunk)
        size = stop - start
        scores = torch.matmul(qg[:, :, :, start:stop].reshape(batch, kv_heads, rep * size, dim), kt) * scale
        keep = _keep_mask(key_groups, q_len, causal, mask, start, stop)  # (B, 1|H, c, Lkv)
        keep = keep.reshape(batch, kv_heads, rep * size, kv_len) if keep.shape[1] == heads else \
            keep.expand(-1, -1, size, -1).repeat(1, 1, rep, 1)
        scores = scores.masked_fill(~keep, float("-inf"))
        top = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)  # finite on empty rows
        weights = torch.exp(scores - top)
        total = weights.sum(-1, keepdim=True)
        weights = weights / torch.where(total > 0, total, torch.ones_like(total))
        both = torch.matmul(weights, spread).view(batch, heads, size, num_groups * (dim + 1))
        outputs[:, :, start:stop] = both[..., :num_groups * dim].unflatten(-1, (num_groups, dim))
        masses[:, :, start:stop] = both[..., num_groups * dim:]
    return outputs, masses


# VAR's key groups (see attnzoo.mitigation.var)
VAR_OTHER, VAR_IMAGE, VAR_VISUAL_SINK, VAR_TEXT_SINK = 0, 1, 2, 3


def var_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_groups: torch.Tensor,
                  redistribute_after: torch.Tensor, image_eps: torch.Tensor, p: float, summ: float, rho: float,
                  scale: float | None = None, causal: bool = True, mask: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention with VAR's redistribution applied per (head, query) cell, in one fused pass.

    The keys fall into four groups: 0 other text, 1 non-sink image, 2 visual sink, 3 text sink. With ``M_g``
    the softmax mass of a cell on group g, the cell is *image-centric* when ``M_1 + M_2 >= summ``,
    ``M_2 / (M_1 + M_2 + image_eps[b]) <= rho`` and its query position is ``> redistribute_after[b]``. There,
    sink weights are multiplied by ``p`` and the freed mass ``(1 - p) (M_2 + M_3)`` is added to the non-sink
    image keys in proportion to their weight; other cells get the plain attention.

    Args:
        q: ``(B, H, Lq, D)`` queries (float32, float16 or bfloat16); k, v: ``(B, Hkv, Lkv, D)``, same dtype,
            ``Hkv`` divides ``H`` (GQA).
        key_groups: ``(B, Lg)`` int32 group ids of the first ``Lg <= Lkv`` keys (negative: key removed); keys
            ``Lg ..`` are group 0 (tokens generated after the prompt), so a prompt's ids serve every decode step.
        redistribute_after: ``(B,)`` int32 key position; only queries at later positions are redistributed
            (queries sit at ``Lkv - Lq + i``). VAR: the last image position, or ``>= Lkv`` (e.g. ``2**30``)
            for a sample without visual sinks.
        image_eps: ``(B,)`` float32 added to a cell's image mass in the visual-sink share's denominator.
        p, summ, rho: VAR's hyper-parameters (floats in [0, 1]).
        scale: softmax scale (default ``D ** -0.5``).
        causal, mask: as in :func:`key_group_attention` (lower-right causal, or a bool keep-mask
            ``(B, 1 or H, Lq, Lkv)`` that replaces it).
        out: optional preallocated ``(B, Lq, H, D)`` output (contiguous, dtype of q).

    Returns:
        ``(B, Lq, H, D)`` in the dtype of ``q`` (the layout attention functions hand to ``o_proj``).
    """
    # checks kept cheap: this runs per layer per decoded token
    fn = "var_attention"
    batch, heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    groups_shape = key_groups.shape
    if key_groups.dtype != torch.int32 or len(groups_shape) != 2 or groups_shape[0] != batch \
            or groups_shape[1] > kv_len or key_groups.stride(-1) != 1:
        raise ValueError(f"{fn}: key_groups must be contiguous int32 (batch, Lg) with Lg <= kv length {kv_len}, "
                         f"got {key_groups.dtype} {tuple(groups_shape)}")
    if redistribute_after.dtype != torch.int32 or image_eps.dtype != torch.float32 \
            or redistribute_after.shape != (batch,) or image_eps.shape != (batch,):
        raise ValueError(f"{fn}: redistribute_after must be int32 and image_eps float32, both of shape "
                         f"({batch},), got {redistribute_after.dtype} {tuple(redistribute_after.shape)} and "
                         f"{image_eps.dtype} {tuple(image_eps.shape)}")
    device = q.device
    if key_groups.device != device or redistribute_after.device != device or image_eps.device != device:
        raise ValueError(f"{fn}: key_groups, redistribute_after, image_eps must be on q's device {device}, got "
                         f"{key_groups.device}, {redistribute_after.device}, {image_eps.device}")
    if out is not None and (out.shape != (batch, q_len, heads, dim) or out.dtype != q.dtype
                            or not out.is_contiguous()):
        raise ValueError(f"{fn}: out must be a contiguous {q.dtype} tensor of shape (B, Lq, H, D) = "
                         f"{(batch, q_len, heads, dim)}, got {out.dtype} {tuple(out.shape)}")
    scale = dim ** -0.5 if scale is None else float(scale)
    if resolve_backend(device, fn) == "triton":
        if k.shape != v.shape or len(k.shape) != 4 or heads % k.shape[1] or k.shape[0] != batch \
                or k.shape[3] != dim or q.dtype != k.dtype or k.dtype != v.dtype or k.device != device \
                or v.device != device:
            raise ValueError(f"{fn}: q (B, H, Lq, D) and k, v (B, Hkv, Lkv, D) of one dtype and device with Hkv "
                             f"dividing H, got {q.dtype} {tuple(q.shape)}, {k.dtype} {tuple(k.shape)}, {v.dtype} "
                             f"{tuple(v.shape)}")
        from ._grouped_attention_triton import var_attention_triton

        return var_attention_triton(q, k, v, key_groups, redistribute_after, image_eps, p, summ, rho, scale, causal,
                                    mask, out)
    return var_attention_torch(q, k, v, key_groups, redistribute_after, image_eps, p, summ, rho, scale, causal, mask,
                               out)


def var_attention_backend(device: torch.device | str) -> Callable[..., torch.Tensor]:
    """The function :func:`var_attention` hands its work to on ``device``, after its checks.

    It takes the arguments of :func:`var_attention` in the same order, all positional, with ``scale`` a float (not
    None), and does not check them: for a caller that ran :func:`var_attention` once with the same kinds of
    tensors and calls it again per layer per token, where the checks would cost as much host time as the launch
    (VAR: checked at each prefill, then straight to the backend at every decode step).
    """
    if resolve_backend(device, "var_attention") == "triton":
        from ._grouped_attention_triton import var_attention_triton

        return var_attention_triton
    return var_attention_torch


def var_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_groups: torch.Tensor,
                        redistribute_after: torch.Tensor, image_eps: torch.Tensor, p: float, summ: float, rho: float,
                        scale: float, causal: bool = True, mask: torch.Tensor | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch backend of :func:`var_attention` (same arguments, ``scale`` a float): the four groups' outputs and
    masses from :func:`key_group_attention_torch`, edited by :func:`var_combine`; ``(B, Lq, H, D)``."""
    ids = key_groups
    if ids.shape[1] < k.shape[2]:
        ids = torch.nn.functional.pad(ids, (0, k.shape[2] - ids.shape[1]), value=VAR_OTHER)
    _validate(q, k, v, ids, 4, mask)
    outputs, masses = key_group_attention_torch(q, k, v, ids, 4, scale, causal, mask)
    positions = torch.arange(k.shape[2] - q.shape[2], k.shape[2], device=q.device)
    edited = var_combine(outputs, masses, positions, redistribute_after, image_eps, p, summ, rho)
    edited = edited.to(q.dtype).transpose(1, 2)
    if out is None:
        return edited.contiguous()
    out.copy_(edited)
    return out


def var_combine(outputs: torch.Tensor, masses: torch.Tensor, query_positions: torch.Tensor,
                redistribute_after: torch.Tensor, image_eps: torch.Tensor, p: float, summ: float,
                rho: float) -> torch.Tensor:
    """VAR's edit (the rule of :func:`var_attention`) applied to per-group outputs ``(B, H, Lq, 4, D)`` and
    masses ``(B, H, Lq, 4)`` float32 from :func:`key_group_attention` with VAR's groups; ``query_positions``
    ``(Lq,)`` are the queries' key positions. Returns the edited ``(B, H, Lq, D)`` float32."""
    m_image, m_vsink, m_tsink = masses[..., VAR_IMAGE], masses[..., VAR_VISUAL_SINK], masses[..., VAR_TEXT_SINK]
    on_image = m_image + m_vsink
    share = m_vsink / (on_image + image_eps[:, None, None])
    later = query_positions[None, None, :] > redistribute_after[:, None, None]
    selected = (share <= rho) & (on_image >= summ) & later
    gain = (1.0 - p) * (m_vsink + m_tsink) / m_image.clamp_min(torch.finfo(torch.float32).tiny)
    image_weight = torch.where(selected, gain, 0.0)[..., None]
    sink_weight = torch.where(selected, p - 1.0, 0.0)[..., None]
    sinks = outputs[..., VAR_VISUAL_SINK, :] + outputs[..., VAR_TEXT_SINK, :]
    return outputs.sum(-2) + image_weight * outputs[..., VAR_IMAGE, :] + sink_weight * sinks
