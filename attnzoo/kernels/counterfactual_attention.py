"""Counterfactual attention: the output of an edited softmax attention, without the attention matrix.

CausalMM's counterfactual decoder attention (official code The-Martyr/CausalMM, README "LLM Counterfactual
Attention") replaces the post-softmax weights ``w`` of every row (query) by an edit of them and multiplies the
edit with the values. For three of its edits the output has a closed form in quantities one online-softmax pass
gathers -- the plain output ``O = sum_j w_j v_j``, the largest weight ``w_max = exp(s_max - logsumexp(s))``, the
sum of the kept values ``S = sum_{kept j} v_j`` and the number of kept keys ``n`` (``s``: scaled scores, sums
over the keys the row keeps):

    reverse            w'_j = w_max - w_j                 O' = w_max S - O
    reverse_normalize  w'_j / sum_j w'_j                  O' = (w_max S - O) / (w_max n - 1)
    uniform            w'_j = 1 / real_keys               O' = S / real_keys

``reverse_normalize`` gives 0 where its normaliser ``w_max n - 1`` is 0 (a query with a single key, or a flat
row: then every ``w'_j`` is 0 and the official code divides 0 by 0). A query with no kept key gets 0. The
fourth edit, ``random``, depends on the RNG stream and is not in this op.

Backends (see :func:`attnzoo.kernels.set_backend`): a fused Triton forward on CUDA (one launch, the weights
never stored), a PyTorch path chunked over queries on the CPU ("flex" falls back to it). Forward only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._backend import resolve_backend

__all__ = ["COUNTERFACTUAL_KINDS", "counterfactual_attention", "counterfactual_attention_backend"]

COUNTERFACTUAL_KINDS = ("reverse", "reverse_normalize", "uniform")

# The PyTorch backend materialises at most this many scores per query chunk (256 MiB in float32).
_TORCH_CHUNK_ELEMENTS = 1 << 26


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, mask: torch.Tensor | None,
           real_keys: torch.Tensor | None, out: torch.Tensor | None) -> None:
    fn = "counterfactual_attention"
    if kind not in COUNTERFACTUAL_KINDS:
        raise ValueError(f"{fn}: kind {kind!r} is not one of {COUNTERFACTUAL_KINDS}")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] \
            or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{fn}: q must be (B, H, Lq, D) and k, v (B, Hkv, Lkv, D) with Hkv dividing H, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"{fn}: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{fn}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    batch, heads, q_len, dim = q.shape
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] != batch
                             or mask.shape[1] not in (1, heads) or tuple(mask.shape[2:]) != (q_len, k.shape[2])):
        raise ValueError(f"{fn}: mask must be bool of shape (batch, 1 or heads, q_length, kv_length) = "
                         f"({batch}, 1|{heads}, {q_len}, {k.shape[2]}), got {mask.dtype} {tuple(mask.shape)}")
    if real_keys is not None and (real_keys.shape != (batch,) or real_keys.device != q.device):
        raise ValueError(f"{fn}: real_keys must be a ({batch},) tensor on {q.device}, got "
                         f"{tuple(real_keys.shape)} on {real_keys.device}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
                            or out.stride(-1) != 1):
        raise ValueError(f"{fn}: out must be a {q.dtype} tensor of q's shape {tuple(q.shape)} on {q.device} with "
                         f"unit stride on head_dim, got {out.dtype} {tuple(out.shape)} strides {out.stride()}")


def counterfactual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str,
                             mask: torch.Tensor | None = None, causal: bool = True, scale: float | None = None,
                             real_keys: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The output of softmax attention whose weights are replaced by CausalMM's counterfactual ``kind``.

    Args:
        q: ``(B, H, Lq, D)`` queries (float32, float16 or bfloat16; float64 on the torch backend).
        k, v: ``(B, Hkv, Lkv, D)`` keys and values, same dtype; ``Hkv`` divides ``H`` (GQA: query head ``h``
            reads kv head ``h // (H // Hkv)``), not repeated.
        kind: ``"reverse"``, ``"reverse_normalize"`` or ``"uniform"`` (see the module docstring).
        mask: optional bool keep-mask ``(B, 1 or H, Lq, Lkv)``, True = the query attends to the key (causal and
            padding); replaces ``causal``. The edited weights are 0 off the mask.
        causal: without ``mask``, keys after the query are dropped (lower-right aligned: query ``i`` sits at key
            position ``Lkv - Lq + i``, as with a KV cache).
        scale: softmax scale (default ``D ** -0.5``).
        real_keys: ``uniform`` only: ``(B,)`` number of the sample's real (non-padding) keys, each kept key's
            weight is ``1 / real_keys[b]`` (default ``Lkv``: the official ``1 / attention.size(-1)``).
        out: optional output ``(B, H, Lq, D)`` of q's dtype, any strides with unit stride on ``D`` (e.g. a slice
            of a larger batch's output), written in place and returned.

    Returns:
        ``(B, H, Lq, D)`` in q's dtype: ``sum_j w'_j v_j`` for every query.
    """
    _check(q, k, v, kind, mask, real_keys, out)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if kind == "uniform":
        real_keys = (torch.full((q.shape[0],), k.shape[2], dtype=torch.float32, device=q.device)
                     if real_keys is None else real_keys.float())
    if out is None:
        out = torch.empty_like(q)
    if resolve_backend(q.device, "counterfactual_attention") == "triton":
        from ._counterfactual_triton import counterfactual_attention_triton

        return counterfactual_attention_triton(q, k, v, kind, scale, causal, mask, real_keys, out)
    return counterfactual_attention_torch(q, k, v, kind, scale, causal, mask, real_keys, out)


