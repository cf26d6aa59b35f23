"""FlexAttention backend for neighborhood attention: a block mask built from NATTEN's semantics.

Each axis contributes a per-query interval of key positions inside the query's dilation sub-grid (from
:func:`attnzoo.kernels._na_torch.axis_neighbors`); the mask is the product of the axis tests, the extra
tokens (``additional_keys``) are appended after the N spatial keys and visible to every query, and NAT's
``rpb`` enters as a ``score_mod``. On CUDA ``flex_attention`` runs compiled (fused Triton); on the CPU it
runs eagerly (unfused, for tests).
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention.flex_attention import create_block_mask

from .._logging import get_logger, log_once
from ._flex import flex_attention_fn
from ._na_torch import axis_neighbors

logger = get_logger("attnzoo.kernels")


def _axis_intervals(length: int, kernel_size: int, stride: int, dilation: int, causal: bool,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query on one axis: (first, last) key position inside its dilation sub-grid, int32 (length,)."""
    keys, valid, _ = axis_neighbors(length, kernel_size, stride, dilation, causal, device)
    sub = keys // dilation
    big = torch.iinfo(torch.int64).max
    first = torch.where(valid, sub, big).amin(dim=1)
    last = torch.where(valid, sub, -1).amax(dim=1)
    return first.to(torch.int32), last.to(torch.int32)


def _coords(flat: torch.Tensor, spatial: tuple[int, ...]) -> list[torch.Tensor]:
    coords = []
    for size in reversed(spatial):
        coords.append(flat % size)
        flat = flat // size
    return coords[::-1]


_MASK_CACHE: dict[tuple, object] = {}


def _block_mask(spatial, kernel_size, stride, dilation, is_causal, n_extra: int, device: torch.device):
    key = (spatial, kernel_size, stride, dilation, is_causal, n_extra, str(device))
    if key in _MASK_CACHE:
        return _MASK_CACHE[key]
    n = math.prod(spatial)
    intervals = [_axis_intervals(*args, device) for args in zip(spatial, kernel_size, stride, dilation, is_causal)]

    def mask_mod(b, h, q_idx, kv_idx):
        qc = _coords(q_idx, spatial)
        kc = _coords(torch.clamp(kv_idx, max=n - 1), spatial)
        keep = kv_idx >= n  # extra tokens: seen by every query
        inside = kv_idx < n
        for a, (first, last) in enumerate(intervals):
            d = dilation[a]
            sub = kc[a] // d
            inside = inside & (kc[a] % d == qc[a] % d) & (sub >= first[qc[a]]) & (sub <= last[qc[a]])
        return keep | inside

    # On CUDA the mask is built by a compiled kernel (never an N x N tensor in memory).
    mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n + n_extra, device=device,
                             _compile=device.type == "cuda")
    if len(_MASK_CACHE) > 64:
        _MASK_CACHE.clear()
    _MASK_CACHE[key] = mask
    return mask


def na_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: tuple[int, ...],
            stride: tuple[int, ...], dilation: tuple[int, ...], is_causal: tuple[bool, ...], scale: float,
            rpb: torch.Tensor | None, additional_keys: torch.Tensor | None,
            additional_values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighborhood attention through ``flex_attention``; shapes as :func:`attnzoo.kernels.na.na2d`.

    Returns (output in q's dtype, logsumexp float32 (batch, *spatial, heads)); differentiable (rpb too).
    """
    batch, *spatial, heads, head_dim = q.shape
    spatial = tuple(spatial)
    n = math.prod(spatial)
    n_extra = 0 if additional_keys is None else additional_keys.shape[1]
    qh = q.reshape(batch, n, heads, head_dim).transpose(1, 2)
    kh = k.reshape(batch, n, k.shape[-2], head_dim).transpose(1, 2)
    vh = v.reshape(batch, n, v.shape[-2], v.shape[-1]).transpose(1, 2)
    if additional_keys is not None:
        kh = torch.cat([kh, additional_keys.transpose(1, 2)], dim=2)
        vh = torch.cat([vh, additional_values.transpose(1, 2)], dim=2)
    block_mask = _block_mask(spatial, kernel_size, stride, dilation, is_causal, n_extra, q.device)

    score_mod = None
    if rpb is not None:
        bias = rpb.to(torch.float32 if q.dtype != torch.float64 else torch.float64)
        spans = [2 * ks - 1 for ks in kernel_size]
        flat_bias = bias.reshape(heads, -1)

        def score_mod(score, b, h, q_idx, kv_idx):
            qc = _coords(q_idx, spatial)
            kc = _coords(torch.clamp(kv_idx, max=n - 1), spatial)
            index = torch.zeros_like(q_idx)
            for a in range(len(spatial)):
                rel = kc[a] // dilation[a] - qc[a] // dilation[a] + kernel_size[a] - 1
                index = index * spans[a] + torch.clamp(rel, 0, spans[a] - 1)
            return torch.where(kv_idx < n, score + flat_bias[h, index], score)

    if q.device.type != "cuda":
        log_once(logger, "na flex backend on the CPU runs flex_attention eagerly (unfused); for tests only")
    out, lse = flex_attention_fn(q.device)(qh, kh, vh, score_mod=score_mod, block_mask=block_mask, scale=scale,
                  enable_gqa=heads != k.shape[-2], return_lse=True)
    out = out.transpose(1, 2).reshape(batch, *spatial, heads, v.shape[-1])
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = lse.transpose(1, 2).reshape(batch, *spatial, heads).to(lse_dtype)
    return out, lse
