"""Agent-PVT: PVT (v1) with agent attention (Han et al., ECCV 2024).

timm has PVT v2 but no PVT v1, so the v1 host is written here, minimally and in timm's layout (stages of
patch embedding + absolute position embedding + blocks, NCHW between stages); it reuses timm's ``PatchEmbed``,
``Mlp``, ``DropPath`` and, for ``B`` blocks, PVT v2's spatial-reduction ``Attention`` (same parameters as v1's).
As in the official Agent-PVT there is no final norm: the head averages the last stage's tokens.

Official code: https://github.com/LeapLabTHU/Agent-Attention (``agent_transformer/models/agent_pvt.py``,
``cfgs/agent_pvt_{t,s,m,b}.yaml``: ``attn_type AAAA``, agents ``9-16-49-49``, agent blocks without spatial
reduction). Official checkpoints (under ``"model"``) use ``patch_embed{i}``, ``pos_embed{i}`` and ``block{i}.{j}``
names; :func:`checkpoint_filter_fn` maps them to ``stages.{i-1}.*``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, PatchEmbed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._features import feature_take_indices
from timm.models.pvt_v2 import Attention as SpatialReductionAttention
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._agent_attention import SpatialReductionAgentAttention
from ._registry import register_model

__all__ = ["AgentPvtBlock", "AgentPvtStage", "AgentPyramidVisionTransformer", "checkpoint_filter_fn"]


class AgentPvtBlock(nn.Module):
    """Pre-norm transformer block on a (B, H*W, C) token grid: agent (``"A"``) or PVT spatial-reduction (``"B"``)
    attention, then an MLP."""

    def __init__(self, dim: int, num_heads: int, grid_size: tuple[int, int], attn_type: str = "A",
                 agent_num: int = 49, sr_ratio: int = 1, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        if attn_type == "A":
            self.attn = SpatialReductionAgentAttention(dim, num_heads, agent_num, grid_size, sr_ratio=sr_ratio,
                                                       qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        elif attn_type == "B":
            self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio=sr_ratio, qkv_bias=qkv_bias,
                                                  attn_drop=attn_drop, proj_drop=proj_drop)
        else:
            raise ValueError(f"attn_type {attn_type!r} unknown: use 'A' (agent) or 'B' (PVT attention)")
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int]) -> torch.Tensor:
        """(B, H*W, C) on the (H, W) = ``feat_size`` grid -> (B, H*W, C)."""
        x = x + self.drop_path1(self.attn(self.norm1(x), feat_size))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class AgentPvtStage(nn.Module):
    """Patch embedding (strided conv + LayerNorm), learned position embedding, blocks. NCHW in, NCHW out."""

    def __init__(self, img_size: int | tuple[int, int], patch_size: int, in_chans: int, dim: int, depth: int,
                 num_heads: int, attn_type: str, agent_num: int, sr_ratio: int, mlp_ratio: float, qkv_bias: bool,
                 pos_drop: float, proj_drop: float, attn_drop: float, drop_path: Sequence[float],
                 norm_layer: type[nn.Module]) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=dim,
                                      norm_layer=nn.LayerNorm)
        self.grid_size = tuple(self.patch_embed.grid_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], dim))
        self.pos_drop = nn.Dropout(pos_drop)
        self.blocks = nn.ModuleList([
            AgentPvtBlock(dim, num_heads, self.grid_size, attn_type=attn_type, agent_num=agent_num,
                          sr_ratio=sr_ratio, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop,
                          attn_drop=attn_drop, drop_path=drop_path[j], norm_layer=norm_layer)
            for j in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H_in, W_in) -> (B, dim, H, W) with (H, W) = ``grid_size``."""
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, self.grid_size, use_reentrant=False)
            else:
                x = block(x, self.grid_size)
        return x.transpose(1, 2).reshape(x.shape[0], -1, *self.grid_size)


