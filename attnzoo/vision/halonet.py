"""HaloNet on :func:`attnzoo.kernels.halo_attention`: timm's HaloNets fused, and the paper's H0-H7 family.

- :class:`FusedHaloAttn` is timm's ``HaloAttn`` (a subclass: same constructor, parameters, state-dict keys
  and init) whose forward runs the blocked local attention on ``attnzoo.kernels.halo_attention`` (fused
  Triton kernel on CUDA, timm's own formulation on the CPU; :func:`attnzoo.kernels.set_backend`).
- :func:`use_fused_attention` swaps it into any timm model in place (``halonet26t``, ``sehalonet33ts``,
  ``halonet50ts``, ``eca_halonext26ts``, ``halonet_h1``, ...); timm's weights load unchanged before or after.
- ``halonet_h0``, ``halonet_h2`` ... ``halonet_h7``: the HaloNet family of Vaswani et al. (2021, "Scaling
  Local Self-Attention for Parameter Efficient Visual Backbones", Table 4), built with timm's
  ByobNet machinery and fused by default. H1 is timm's own ``halonet_h1`` (identical config, 8.1M
  parameters); fuse it with :func:`use_fused_attention`.

The family's hyper-parameters (paper): query block ``b``, halo ``h``, value width multiplier ``rv``,
block output multiplier ``rb``, stage-3 depth ``l3``, width ``df`` of a final 1x1 conv (none for H0-H2).
Every block is a bottleneck whose middle layer is halo attention: 1x1 conv to ``w`` channels, attention
with queries/keys of width ``w`` and values of width ``rv * w``, 1x1 conv to ``rb * w`` channels, where
``w`` = 64, 128, 256, 512 in the four stages of depths 3, 3, ``l3``, 3; ResNet stem (7x7 conv, max-pool).
This reading of the table reproduces its parameter counts (5.5, 8.1, 9.4, 11.8, 19.1, 30.7, 43.4, 67.4M)
to within 0.06M (pinned in tests/vision/test_halonet.py).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.layers.halo_attn import HaloAttn
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg, SelfAttnBlock
from torch import nn

from ..kernels import halo_attention
from ._registry import register_model

__all__ = ["FusedHaloAttn", "HaloNet", "use_fused_attention"]


class FusedHaloAttn(HaloAttn):
    """timm's ``HaloAttn`` computed by :func:`attnzoo.kernels.halo_attention`.

    Same arguments, parameters (``q``, ``kv``, ``pos_embed.height_rel``, ``pos_embed.width_rel``) and
    semantics as timm's module; input (B, C, H, W) with H, W multiples of ``block_size``, output
    (B, dim_out, H / stride, W / stride), in the input dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nh, dqk, dv = self.num_heads, self.dim_head_qk, self.dim_head_v
        # channels are head-major in timm: q = [head][d_qk], kv = [head][k (d_qk) | v (d_v)]
        q = self.q(x).unflatten(1, (nh, dqk)).permute(0, 3, 4, 1, 2)  # (B, H/s, W/s, nh, dqk)
        kv = self.kv(x).unflatten(1, (nh, dqk + dv))
        k = kv[:, :, :dqk].permute(0, 3, 4, 1, 2)  # (B, H, W, nh, dqk)
        v = kv[:, :, dqk:].permute(0, 3, 4, 1, 2)  # (B, H, W, nh, dv)
        out = halo_attention(q, k, v, self.block_size, self.halo_size, self.pos_embed.height_rel,
                             self.pos_embed.width_rel, scale=self.scale, block_stride=self.block_stride,
                             scale_pos_embed=self.scale_pos_embed)
        return self.pool(out.flatten(3).permute(0, 3, 1, 2))

    @classmethod
    def from_timm(cls, attn: HaloAttn) -> FusedHaloAttn:
        """A FusedHaloAttn that shares ``attn``'s parameters (no copy; same state-dict keys)."""
        fused = cls.__new__(cls)
        fused.__dict__.update(attn.__dict__)
        for name in ("_parameters", "_buffers", "_modules"):
            setattr(fused, name, type(getattr(attn, name))(getattr(attn, name)))
        return fused


def use_fused_attention(model: nn.Module) -> nn.Module:
    """Replace every timm ``HaloAttn`` in ``model`` by a :class:`FusedHaloAttn` sharing its parameters.

    Works on any timm model (HaloNets, or a model with ``HaloAttn`` layers anywhere); the state dict, the
    parameter objects and the outputs stay the same. Sets ``model.attnzoo_kernels`` to
    ``("halo_attention",)`` when something was swapped. Returns ``model`` (modified in place).
    """
    swapped = False
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, HaloAttn) and not isinstance(child, FusedHaloAttn):
                setattr(parent, name, FusedHaloAttn.from_timm(child))
                swapped = True
    if swapped and "halo_attention" not in getattr(model, "attnzoo_kernels", ()):
        model.attnzoo_kernels = (*getattr(model, "attnzoo_kernels", ()), "halo_attention")
    return model


class HaloNet(ByobNet):
    """timm's ByobNet, for the HaloNet family on ``attnzoo.kernels.halo_attention``."""

    attnzoo_kernels = ("halo_attention",)


