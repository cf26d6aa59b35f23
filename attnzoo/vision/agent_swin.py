"""Agent-Swin: Swin Transformer with agent attention (Han et al., ECCV 2024).

timm's ``SwinTransformer`` is the host. Each stage's blocks are typed by the official ``attn_type`` string:

* ``A``: agent attention over the whole stage grid (the official window of 56 covers every stage grid at 224,
  so these blocks are global and never shifted);
* ``B``: timm's Swin block, 7x7 windows, shifted on odd blocks (run on SDPA);
* ``M<n>`` (``AAMB2``: stage 3 is ``M`` with n = 2): the first ``n`` blocks ``A``, the rest ``B``.

Official code: https://github.com/LeapLabTHU/Agent-Attention (``agent_transformer/models/agent_swin.py``,
``cfgs/agent_swin_{t,s,b}.yaml``). Checkpoints keep the original Swin layout under ``"model"``; timm's Swin
``checkpoint_filter_fn`` maps it (downsample moved to the next stage, ``head`` -> ``head.fc``, buffers dropped)
and the agent parameters pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, get_norm_layer, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer import checkpoint_filter_fn as _swin_checkpoint_filter_fn
from torch import nn

from ._agent_attention import AgentAttention
from ._registry import register_model

__all__ = ["AgentSwinTransformer", "AgentSwinTransformerBlock", "block_types", "checkpoint_filter_fn"]


def block_types(attn_type: str, depths: Sequence[int]) -> list[str]:
    """Expand the official ``attn_type`` string into one ``"A"`` / ``"B"`` per block, stage by stage.

    ``attn_type`` has one letter per stage (``A`` agent, ``B`` Swin window attention, ``M`` mixed); a mixed stage
    takes the integer after the stage letters as its number of leading agent blocks (``"AAMB2"``).

    Returns:
        A list of ``len(depths)`` strings, each ``depths[i]`` characters long.
    """
    num_stages = len(depths)
    stage_letters, suffix = attn_type[:num_stages], attn_type[num_stages:]
    if len(stage_letters) != num_stages or any(c not in "ABM" for c in stage_letters):
        raise ValueError(f"attn_type {attn_type!r} needs one of A/B/M per stage for {num_stages} stages")
    if "M" in stage_letters and not suffix.isdigit():
        raise ValueError(f"attn_type {attn_type!r} has a mixed stage but no agent block count after the stage "
                         "letters (e.g. 'AAMB2')")
    types = []
    for letter, depth in zip(stage_letters, depths):
        if letter == "M":
            n_agent = int(suffix)
            types.append("A" * min(n_agent, depth) + "B" * max(depth - n_agent, 0))
        else:
            types.append(letter * depth)
    return types


class AgentSwinTransformerBlock(nn.Module):
    """A Swin block whose single window is the whole ``input_resolution`` grid, with agent attention in it.

    Same sub-module names as timm's / the official Swin block (``norm1``, ``attn``, ``norm2``, ``mlp``).
    Input and output: (B, H, W, C) with (H, W) = ``input_resolution``.
    """

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, agent_num: int,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, act_layer: type[nn.Module] = nn.GELU,
                 norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.dim = dim
        self.input_resolution = to_2tuple(input_resolution)
        self.norm1 = norm_layer(dim)
        self.attn = AgentAttention(dim, num_heads, agent_num, grid_size=self.input_resolution, qkv_bias=qkv_bias,
                                   attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        for m in self.mlp.modules():  # the official (and timm's Swin) init
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        if (h, w) != self.input_resolution:
            raise ValueError(f"agent Swin block built for a {self.input_resolution} grid, got {(h, w)}; build the "
                             "model with img_size=... for this input")
        x = x.reshape(b, h * w, c)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(b, h, w, c)


class AgentSwinTransformer(SwinTransformer):
    """Swin Transformer whose blocks are agent (``A``) or shifted-window (``B``) blocks per ``attn_type``.

    Args:
        agent_num: agent tokens per stage (perfect squares; official ``9-16-49-49``).
        attn_type: block types per stage, the official string (``"AAAB"``, ``"AABB"``, ``"AAMB2"``).
        depths, num_heads, mlp_ratio, qkv_bias, proj_drop_rate, attn_drop_rate, drop_path_rate, norm_layer:
            as in timm's ``SwinTransformer``; ``window_size`` (default 7) is the ``B`` blocks' window.
        **kwargs: passed to timm's ``SwinTransformer`` (``img_size``, ``embed_dim``, ``num_classes``, ...).

    The input size is fixed at ``img_size`` (agent biases are sized for each stage grid).
    """

    def __init__(self, agent_num: Sequence[int] = (9, 16, 49, 49), attn_type: str = "AAAB",
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 norm_layer: str | type[nn.Module] = nn.LayerNorm, **kwargs: Any) -> None:
        if kwargs.get("dynamic_img_size") or kwargs.get("strict_img_size") is False:
            raise ValueError("agent Swin has a fixed input size (agent biases are sized per stage grid); "
                             "build it with img_size=... instead of dynamic_img_size")
        if len(agent_num) != len(depths):
            raise ValueError(f"agent_num {tuple(agent_num)} needs one entry per stage ({len(depths)} stages)")
        super().__init__(depths=depths, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                         proj_drop_rate=proj_drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
                         norm_layer=norm_layer, **kwargs)
        norm_layer = get_norm_layer(norm_layer)
        self.agent_num = tuple(int(a) for a in agent_num)
        self.attn_type = attn_type
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # official depth decay rule
        for i, (stage, types) in enumerate(zip(self.layers, block_types(attn_type, depths))):
            for j, kind in enumerate(types):
                block = stage.blocks[j]
                if kind == "B":
                    block.attn.fused_attn = True  # biased softmax on SDPA (timm gates it as experimental)
                    continue
                stage.blocks[j] = AgentSwinTransformerBlock(
                    dim=block.dim, input_resolution=block.input_resolution, num_heads=num_heads[i],
                    agent_num=self.agent_num[i], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate, drop_path=dpr[sum(depths[:i]) + j], norm_layer=norm_layer)

    def set_input_size(self, *args: Any, **kwargs: Any) -> None:
        """Refused: agent attention is sized for the grid of each stage at the build resolution."""
        raise ValueError("agent Swin has a fixed input size; build a new model with img_size=... instead")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: AgentSwinTransformer) -> dict[str, torch.Tensor]:
    """Map an official Agent-Swin checkpoint (original Swin layout, optionally under ``"model"``) to this model.

    timm's Swin filter does the layout mapping; the agent parameters keep their names and shapes.
    """
    return _swin_checkpoint_filter_fn(state_dict, model)


def _create_agent_swin(variant: str, pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs.get("depths", (2, 2, 6, 2))))))
    return build_model_with_cfg(
        AgentSwinTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs)


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head.fc",
        "paper_ids": "arXiv:2312.08874", **kwargs,
    }


# Official checkpoints (TsinghuaCloud links from the official README). The link has no file name in its path, so
# download it and load with pretrained_cfg_overlay=dict(file=path).
default_cfgs = generate_default_cfgs({
    "agent_swin_tiny.in1k": _cfg(url="https://cloud.tsinghua.edu.cn/f/a2ddc1190c224f768a41/?dl=1"),
    "agent_swin_small.in1k": _cfg(url="https://cloud.tsinghua.edu.cn/f/f607172c9fea4d6e99bb/?dl=1"),
    "agent_swin_base.in1k": _cfg(url="https://cloud.tsinghua.edu.cn/f/4fcd2d0114bb490483c3/?dl=1"),
})


@register_model
def agent_swin_tiny(pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    """Agent-Swin-T @ 224 (29M params): agent blocks in stages 1-3 (``AAAB``), agents 9-16-49-49."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                      agent_num=(9, 16, 49, 49), attn_type="AAAB")
    return _create_agent_swin("agent_swin_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_small(pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    """Agent-Swin-S @ 224 (50M params): agent blocks in stages 1-2 (``AABB``), agents 9-16-49-49."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                      agent_num=(9, 16, 49, 49), attn_type="AABB")
    return _create_agent_swin("agent_swin_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_base(pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    """Agent-Swin-B @ 224 (88M params): agent blocks in stages 1-2 and the first 2 of stage 3 (``AAMB2``)."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                      agent_num=(9, 16, 49, 49), attn_type="AAMB2")
    return _create_agent_swin("agent_swin_base", pretrained=pretrained, **dict(model_args, **kwargs))
