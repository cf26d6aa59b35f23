"""Agent-DeiT: DeiT with agent attention (Han et al., ECCV 2024).

timm's ``VisionTransformer`` is the host; the first ``agent_depth`` blocks (all 12 for tiny/small, 4 for base)
get :class:`~attnzoo.vision._agent_attention.AgentAttention` over the 14x14 patch grid plus the class token
(with the ``ac``/``ca`` class-token biases); the other blocks stay timm's softmax blocks (SDPA). The number of
agents of block ``i`` is ``agent_num[stage]`` with the official block -> stage map ``{0, 1, 2, 2, 2, 3}[i // 2]``
(all 49 for tiny/small, all 81 for base).

Official code: https://github.com/LeapLabTHU/Agent-Attention (``agent_transformer/models/agent_deit.py``,
``cfgs/agent_deit_{t,s,b}.yaml``). Official checkpoints (under ``"model"``) have timm ViT names plus the agent
parameters; timm's ViT ``checkpoint_filter_fn`` reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _vit_checkpoint_filter_fn

from ._agent_attention import AgentAttention
from ._registry import register_model

__all__ = ["AgentVisionTransformer", "checkpoint_filter_fn"]

# official map from a block pair (block index // 2) to the entry of agent_num it uses
_PAIR_TO_STAGE = (0, 1, 2, 2, 2, 3)


class AgentVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` whose first ``agent_depth`` blocks use agent attention.

    Args:
        agent_num: four agent counts (perfect squares), indexed per block through the official block -> stage
            map ``(0, 1, 2, 2, 2, 3)[i // 2]``.
        agent_depth: number of leading agent blocks (None: all blocks).
        embed_dim, depth, num_heads, qkv_bias, attn_drop_rate, proj_drop_rate: as in timm's ``VisionTransformer``.
        **kwargs: passed to timm's ``VisionTransformer`` (``img_size``, ``patch_size``, ``num_classes``, ...).

    One class token and no register tokens (the agent biases cover exactly one prefix token); the input size is
    fixed at ``img_size`` (the agent biases are sized for the patch grid).
    """

    def __init__(self, agent_num: Sequence[int] = (49, 49, 49, 49), agent_depth: int | None = None,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, qkv_bias: bool = True,
                 attn_drop_rate: float = 0.0, proj_drop_rate: float = 0.0, **kwargs: Any) -> None:
        if kwargs.get("dynamic_img_size"):
            raise ValueError("agent DeiT has a fixed input size (agent biases are sized for the patch grid); "
                             "build it with img_size=... instead of dynamic_img_size")
        if not kwargs.get("class_token", True) or kwargs.get("reg_tokens", 0):
            raise ValueError("agent DeiT needs exactly one class token and no register tokens (class_token=True, "
                             "reg_tokens=0): the agent biases cover one prefix token")
        agent_depth = depth if agent_depth is None else agent_depth
        if not 0 <= agent_depth <= depth:
            raise ValueError(f"agent_depth {agent_depth} must be in [0, depth={depth}]")
        if len(agent_num) != 4:
            raise ValueError(f"agent_num {tuple(agent_num)} needs four entries (the official per-stage counts)")
        if agent_depth > 2 * len(_PAIR_TO_STAGE):
            raise ValueError(f"agent_depth {agent_depth} > 12: the official block -> agent_num map covers 12 blocks")
        super().__init__(embed_dim=embed_dim, depth=depth, num_heads=num_heads, qkv_bias=qkv_bias,
                         attn_drop_rate=attn_drop_rate, proj_drop_rate=proj_drop_rate, **kwargs)
        self.agent_num = tuple(int(a) for a in agent_num)
        self.agent_depth = agent_depth
        for i in range(agent_depth):
            self.blocks[i].attn = AgentAttention(
                embed_dim, num_heads, self.agent_num[_PAIR_TO_STAGE[i // 2]], grid_size=self.patch_embed.grid_size,
                num_prefix_tokens=1, qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=proj_drop_rate)

    def set_input_size(self, *args: Any, **kwargs: Any) -> None:
        """Refused: the agent biases are sized for the patch grid at the build resolution."""
        raise ValueError("agent DeiT has a fixed input size; build a new model with img_size=... instead")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: AgentVisionTransformer) -> dict[str, torch.Tensor]:
    """Map an official Agent-DeiT checkpoint (optionally under ``"model"``) to this model.

    The names are timm ViT's plus the agent parameters, so timm's ViT filter does the work (unwrapping,
    patch-embedding and position-embedding resampling where shapes differ).
    """
    return _vit_checkpoint_filter_fn(state_dict, model)


def _create_agent_deit(variant: str, pretrained: bool = False, **kwargs: Any) -> AgentVisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        AgentVisionTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs)


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head",
        "paper_ids": "arXiv:2312.08874", **kwargs,
    }


# Official checkpoints (TsinghuaCloud links from the official README). The link has no file name in its path, so
# download it and load with pretrained_cfg_overlay=dict(file=path).
default_cfgs = generate_default_cfgs({
    "agent_deit_tiny.in1k": _cfg(url="https://cloud.tsinghua.edu.cn/f/57e0904221824ee7b7af/?dl=1"),
    "agent_deit_small.in1k": _cfg(url="https://cloud.tsinghua.edu.cn/f/fdd43304372541db8ea7/?dl=1"),
    "agent_deit_base.in1k": _cfg(url="https://cloud.tsinghua.edu.cn/f/5115f15fdd7e4ab58fbc/?dl=1"),
})


@register_model
def agent_deit_tiny(pretrained: bool = False, **kwargs: Any) -> AgentVisionTransformer:
    """Agent-DeiT-T @ 224 (6.02M params): 12 agent blocks, 49 agents."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, agent_num=(49, 49, 49, 49))
    return _create_agent_deit("agent_deit_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_deit_small(pretrained: bool = False, **kwargs: Any) -> AgentVisionTransformer:
    """Agent-DeiT-S @ 224 (22.65M params): 12 agent blocks, 49 agents."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, agent_num=(49, 49, 49, 49))
    return _create_agent_deit("agent_deit_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_deit_base(pretrained: bool = False, **kwargs: Any) -> AgentVisionTransformer:
    """Agent-DeiT-B @ 224 (87.2M params): agent attention (81 agents) in the first 4 blocks only."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, agent_num=(81, 81, 81, 81),
                      agent_depth=4)
    return _create_agent_deit("agent_deit_base", pretrained=pretrained, **dict(model_args, **kwargs))