def counterfactual_attention_backend(device: torch.device | str) -> Callable[..., torch.Tensor]:
    """The function :func:`counterfactual_attention` hands its work to on ``device``, after its checks.

    Its arguments: ``(q, k, v, kind, scale, causal, mask, real_keys, out)``, all positional, with ``scale`` a float,
    ``real_keys`` float32 ``(B,)`` (required for ``uniform``) and ``out`` given; nothing is checked. For a caller
    that ran :func:`counterfactual_attention` once with the same kinds of tensors and calls it again per layer per
    token, where the checks would cost about as much host time as the launch (CausalMM: checked at each prefill,
    straight to the backend at every decode step).
    """
    if resolve_backend(device, "counterfactual_attention") == "triton":
        from ._counterfactual_triton import counterfactual_attention_triton

        return counterfactual_attention_triton
    return counterfactual_attention_torch


def counterfactual_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, scale: float,
                                   causal: bool, mask: torch.Tensor | None, real_keys: torch.Tensor | None,
                                   out: torch.Tensor) -> torch.Tensor:
    """PyTorch backend of :func:`counterfactual_attention` (arguments validated, ``real_keys`` set for uniform):
    the closed forms in float32 (float64 for float64 inputs), queries in chunks so that at most
    ``_TORCH_CHUNK_ELEMENTS`` scores exist at a time."""
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    rep = heads // kv_heads
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    # GQA without copies of k/v: the query heads of one kv head are stacked along the query axis
    qg = q.to(work).view(batch, kv_heads, rep, q_len, dim)
    kt, vw = k.to(work).transpose(-1, -2), v.to(work)
    chunk = max(1, _TORCH_CHUNK_ELEMENTS // max(1, batch * heads * kv_len))
    for start in range(0, q_len, chunk):
        stop = min(q_len, start + chunk)
        size = stop - start
        if mask is not None:
            keep = mask[:, :, start:stop]
        else:
            keep = torch.ones(size, kv_len, dtype=torch.bool, device=q.device)
            if causal:
                positions = torch.arange(kv_len - q_len + start, kv_len - q_len + stop, device=q.device)
                keep = positions[:, None] >= torch.arange(kv_len, device=q.device)[None, :]
            keep = keep[None, None].expand(batch, 1, -1, -1)
        # (B, Hkv, rep * size, Lkv), rows ordered like qg's
        keep = keep.expand(-1, heads, -1, -1).reshape(batch, kv_heads, rep * size, kv_len)
        if kind == "uniform":
            edited = torch.matmul(keep.to(work), vw) / real_keys.to(work)[:, None, None, None]
        else:
            scores = torch.matmul(qg[:, :, :, start:stop].reshape(batch, kv_heads, rep * size, dim), kt) * scale
            scores = scores.masked_fill(~keep, float("-inf"))
            top = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(work).min)  # finite on rows with no key
            # p_j = exp(s_j - max): the row maximum's own term is 1, w_j = p_j / l, w_max = 1 / l; the sums of
            # (1 - p_j) are taken directly (-expm1), not as n - l, which cancels in nearly flat rows
            rest_p = (-torch.expm1(scores - top)).masked_fill(~keep, 0.0)
            diff = torch.matmul(rest_p, vw)  # l * (w_max S - O)
            if kind == "reverse":
                total = torch.exp(scores - top).sum(-1, keepdim=True)  # l
                edited = diff / torch.where(total > 0, total, 1.0)
            else:  # l * (w_max n - 1) = sum (1 - p_j)
                rest = rest_p.sum(-1, keepdim=True)
                edited = torch.where(rest > 0, diff / torch.where(rest > 0, rest, 1.0), 0.0)
        out[:, :, start:stop] = edited.view(batch, heads, size, dim).to(out.dtype)
    return out
