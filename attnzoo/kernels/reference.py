"""Float64 ground truth for every kernel in :mod:`attnzoo.kernels`.

Written as plainly as possible (explicit neighbour / region / window index lists, a dense score matrix
with a mask, softmax, weighted sum), in float64, with no performance intent. Tests compare every
backend to these, forward and backward (autograd through these functions gives the reference
gradients). Never used as a runtime backend.
"""

from __future__ import annotations

import itertools
import math

import torch

__all__: list[str] = ["na_reference", "na_window_positions"]


# --- neighborhood attention (na.py) ---


def _na_reference_tuple(value, na_dim: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * na_dim


def na_window_positions(index: int, length: int, kernel_size: int, stride: int, dilation: int,
                        causal: bool) -> list[int]:
    """Key positions (on one axis) that query ``index`` attends to, with NATTEN's semantics.

    The axis splits into ``dilation`` interleaved sub-grids; the query only sees its own sub-grid, where it
    is at position ``index // dilation``. Queries are grouped ``stride`` at a time and share the window of
    a leader: the centre query of the group (non-causal) or its last query (causal). A non-causal window
    holds ``kernel_size`` consecutive sub-grid positions around the leader, shifted to stay inside the
    sub-grid at the borders. A causal window ends at the query itself and starts ``kernel_size - 1``
    positions before the leader (fewer keys near the start of the axis).
    """
    group = index % dilation
    group_length = len(range(group, length, dilation))
    position = index // dilation
    if causal:
        leader = min(position // stride * stride + stride - 1, group_length - 1)
        positions = [p for p in range(leader - kernel_size + 1, position + 1) if p >= 0]
    else:
        leader = min(position // stride * stride + stride // 2, group_length - 1)
        left = kernel_size // 2
        right = kernel_size - 1 - left
        centre = min(max(leader, left), group_length - 1 - right)
        positions = list(range(centre - left, centre + right + 1))
    return [group + dilation * p for p in positions]


def na_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size, stride=1, dilation=1,
                 is_causal=False, scale: float | None = None, rpb: torch.Tensor | None = None,
                 additional_keys: torch.Tensor | None = None, additional_values: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighborhood attention in float64, from explicit neighbour lists and a dense masked score matrix.

    q: (batch, *spatial, heads, head_dim); k, v: (batch, *spatial, kv_heads, head_dim[_v]); rpb:
    (heads, 2k-1, ...) bias at index (key - query) / dilation + k - 1 per axis; additional_keys/values:
    (batch, n_extra, kv_heads, head_dim[_v]) seen by every query. Returns (output (batch, *spatial, heads,
    head_dim_v) float64, logsumexp (batch, *spatial, heads) float64). Differentiable (autograd gives the
    reference gradients, rpb included).
    """
    na_dim = q.dim() - 3
    spatial = tuple(q.shape[1:1 + na_dim])
    kernel_size, stride, dilation, is_causal = (_na_reference_tuple(x, na_dim)
                                                for x in (kernel_size, stride, dilation, is_causal))
    batch, heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    kv_heads = k.shape[-2]
    n = math.prod(spatial)
    scale = head_dim ** -0.5 if scale is None else scale

    coords = list(itertools.product(*(range(s) for s in spatial)))
    flat = {c: i for i, c in enumerate(coords)}
    allowed = torch.zeros(n, n, dtype=torch.bool)
    bias_q, bias_k, bias_idx = [], [], []
    for qi, qc in enumerate(coords):
        per_axis = [na_window_positions(qc[a], spatial[a], kernel_size[a], stride[a], dilation[a], is_causal[a])
                    for a in range(na_dim)]
        for kc in itertools.product(*per_axis):
            ki = flat[kc]
            allowed[qi, ki] = True
            bias_q.append(qi)
            bias_k.append(ki)
            bias_idx.append(tuple((kc[a] - qc[a]) // dilation[a] + kernel_size[a] - 1 for a in range(na_dim)))

    qd = q.double().reshape(batch, n, heads, head_dim).transpose(1, 2)  # (B, H, N, D)
    group = heads // kv_heads
    kd = k.double().reshape(batch, n, kv_heads, -1).transpose(1, 2).repeat_interleave(group, dim=1)
    vd = v.double().reshape(batch, n, kv_heads, -1).transpose(1, 2).repeat_interleave(group, dim=1)
    scores = qd @ kd.transpose(-1, -2) * scale  # (B, H, N, N)
    if rpb is not None:
        bias = torch.zeros(heads, n, n, dtype=torch.float64)
        index = (slice(None),) + tuple(torch.tensor([b[a] for b in bias_idx]) for a in range(na_dim))
        bias = bias.index_put((torch.arange(heads)[:, None], torch.tensor(bias_q)[None], torch.tensor(bias_k)[None]),
                              rpb.double()[index])
        scores = scores + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    values = vd
    if additional_keys is not None:
        ak = additional_keys.double().transpose(1, 2).repeat_interleave(group, dim=1)
        av = additional_values.double().transpose(1, 2).repeat_interleave(group, dim=1)
        scores = torch.cat([scores, qd @ ak.transpose(-1, -2) * scale], dim=-1)
        values = torch.cat([vd, av], dim=-2)
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, N)
    out = torch.softmax(scores, dim=-1) @ values  # (B, H, N, Dv)
    out = out.transpose(1, 2).reshape(batch, *spatial, heads, -1)
    lse = lse.transpose(1, 2).reshape(batch, *spatial, heads)
    return out, lse


# --- routed attention and halo attention (BiFormer, HaloNet) ---


def routed_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region_index: torch.Tensor,
                               num_regions: int | tuple[int, int], scale: float | None = None) -> torch.Tensor:
    """Float64 bi-level routing attention (token-to-token stage), as a dense masked softmax.

    q, k: (batch, H, W, heads, d_qk); v: (batch, H, W, heads, d_v); region_index: (batch, nh*nw, topk).
    Query region r attends to the concatenation of the tokens of regions region_index[b, r, :]; a region
    named twice counts twice (exactly like gathering it twice), which the dense form expresses with the
    log of the multiplicity added to the logits. Returns (batch, H, W, heads, d_v) in float64.
    """
    nh, nw = (num_regions, num_regions) if isinstance(num_regions, int) else num_regions
    b, h, w, heads, _ = q.shape
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # region id of every token, row-major regions and tokens
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    token_region = ((ys // (h // nh)) * nw + xs // (w // nw)).reshape(-1)
    count = torch.zeros(b, h * w, h * w, dtype=torch.float64)
    for bi in range(b):
        for qi in range(h * w):
            for r in region_index[bi, token_region[qi]].tolist():
                count[bi, qi] += (token_region == r).double()
    qf = q.reshape(b, h * w, heads, -1).transpose(1, 2)
    kf = k.reshape(b, h * w, heads, -1).transpose(1, 2)
    vf = v.reshape(b, h * w, heads, -1).transpose(1, 2)
    logits = scale * qf @ kf.transpose(-1, -2) + count.log()[:, None]
    out = logits.softmax(-1) @ vf
    return out.transpose(1, 2).reshape(b, h, w, heads, -1)


def halo_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, halo_size: int,
                             rel_height: torch.Tensor | None = None, rel_width: torch.Tensor | None = None,
                             scale: float | None = None, block_stride: int = 1,
                             scale_pos_embed: bool = False) -> torch.Tensor:
    """Float64 halo attention with timm ``HaloAttn`` semantics, one explicit window index list per query.

    q: (batch, H // block_stride, W // block_stride, heads, d_qk); k: (batch, H, W, heads, d_qk);
    v: (batch, H, W, heads, d_v); rel_height, rel_width: (2 * win - 1, d_qk) or None, win = block_size
    + 2 * halo_size. The query at (y, x) of the (subsampled) grid lies in block (y // bs, x // bs) with
    bs = block_size // block_stride, at in-block offset (iy, ix); it attends to the win x win window whose
    top-left key is (block_y * block_size - halo_size, block_x * block_size - halo_size). Keys outside the
    map are zeros that still take part in the softmax. Logit of window key (ky, kx):
    scale * q.k + q.rel_height[ky - iy + win - 1] + q.rel_width[kx - ix + win - 1]
    (the whole sum times scale instead when scale_pos_embed). Returns (batch, Hq, Wq, heads, d_v), float64.
    """
    q, k, v = q.double(), k.double(), v.double()
    b, hq, wq, heads, dqk = q.shape
    win = block_size + 2 * halo_size
    bs = block_size // block_stride
    scale = dqk ** -0.5 if scale is None else scale
    pad = [0, 0, 0, 0, halo_size, halo_size, halo_size, halo_size]
    kp, vp = torch.nn.functional.pad(k, pad), torch.nn.functional.pad(v, pad)  # zero keys around the map
    offs = torch.arange(win)
    inblock = torch.arange(bs)
    rel_index = offs[None, :] - inblock[:, None] + win - 1  # (in-block offset, window offset) -> table row
    out = torch.zeros(b, hq, wq, heads, v.shape[-1], dtype=torch.float64)
    for by in range(hq // bs):
        for bx in range(wq // bs):
            # the block's window in padded coordinates starts at block origin - halo + halo
            kw = kp[:, by * block_size:by * block_size + win, bx * block_size:bx * block_size + win]
            vw = vp[:, by * block_size:by * block_size + win, bx * block_size:bx * block_size + win]
            qb = q[:, by * bs:(by + 1) * bs, bx * bs:(bx + 1) * bs]  # (b, bs, bs, heads, d_qk)
            logits = scale * torch.einsum("bijhd,byxhd->bijhyx", qb, kw)
            if rel_height is not None:
                pos_h = torch.einsum("bijhd,iyd->bijhy", qb, rel_height.double()[rel_index])
                pos_w = torch.einsum("bijhd,jxd->bijhx", qb, rel_width.double()[rel_index])
                pos = pos_h[..., :, None] + pos_w[..., None, :]
                logits = scale * (logits / scale + pos) if scale_pos_embed else logits + pos
            attn = logits.flatten(-2).softmax(-1).reshape(logits.shape)
            out[:, by * bs:(by + 1) * bs, bx * bs:(bx + 1) * bs] = torch.einsum("bijhyx,byxhd->bijhd", attn, vw)
    return out


__all__ += ["halo_attention_reference", "routed_attention_reference"]


# --- key-group attention (attention-level mitigation passes) ---


def key_group_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_groups: torch.Tensor,
                                  num_groups: int, scale: float | None = None, causal: bool = True,
                                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 per-key-group attention outputs and masses, from the full softmax matrix, one group at a time.

    q: (B, H, Lq, D); k, v: (B, Hkv, Lkv, D) (GQA: head h reads kv head h // (H // Hkv)); key_groups: (B, Lkv)
    ints, negative = key removed; mask: bool (B, 1|H, Lq, Lkv) keep-mask or None (then lower-right causal when
    ``causal``). P = softmax over the kept keys of each (b, h, i); returns outputs (B, H, Lq, G, D) with
    sum_{j: group j == g} P_j v_j and masses (B, H, Lq, G) with sum_{j: group j == g} P_j, float64; a row with
    no kept key is all zeros.
    """
    batch, heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    rep = heads // k.shape[1]
    scale = dim ** -0.5 if scale is None else scale
    kd = k.double().cpu().repeat_interleave(rep, dim=1)
    vd = v.double().cpu().repeat_interleave(rep, dim=1)
    logits = scale * q.double().cpu() @ kd.transpose(-1, -2)  # (B, H, Lq, Lkv)
    if mask is None:
        query_pos = torch.arange(kv_len - q_len, kv_len)[:, None]
        mask = (query_pos >= torch.arange(kv_len)[None, :]) if causal else torch.ones(q_len, kv_len, dtype=torch.bool)
        mask = mask[None, None]
    keep = mask.cpu() & (key_groups.cpu() >= 0)[:, None, None, :]
    keep = keep.expand(batch, heads, q_len, kv_len)
    probs = torch.zeros_like(logits)
    rows = keep.any(-1)
    probs[rows] = logits[rows].masked_fill(~keep[rows], float("-inf")).softmax(-1)
    outputs = torch.zeros(batch, heads, q_len, num_groups, dim, dtype=torch.float64)
    masses = torch.zeros(batch, heads, q_len, num_groups, dtype=torch.float64)
    for g in range(num_groups):
        member = (key_groups.cpu() == g)[:, None, None, :].double()  # (B, 1, 1, Lkv)
        masses[..., g] = (probs * member).sum(-1)
        outputs[..., g, :] = (probs * member) @ vd
    return outputs, masses


__all__ += ["key_group_attention_reference"]