class HaloValueBlock(SelfAttnBlock):
    """timm's ``SelfAttnBlock`` with values ``value_ratio`` times wider than queries/keys (the paper's
    ``rv``): 1x1 conv to ``mid`` channels, halo attention mid -> value_ratio * mid (q/k width stays mid),
    norm + act, 1x1 conv to the block output."""

    def __init__(self, in_chs: int, out_chs: int, *, value_ratio: float, layers: Any, stride: int = 1,
                 bottle_ratio: float = 1.0, device: Any = None, dtype: Any = None, **kwargs: Any) -> None:
        # factory kwargs only when given: timm releases before device/dtype support reject them
        dd = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        super().__init__(in_chs, out_chs, stride=stride, bottle_ratio=bottle_ratio, layers=layers, **dd, **kwargs)
        mid = self.conv1_1x1.conv.out_channels
        wide = int(mid * value_ratio)
        # q/k width stays mid: HaloAttn sizes q/k as dim_out * qk_ratio
        self.self_attn = layers.self_attn(mid, dim_out=wide, qk_ratio=mid / wide, stride=stride, **dd)
        self.post_attn = layers.norm_act(wide, **dd)
        self.conv3_1x1 = layers.conv_norm_act(wide, out_chs, 1, apply_act=False, **dd)


# name: (block b, halo h, rv, rb, l3, df, paper image size); Vaswani et al. 2021, Table 4
HALONET_FAMILY: dict[str, tuple[int, int, float, float, int, int, int]] = {
    "h0": (8, 3, 1.0, 0.5, 7, 0, 256),
    "h1": (8, 3, 1.0, 1.0, 10, 0, 256),
    "h2": (8, 3, 1.0, 1.25, 11, 0, 256),
    "h3": (10, 3, 1.0, 1.5, 12, 1024, 320),
    "h4": (12, 2, 1.0, 3.0, 12, 1280, 384),
    "h5": (14, 2, 2.5, 2.0, 23, 1536, 448),
    "h6": (8, 4, 3.0, 2.75, 24, 1536, 512),
    "h7": (10, 3, 4.0, 3.5, 26, 2048, 600),
}


def _family_cfg(b: int, h: int, rv: float, rb: float, l3: int, df: int) -> ByoModelCfg:
    block_type: Any = "self_attn" if rv == 1.0 else partial(HaloValueBlock, value_ratio=rv)
    stages = ((3, 64, 1), (3, 128, 2), (l3, 256, 2), (3, 512, 2))
    return ByoModelCfg(
        # block output rb * w with a bottleneck of w: timm's bottle_ratio is relative to the output
        blocks=tuple(ByoBlockCfg(type=block_type, d=d, c=int(w * rb), s=s, gs=0, br=1 / rb) for d, w, s in stages),
        stem_chs=64,
        stem_type="7x7",
        stem_pool="maxpool",
        num_features=df,
        self_attn_layer=FusedHaloAttn,
        self_attn_kwargs=dict(block_size=b, halo_size=h),
    )


def _cfg(size: int, **kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, size, size), "pool_size": (size // 32, size // 32),
        "min_input_size": (3, size, size), "crop_pct": 0.95, "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "first_conv": "stem.conv",
        "classifier": "head.fc", "paper_ids": "arXiv:2103.12731", **kwargs,
    }


# H7's paper size 600 is not a multiple of its block size 10 at stride 8 (75): 640 runs it.
default_cfgs = generate_default_cfgs({
    f"halonet_{k}": _cfg(640 if k == "h7" else v[6]) for k, v in HALONET_FAMILY.items() if k != "h1"
})


def _create_halonet(name: str, pretrained: bool = False, **kwargs: Any) -> HaloNet:
    b, h, rv, rb, l3, df, _ = HALONET_FAMILY[name]
    return build_model_with_cfg(HaloNet, f"halonet_{name}", pretrained, model_cfg=_family_cfg(b, h, rv, rb, l3, df),
                                feature_cfg=dict(flatten_sequential=True), **kwargs)


@register_model
def halonet_h0(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """HaloNet-H0 (paper: 5.5M params, 256x256): b=8, h=3, rb=0.5, l3=7."""
    return _create_halonet("h0", pretrained, **kwargs)


@register_model
def halonet_h2(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """HaloNet-H2 (paper: 9.4M params, 256x256): b=8, h=3, rb=1.25, l3=11."""
    return _create_halonet("h2", pretrained, **kwargs)


@register_model
def halonet_h3(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """HaloNet-H3 (paper: 11.8M params, 320x320): b=10, h=3, rb=1.5, l3=12, df=1024."""
    return _create_halonet("h3", pretrained, **kwargs)


@register_model
def halonet_h4(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """HaloNet-H4 (paper: 19.1M params, 384x384): b=12, h=2, rb=3, l3=12, df=1280."""
    return _create_halonet("h4", pretrained, **kwargs)


@register_model
def halonet_h5(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """HaloNet-H5 (paper: 30.7M params, 448x448): b=14, h=2, rv=2.5, rb=2, l3=23, df=1536."""
    return _create_halonet("h5", pretrained, **kwargs)


@register_model
def halonet_h6(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """HaloNet-H6 (paper: 43.4M params, 512x512): b=8, h=4, rv=3, rb=2.75, l3=24, df=1536."""
    return _create_halonet("h6", pretrained, **kwargs)


@register_model
def halonet_h7(pretrained: bool = False, **kwargs: Any) -> HaloNet:
    """HaloNet-H7 (paper: 67.4M params, 600x600; default input here 640): b=10, h=3, rv=4, rb=3.5, l3=26,
    df=2048."""
    return _create_halonet("h7", pretrained, **kwargs)
