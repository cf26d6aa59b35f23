"""Agent attention (Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024).

The math shared by the DeiT, PVT and Swin hosts (``agent_deit.py``, ``agent_pvt.py``, ``agent_swin.py``):

* ``a`` agent tokens are average-pooled from the queries of the spatial tokens (PyTorch's adaptive-pool bins on the
  ``H x W`` grid, ``sqrt(a) x sqrt(a)`` output);
* agent aggregation: ``V_A = softmax(A K^T / sqrt(d) + B_1) V`` (agents attend to all keys);
* agent broadcast: ``O = softmax(Q A^T / sqrt(d) + B_2) V_A`` (every query attends to the agents);
* a 3x3 depthwise conv on ``V`` (laid out on its grid) is added to the spatial tokens' output, then the output
  projection.

Position biases, as in the official code: ``B_1`` = bilinear resize of ``an_bias`` (heads, a, 7, 7) to the key grid
plus ``ah_bias`` (per key row) + ``aw_bias`` (per key column); ``B_2`` = bilinear resize of ``na_bias`` to the query
grid plus ``ha_bias`` + ``wa_bias``. With a class token (DeiT), ``ac_bias`` is ``B_1``'s column for the class key and
``ca_bias`` is ``B_2``'s row for the class query. Both softmaxes run on ``F.scaled_dot_product_attention`` with the
biases as float ``attn_mask``.

Parameter names and shapes equal the official ones, so official checkpoints load unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple, trunc_normal_
from torch import nn

__all__ = ["AgentAttention", "AgentAttentionBase", "SpatialReductionAgentAttention"]

# The official an_bias / na_bias are stored on a fixed 7x7 grid and resized to the token grid on each forward.
_BIAS_GRID = 7


class AgentAttentionBase(nn.Module):
    """Agent biases, pooling, the two agent softmaxes, the depthwise conv on V and the output projection.

    Subclasses own the q/k/v projections and call :meth:`attend`.

    Args:
        dim: channels ``C`` of the tokens (input and output).
        num_heads: attention heads; ``dim`` must divide by it.
        agent_num: number of agent tokens ``a``; a perfect square (the agents are pooled on a square grid).
        grid_size: the query token grid ``(H, W)`` (the spatial tokens, without the class token).
        kv_grid_size: the key/value token grid; defaults to ``grid_size`` (PVT's spatial reduction shrinks it).
        num_prefix_tokens: 0 (PVT, Swin) or 1 (DeiT's class token, with the ``ac``/``ca`` biases).
        attn_drop: dropout probability on both attention maps (training only).
        proj_drop: dropout probability after the output projection.
    """

    def __init__(self, dim: int, num_heads: int, agent_num: int, grid_size: int | tuple[int, int],
                 kv_grid_size: int | tuple[int, int] | None = None, num_prefix_tokens: int = 0,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} does not divide by num_heads {num_heads}; choose a divisor of dim")
        pool_size = math.isqrt(agent_num)
        if agent_num < 1 or pool_size * pool_size != agent_num:
            raise ValueError(f"agent_num {agent_num} is not a perfect square; agents are pooled on a square grid "
                             "(use 9, 16, 49, 81, ...)")
        if num_prefix_tokens not in (0, 1):
            raise ValueError(f"num_prefix_tokens {num_prefix_tokens} unsupported: agent attention has biases for at "
                             "most one class token (no register or distillation tokens)")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.agent_num = agent_num
        self.pool_size = pool_size
        self.grid_size = to_2tuple(grid_size)
        self.kv_grid_size = to_2tuple(kv_grid_size) if kv_grid_size is not None else self.grid_size
        self.num_prefix_tokens = num_prefix_tokens
        self.attn_drop = attn_drop

        (h, w), (kh, kw) = self.grid_size, self.kv_grid_size
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.an_bias = nn.Parameter(torch.zeros(num_heads, agent_num, _BIAS_GRID, _BIAS_GRID))
        self.na_bias = nn.Parameter(torch.zeros(num_heads, agent_num, _BIAS_GRID, _BIAS_GRID))
        self.ah_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, kh, 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, 1, kw))
        self.ha_bias = nn.Parameter(torch.zeros(1, num_heads, h, 1, agent_num))
        self.wa_bias = nn.Parameter(torch.zeros(1, num_heads, 1, w, agent_num))
        if num_prefix_tokens:
            self.ac_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, 1))
            self.ca_bias = nn.Parameter(torch.zeros(1, num_heads, 1, agent_num))
        else:
            self.ac_bias = self.ca_bias = None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _reset_agent_parameters(self) -> None:
        """The official init: truncated normal (std 0.02) for the biases and linear weights, zero linear biases."""
        for name, p in self.named_parameters(recurse=False):
            if name.endswith("_bias"):
                trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def position_biases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two additive attention biases.

        Returns:
            ``agent_bias`` (1, heads, a, P + Hk*Wk) for agents -> keys and ``query_bias`` (1, heads, P + H*W, a)
            for queries -> agents, where ``P`` is ``num_prefix_tokens``; dtype of the parameters.
        """
        (h, w), (kh, kw) = self.grid_size, self.kv_grid_size
        heads, a = self.num_heads, self.agent_num
        agent_bias = F.interpolate(self.an_bias, size=(kh, kw), mode="bilinear", align_corners=False)
        agent_bias = agent_bias.reshape(1, heads, a, kh * kw) + (self.ah_bias + self.aw_bias).reshape(1, heads, a, -1)
        query_bias = F.interpolate(self.na_bias, size=(h, w), mode="bilinear", align_corners=False)
        query_bias = query_bias.reshape(1, heads, a, h * w).transpose(-1, -2)
        query_bias = query_bias + (self.ha_bias + self.wa_bias).reshape(1, heads, h * w, a)
        if self.num_prefix_tokens:
            agent_bias = torch.cat([self.ac_bias, agent_bias], dim=-1)
            query_bias = torch.cat([self.ca_bias, query_bias], dim=-2)
        return agent_bias, query_bias

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Agent attention on projected tokens, then the depthwise conv on V and the output projection.

        Args:
            q: (B, P + H*W, C) queries (class token first when ``num_prefix_tokens`` is 1).
            k: (B, P + Hk*Wk, C) keys.
            v: (B, P + Hk*Wk, C) values.

        Returns:
            (B, P + H*W, C), the dtype of ``q``.
        """
        b, n, c = q.shape
        p = self.num_prefix_tokens
        (h, w), (kh, kw) = self.grid_size, self.kv_grid_size
        if n != p + h * w or k.shape[1] != p + kh * kw:
            raise ValueError(f"agent attention was built for a {h}x{w} query grid and a {kh}x{kw} key grid "
                             f"(+{p} class token), got {n} queries and {k.shape[1]} keys; build the model for this "
                             "input size (img_size=...)")
        grid_q = q[:, p:].transpose(1, 2).reshape(b, c, h, w)
        agents = F.adaptive_avg_pool2d(grid_q, self.pool_size).flatten(2).transpose(1, 2)  # (B, a, C)

        agent_bias, query_bias = self.position_biases()
        dropout_p = self.attn_drop if self.training else 0.0
        agents = self._split_heads(agents)
        # agents gather from all keys, then every query reads the agents
        agent_v = F.scaled_dot_product_attention(agents, self._split_heads(k), self._split_heads(v),
                                                 attn_mask=agent_bias.to(q.dtype), dropout_p=dropout_p)
        x = F.scaled_dot_product_attention(self._split_heads(q), agents, agent_v,
                                           attn_mask=query_bias.to(q.dtype), dropout_p=dropout_p)
        x = x.transpose(1, 2).reshape(b, n, c)

        grid_v = v[:, p:].transpose(1, 2).reshape(b, c, kh, kw)
        if (kh, kw) != (h, w):
            grid_v = F.interpolate(grid_v, size=(h, w), mode="bilinear", align_corners=False)
        local = self.dwc(grid_v).flatten(2).transpose(1, 2)
        x = torch.cat([x[:, :p], x[:, p:] + local], dim=1) if p else x + local
        return self.proj_drop(self.proj(x))


class AgentAttention(AgentAttentionBase):
    """Agent attention with one fused ``qkv`` projection (the DeiT and Swin hosts).

    ``forward(x)`` takes (B, P + H*W, C) tokens in row-major grid order and returns the same shape. It takes the
    ``mask`` / ``attn_mask`` arguments of the timm blocks it replaces only to refuse them: agent attention attends
    globally over its grid and the official models never mask it.
    """

    def __init__(self, dim: int, num_heads: int, agent_num: int, grid_size: int | tuple[int, int],
                 num_prefix_tokens: int = 0, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__(dim, num_heads, agent_num, grid_size, num_prefix_tokens=num_prefix_tokens,
                         attn_drop=attn_drop, proj_drop=proj_drop)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self._reset_agent_parameters()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """(B, P + H*W, C) -> (B, P + H*W, C)."""
        if mask is not None or attn_mask is not None or is_causal:
            raise ValueError("agent attention takes no attention mask (shifted windows or causal masks are not "
                             "part of it); use it on unshifted, whole-grid windows")
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.attend(q, k, v)


class SpatialReductionAgentAttention(AgentAttentionBase):
    """Agent attention with PVT's separate ``q`` / ``kv`` projections and optional spatial reduction of K and V.

    With ``sr_ratio > 1``, K and V come from the input reduced by a strided conv (kernel = stride = ``sr_ratio``)
    and a LayerNorm, as in PVT; V is resized back (bilinear) to the query grid before the depthwise conv.
    ``forward(x, feat_size)`` takes (B, H*W, C) and returns (B, H*W, C).
    """

    def __init__(self, dim: int, num_heads: int, agent_num: int, grid_size: int | tuple[int, int],
                 sr_ratio: int = 1, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        h, w = to_2tuple(grid_size)
        super().__init__(dim, num_heads, agent_num, (h, w), kv_grid_size=(h // sr_ratio, w // sr_ratio),
                         attn_drop=attn_drop, proj_drop=proj_drop)
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
        else:
            self.sr = self.norm = None
        self._reset_agent_parameters()

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int] | list[int]) -> torch.Tensor:
        """(B, H*W, C) tokens on the ``feat_size`` = (H, W) grid -> (B, H*W, C)."""
        if tuple(feat_size) != self.grid_size:
            raise ValueError(f"agent attention was built for a {self.grid_size} grid, got {tuple(feat_size)}; build "
                             "the model for this input size (img_size=...)")
        q = self.q(x)
        if self.sr is not None:
            b, n, c = x.shape
            x = self.sr(x.transpose(1, 2).reshape(b, c, *self.grid_size)).flatten(2).transpose(1, 2)
            x = self.norm(x)
        k, v = self.kv(x).chunk(2, dim=-1)
        return self.attend(q, k, v)