class AgentPyramidVisionTransformer(nn.Module):
    """PVT v1 with agent attention.

    Args:
        img_size: input size; fixed (agent biases and position embeddings are sized for it).
        patch_size: first stage's patch size (later stages use 2).
        in_chans, num_classes: input channels, classes (0: no head).
        global_pool: ``"avg"`` (mean of the last stage's tokens) or ``""``.
        embed_dims, num_heads, mlp_ratios, depths: per stage.
        attn_type: one letter per stage, ``A`` (agent) or ``B`` (PVT attention with ``sr_ratios``).
        sr_ratios: spatial reduction of ``B`` stages; ``agent_sr_ratios``: of ``A`` stages (official: 1).
        agent_num: agent tokens per stage (perfect squares).
        qkv_bias: bias in the q/kv projections.
        drop_rate: head dropout; pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate: as in timm.
        norm_layer: the blocks' norm (default: the official LayerNorm, eps 1e-6); patch embeddings use
            LayerNorm (eps 1e-5).
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg",
                 embed_dims: Sequence[int] = (64, 128, 320, 512), num_heads: Sequence[int] = (1, 2, 5, 8),
                 mlp_ratios: Sequence[float] = (8, 8, 4, 4), depths: Sequence[int] = (3, 4, 6, 3),
                 attn_type: str = "AAAA", sr_ratios: Sequence[int] = (8, 4, 2, 1),
                 agent_sr_ratios: Sequence[int] = (1, 1, 1, 1), agent_num: Sequence[int] = (9, 16, 49, 49),
                 qkv_bias: bool = True, drop_rate: float = 0.0, pos_drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer: type[nn.Module] | None = None) -> None:
        super().__init__()
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        num_stages = len(depths)
        for name, value in dict(embed_dims=embed_dims, num_heads=num_heads, mlp_ratios=mlp_ratios,
                                sr_ratios=sr_ratios, agent_sr_ratios=agent_sr_ratios, agent_num=agent_num,
                                attn_type=attn_type).items():
            if len(value) != num_stages:
                raise ValueError(f"{name} has {len(value)} entries, depths has {num_stages} stages; give one each")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool {global_pool!r} unsupported: use 'avg' or ''")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.feature_info = []

        img_size = to_2tuple(img_size)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # stochastic depth rule
        stages, in_chans_i, reduction = [], in_chans, 1
        for i in range(num_stages):
            stage_patch = patch_size if i == 0 else 2
            stages.append(AgentPvtStage(
                img_size=(img_size[0] // reduction, img_size[1] // reduction), patch_size=stage_patch,
                in_chans=in_chans_i, dim=embed_dims[i], depth=depths[i], num_heads=num_heads[i],
                attn_type=attn_type[i], agent_num=int(agent_num[i]),
                sr_ratio=int(agent_sr_ratios[i]) if attn_type[i] == "A" else int(sr_ratios[i]),
                mlp_ratio=mlp_ratios[i], qkv_bias=qkv_bias, pos_drop=pos_drop_rate, proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                norm_layer=norm_layer))
            in_chans_i, reduction = embed_dims[i], reduction * stage_patch
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)

        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        for stage in self.stages:
            trunc_normal_(stage.pos_embed, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # the official init: truncated-normal linears with zero bias, unit LayerNorms (convs keep PyTorch's init)
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay (none, as in the official training)."""
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay (timm's convention)."""
        return dict(stem=r"^stages\.0\.(?:patch_embed|pos_embed)", blocks=r"^stages\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (less memory, more compute)."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        """The classifier layer."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a new one for ``num_classes`` (0: none); optionally change the pooling."""
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool {global_pool!r} unsupported: use 'avg' or ''")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (B, C_i, H_i, W_i), timm's ``forward_intermediates`` contract (there is no norm)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt {output_fmt!r} unsupported: stage outputs are NCHW")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last one in ``indices`` (and the head); returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> last stage (B, C, H/32, W/32)."""
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Mean over the last stage's tokens, dropout, classifier."""
        if self.global_pool == "avg":
            x = x.mean(dim=(-2, -1))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_classes) logits."""
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor],
                         model: AgentPyramidVisionTransformer) -> dict[str, torch.Tensor]:
    """Map an official Agent-PVT checkpoint (optionally under ``"model"``) to this model's names.

    ``patch_embed{i}.*`` -> ``stages.{i-1}.patch_embed.*``, ``pos_embed{i}`` -> ``stages.{i-1}.pos_embed``,
    ``block{i}.{j}.*`` -> ``stages.{i-1}.blocks.{j}.*``; the MLP and attention names are already timm's.
    Checkpoints already in this layout pass through.
    """
    state_dict = state_dict.get("model", state_dict)
    if any(k.startswith("stages.") for k in state_dict):
        return dict(state_dict)
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"^patch_embed(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.patch_embed.", k)
        k = re.sub(r"^pos_embed(\d+)$", lambda m: f"stages.{int(m.group(1)) - 1}.pos_embed", k)
        k = re.sub(r"^block(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks.", k)
        out[k] = v
    return out


def _create_agent_pvt(variant: str, pretrained: bool = False, **kwargs: Any) -> AgentPyramidVisionTransformer:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs.get("depths", (3, 4, 6, 3))))))
    return build_model_with_cfg(
        AgentPyramidVisionTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs)


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stages.0.patch_embed.proj", "classifier": "head",
        "paper_ids": "arXiv:2312.08874", **kwargs,
    }


# Official checkpoints (TsinghuaCloud links from the official README). The link has no file name in its path, so
# download it and load with pretrained_cfg_overlay=dict(file=path).
default_cfgs = generate_default_cfgs({
    "agent_pvt_tiny.in1k": _cfg(url="https://cloud.tsinghua.edu.cn/f/13fdf0e0a7c5498c934f/?dl=1"),
    "agent_pvt_small.in1k": _cfg(url="https://cloud.tsinghua.edu.cn/f/36b8be9a8863456685a3/?dl=1"),
    "agent_pvt_medium.in1k": _cfg(url="https://cloud.tsinghua.edu.cn/f/4d00ecacf18b45f9b88c/?dl=1"),
    "agent_pvt_large.in1k": _cfg(url="https://cloud.tsinghua.edu.cn/f/040cfe0cfbbe4762ad09/?dl=1"),
})

_PVT_ARGS = dict(patch_size=4, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
                 attn_type="AAAA", agent_num=(9, 16, 49, 49), agent_sr_ratios=(1, 1, 1, 1), sr_ratios=(8, 4, 2, 1))


@register_model
def agent_pvt_tiny(pretrained: bool = False, **kwargs: Any) -> AgentPyramidVisionTransformer:
    """Agent-PVT-T @ 224 (11.6M params), depths 2-2-2-2, agent attention in every block."""
    return _create_agent_pvt("agent_pvt_tiny", pretrained, **{**_PVT_ARGS, "depths": (2, 2, 2, 2), **kwargs})


@register_model
def agent_pvt_small(pretrained: bool = False, **kwargs: Any) -> AgentPyramidVisionTransformer:
    """Agent-PVT-S @ 224 (20.6M params), depths 3-4-6-3, agent attention in every block."""
    return _create_agent_pvt("agent_pvt_small", pretrained, **{**_PVT_ARGS, "depths": (3, 4, 6, 3), **kwargs})


@register_model
def agent_pvt_medium(pretrained: bool = False, **kwargs: Any) -> AgentPyramidVisionTransformer:
    """Agent-PVT-M @ 224 (35.9M params), depths 3-4-18-3, agent attention in every block."""
    return _create_agent_pvt("agent_pvt_medium", pretrained, **{**_PVT_ARGS, "depths": (3, 4, 18, 3), **kwargs})


@register_model
def agent_pvt_large(pretrained: bool = False, **kwargs: Any) -> AgentPyramidVisionTransformer:
    """Agent-PVT-L @ 224 (48.7M params), depths 3-8-27-3, agent attention in every block."""
    return _create_agent_pvt("agent_pvt_large", pretrained, **{**_PVT_ARGS, "depths": (3, 8, 27, 3), **kwargs})
