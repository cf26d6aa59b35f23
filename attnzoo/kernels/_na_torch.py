"""Vectorised PyTorch neighborhood attention (the CPU backend) and the neighbour tables shared by backends.

The neighbour tables encode NATTEN's semantics once, as integer tensors: for every query position on an
axis, the ``kernel_size`` key positions of its window, whether each is valid (causal windows are short
near the start of an axis), and the relative-position index into NAT's ``rpb``. The torch backend gathers
the neighbours with them; autograd differentiates through the gather.
"""

from __future__ import annotations

import math

import torch


def axis_neighbors(length: int, kernel_size: int, stride: int, dilation: int, causal: bool,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbour tables of one axis: ``(keys, valid, rel)``, each int64/bool of shape (length, kernel_size).

    ``keys[i, j]``: the j-th key position of query i (clamped to 0 where invalid); ``valid[i, j]``: whether it
    is attended (always true unless causal); ``rel[i, j]``: ``(key - query) / dilation + kernel_size - 1``,
    the index into NAT's relative positional bias.
    """
    i = torch.arange(length, device=device)
    group = i % dilation
    position = i // dilation  # the query's position inside its dilation sub-grid
    group_length = (length - group + dilation - 1) // dilation
    j = torch.arange(kernel_size, device=device)
    if causal:
        # The stride group's leader is its last query; the window ends at the query itself.
        leader = torch.minimum(position // stride * stride + stride - 1, group_length - 1)
        window = (leader - kernel_size + 1)[:, None] + j
        valid = (window >= 0) & (window <= position[:, None])
    else:
        # The leader is the group's centre query; the window is shifted to stay inside the sub-grid.
        left = kernel_size // 2
        right = kernel_size - 1 - left
        leader = torch.minimum(position // stride * stride + stride // 2, group_length - 1)
        centre = torch.minimum(leader.clamp_min(left), group_length - 1 - right)
        window = (centre - left)[:, None] + j
        valid = torch.ones_like(window, dtype=torch.bool)
    rel = window - position[:, None] + kernel_size - 1
    keys = group[:, None] + dilation * window.clamp_min(0)
    return keys, valid, rel


def neighbor_tables(spatial: tuple[int, ...], kernel_size: tuple[int, ...], stride: tuple[int, ...],
                    dilation: tuple[int, ...], is_causal: tuple[bool, ...], device: torch.device | str = "cpu",
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Flattened neighbour tables over all axes: ``(keys, valid, rel)`` of shape (N, K).

    N = prod(spatial) queries in row-major order, K = prod(kernel_size) neighbours; ``keys`` are flat key
    indices, ``valid`` is None when every neighbour is valid (no causal axis), ``rel`` is the flat index into
    ``rpb.reshape(heads, -1)``.
    """
    na_dim = len(spatial)
    keys = torch.zeros((), dtype=torch.long, device=device)
    rel = torch.zeros((), dtype=torch.long, device=device)
    valid = torch.ones((), dtype=torch.bool, device=device)
    for a in range(na_dim):
        ka, va, ra = axis_neighbors(spatial[a], kernel_size[a], stride[a], dilation[a], is_causal[a], device)
        # Broadcast shape (L0, .., L_{n-1}, k0, .., k_{n-1}): axis a's tables go to dims a and na_dim + a.
        shape = [1] * (2 * na_dim)
        shape[a], shape[na_dim + a] = spatial[a], kernel_size[a]
        keys = keys * spatial[a] + ka.view(shape)
        rel = rel * (2 * kernel_size[a] - 1) + ra.view(shape)
        valid = valid & va.view(shape)
    n, kk = math.prod(spatial), math.prod(kernel_size)
    keys = keys.expand(*spatial, *kernel_size).reshape(n, kk)
    rel = rel.expand(*spatial, *kernel_size).reshape(n, kk)
    valid_out = valid.expand(*spatial, *kernel_size).reshape(n, kk) if any(is_causal) else None
    return keys, valid_out, rel


def na_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: tuple[int, ...],
             stride: tuple[int, ...], dilation: tuple[int, ...], is_causal: tuple[bool, ...], scale: float,
             rpb: torch.Tensor | None, additional_keys: torch.Tensor | None,
             additional_values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighborhood attention by gathering each query's neighbours; differentiable by autograd.

    Shapes as in :func:`attnzoo.kernels.na.na2d` (arguments already validated and normalised to tuples).
    Computes in float32 for half inputs (float64 stays float64). Returns (output in q's dtype,
    logsumexp (batch, *spatial, heads), float32 or float64 for float64 inputs).
    """
    batch, *spatial, heads, head_dim = q.shape
    spatial = tuple(spatial)
    kv_heads, head_dim_v = k.shape[-2], v.shape[-1]
    group = heads // kv_heads
    n = math.prod(spatial)
    keys, valid, rel = neighbor_tables(spatial, kernel_size, stride, dilation, is_causal, q.device)
    kk = keys.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32

    qf = q.reshape(batch, n, kv_heads, group, head_dim).to(compute)
    k_nb = k.reshape(batch, n, kv_heads, head_dim).to(compute)[:, keys]  # (B, N, K, Hkv, D)
    v_nb = v.reshape(batch, n, kv_heads, head_dim_v).to(compute)[:, keys]
    scores = torch.einsum("bnhgd,bnkhd->bnhgk", qf, k_nb) * scale
    if rpb is not None:
        bias = rpb.to(compute).reshape(heads, -1)[:, rel]  # (H, N, K)
        scores = scores + bias.view(kv_heads, group, n, kk).permute(2, 0, 1, 3)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    if additional_keys is not None:
        extra = torch.einsum("bnhgd,bmhd->bnhgm", qf, additional_keys.to(compute)) * scale
        scores = torch.cat([scores, extra], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)  # (B, N, Hkv, G)
    probs = torch.exp(scores - lse[..., None])
    out = torch.einsum("bnhgk,bnkhd->bnhgd", probs[..., :kk], v_nb)
    if additional_values is not None:
        out = out + torch.einsum("bnhgm,bmhd->bnhgd", probs[..., kk:], additional_values.to(compute))
    out = out.reshape(batch, *spatial, heads, head_dim_v).to(q.dtype)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out, lse.reshape(batch, *spatial, heads).to(lse_dtype)
