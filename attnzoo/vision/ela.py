"""ELA: Efficient Local Attention (Xu & Wan, 2024, arXiv:2403.01123) in timm's ResNet and MobileNetV2.

The module is the paper's (Sec. 3, Fig. 3 pseudo-code), not timm's ``EfficientLocalAttn`` (which uses two
separate convolutions, one GroupNorm per axis and a SiLU):

- strip pooling: ``z_h = mean_W(x)`` of shape (B, C, H) and ``z_w = mean_H(x)`` of shape (B, C, W);
- ONE 1-D convolution ``F`` (no bias, "same" padding) shared by both axes, then ONE GroupNorm ``GN``
  shared by both axes, then a sigmoid: ``y_h = sigmoid(GN(F(z_h)))``, ``y_w = sigmoid(GN(F(z_w)))``;
- ``out = x * y_h[..., :, None] * y_w[..., None, :]``.

Its three hyper-parameters give the paper's four versions (Sec. 3.3):

======  ===========  ======================  ================
version kernel size  conv groups             GroupNorm groups
======  ===========  ======================  ================
ELA-T   5            channels (depthwise)    32
ELA-B   7            channels (depthwise)    16
ELA-S   5            channels // 8           16
ELA-L   7            channels // 8           16
======  ===========  ======================  ================

No official code or weights were released, so the models below have no checkpoint URL.

On CUDA the module runs on :func:`attnzoo.kernels.ela_attention` (Triton: one pass over the map for both
strip means, one kernel for both strips' conv + GroupNorm + sigmoid, one pass for both gates); the ResNet hosts
use :class:`ELABasicBlock` / :class:`ELABottleneck`, timm's blocks with the same modules, whose tail computes
``relu(ELA(x) + shortcut)`` in that one gating pass.

Hosts are timm's own classes, built through timm's own builders, with ELA passed through timm's hooks, at
the positions Coordinate Attention takes in these networks (ELA revises CA and is evaluated in its place):

- ResNet (``block_args=dict(attn_layer=...)``): ELA on the residual branch after the block's last
  conv + BN and before the shortcut addition (BasicBlock: after ``bn2``; Bottleneck: after ``bn3``).
- MobileNetV2 (EfficientNet builder, ``se_layer=...``): ELA in every block (the first, depthwise-separable,
  one included) after the 3x3 depthwise conv + BN + ReLU6 and before the linear 1x1 projection, i.e. on
  the expanded channels.

ELA version per host: ResNet-18/34 use ELA-B, ResNet-50/101 and MobileNetV2 use ELA-S, following the
paper's guidance (Sec. 3.3: T/B for shallow or light networks, B/S for deeper ones; its MobileNetV2
gain is reported with ELA-S, and ELA-T's 32 GroupNorm groups do not divide MobileNetV2's 144 expanded
channels). ``ela_version=`` overrides the version per model.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs
from timm.models._efficientnet_builder import decode_arch_def, resolve_act_layer, resolve_bn_args, round_channels
from timm.models.efficientnet import EfficientNet, _create_effnet
from timm.models.resnet import BasicBlock, Bottleneck, ResNet, _create_resnet
from torch import nn

from ..kernels.strip_gate import ela_attention
from ._registry import register_model

__all__ = ["ELABasicBlock", "ELABottleneck", "ELA_VERSIONS", "EfficientLocalAttention", "ela_param_count"]

# version -> (kernel_size, channels per conv group (1 = depthwise), GroupNorm groups); paper Sec. 3.3.
ELA_VERSIONS: dict[str, tuple[int, int, int]] = {
    "T": (5, 1, 32),
    "B": (7, 1, 16),
    "S": (5, 8, 16),
    "L": (7, 8, 16),
}


def _resolve_version(version: str) -> tuple[int, int, int]:
    key = version.upper().removeprefix("ELA-")
    if key not in ELA_VERSIONS:
        raise ValueError(f"unknown ELA version {version!r}; choose one of T, B, S, L (or 'ELA-T', ...)")
    return ELA_VERSIONS[key]


def ela_param_count(channels: int, version: str = "B") -> int:
    """Number of parameters of one ELA module: 1-D conv weight ``C * (C / groups) * k`` + GroupNorm ``2C``."""
    kernel_size, chs_per_group, _ = _resolve_version(version)
    return channels * chs_per_group * kernel_size + 2 * channels


class EfficientLocalAttention(nn.Module):
    """The paper's ELA module (one shared 1-D conv + one shared GroupNorm + sigmoid over both axes).

    Args:
        channels: C, the input channels (output has the same shape as the input).
        version: "T", "B", "S" or "L" (the paper's ELA-T/B/S/L), fixing kernel size, conv groups and
            GroupNorm groups; see ``ELA_VERSIONS``.
        device, dtype: factory kwargs for the parameters (timm passes them to attention layers).

    Input and output: (B, C, H, W), any float dtype; the gates are computed in the input dtype.

    Raises:
        ValueError: if ``channels`` does not divide by the version's conv group size or GroupNorm groups.
    """

    def __init__(self, channels: int, version: str = "B", device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        kernel_size, chs_per_group, norm_groups = _resolve_version(version)
        name = f"ELA-{version.upper().removeprefix('ELA-')}"
        if channels % chs_per_group:
            raise ValueError(
                f"{name} needs channels divisible by {chs_per_group} (its 1-D conv uses channels // "
                f"{chs_per_group} groups), got {channels}; pick a depthwise version (ELA-T/ELA-B) or change channels")
        if channels % norm_groups:
            raise ValueError(
                f"{name} needs channels divisible by its {norm_groups} GroupNorm groups, got {channels}; "
                f"pick another version (ELA-T uses 32 groups, ELA-B/S/L use 16) or change channels")
        self.version = name
        self.conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2,
                              groups=channels // chs_per_group, bias=False, device=device, dtype=dtype)
        self.gn = nn.GroupNorm(norm_groups, channels, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W), in x's dtype and memory layout.

        On CUDA (kernel backend "triton") the whole module is :func:`attnzoo.kernels.ela_attention`'s three fused
        Triton kernels (strip means, both strips' conv + GroupNorm + sigmoid, gating); elsewhere plain PyTorch.
        """
        return ela_attention(x, self.conv.weight, self.gn.weight, self.gn.bias, self.gn.num_groups, self.gn.eps)

    def forward_residual(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        """``relu(ELA(x) + shortcut)``: a ResNet block's tail, fused with ELA on the triton backend.

        x, shortcut: (B, C, H, W); returns (B, C, H, W) in x's dtype. On the torch backend exactly timm's tail
        (``x = ela(x); x += shortcut; relu``).
        """
        return ela_attention(x, self.conv.weight, self.gn.weight, self.gn.bias, self.gn.num_groups, self.gn.eps,
                             shortcut=shortcut, act="relu")


# ELA fused into the tail of timm's ResNet blocks. timm's blocks end with `x = se(x); x = drop_path(x);
# x += shortcut; x = act(x)`; these subclasses run the same branch and, when ELA sits in `se`, the act is a
# ReLU and drop_path is inactive, compute `relu(ELA(x) + shortcut)` in one call (one fused kernel on CUDA).
# Same modules, same attribute names: state dicts are timm's, and the outputs equal timm's blocks'.


def _residual_tail(block: BasicBlock | Bottleneck, x: torch.Tensor, shortcut: torch.Tensor,
                   act: nn.Module) -> torch.Tensor:
    if block.downsample is not None:
        shortcut = block.downsample(shortcut)
    drop_path_active = block.drop_path is not None and block.training
    if isinstance(block.se, EfficientLocalAttention) and type(act) is nn.ReLU and not drop_path_active:
        return block.se.forward_residual(x, shortcut)
    if block.se is not None:
        x = block.se(x)
    if block.drop_path is not None:
        x = block.drop_path(x)
    x += shortcut
    return act(x)


class ELABasicBlock(BasicBlock):
    """timm's ``BasicBlock`` whose tail runs ELA, the shortcut add and the ReLU fused (same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.bn2(self.conv2(x))
        return _residual_tail(self, x, shortcut, self.act2)


class ELABottleneck(Bottleneck):
    """timm's ``Bottleneck`` whose tail runs ELA, the shortcut add and the ReLU fused (same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self.bn3(self.conv3(x))
        return _residual_tail(self, x, shortcut, self.act3)


def _ela_as_se_layer(channels: int, act_layer: Any = None, version: str = "S", device: Any = None,
                     dtype: Any = None) -> EfficientLocalAttention:
    # timm's EfficientNet blocks call se_layer(mid_chs, act_layer=..., device=..., dtype=...); ELA has
    # no activation besides its sigmoid gate, so act_layer is dropped here. No rd_ratio argument on
    # purpose: timm's builder then passes none (ELA does not reduce channels).
    return EfficientLocalAttention(channels, version=version, device=device, dtype=dtype)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "paper_ids": "arXiv:2403.01123", "paper_name": "ELA: Efficient Local Attention for Deep CNNs",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "resnet18_ela": _cfg(first_conv="conv1", classifier="fc"),
    "resnet34_ela": _cfg(first_conv="conv1", classifier="fc"),
    "resnet50_ela": _cfg(first_conv="conv1", classifier="fc"),
    "resnet101_ela": _cfg(first_conv="conv1", classifier="fc"),
    "mobilenetv2_100_ela": _cfg(first_conv="conv_stem", classifier="classifier", interpolation="bicubic"),
})


def _create_resnet_ela(variant: str, pretrained: bool, block: type[nn.Module], layers: tuple[int, ...],
                       version: str, **kwargs: Any) -> ResNet:
    version = kwargs.pop("ela_version", version)
    block_args = dict(kwargs.pop("block_args", None) or {})
    block_args["attn_layer"] = partial(EfficientLocalAttention, version=version)
    return _create_resnet(variant, pretrained, block=block, layers=layers, block_args=block_args, **kwargs)


# timm's MobileNetV2 arch (timm.models.efficientnet._gen_mobilenet_v2) with an attention slot ("_se0.25":
# any non-zero ratio switches timm's se_layer on; ELA ignores the ratio) in every block.
_MOBILENETV2_ELA_ARCH = [
    ["ds_r1_k3_s1_c16_se0.25"],
    ["ir_r2_k3_s2_e6_c24_se0.25"],
    ["ir_r3_k3_s2_e6_c32_se0.25"],
    ["ir_r4_k3_s2_e6_c64_se0.25"],
    ["ir_r3_k3_s1_e6_c96_se0.25"],
    ["ir_r3_k3_s2_e6_c160_se0.25"],
    ["ir_r1_k3_s1_e6_c320_se0.25"],
]


def _create_mobilenetv2_ela(variant: str, pretrained: bool, version: str, **kwargs: Any) -> EfficientNet:
    version = kwargs.pop("ela_version", version)
    model_kwargs = dict(
        block_args=decode_arch_def(_MOBILENETV2_ELA_ARCH),
        num_features=1280,
        stem_size=32,
        round_chs_fn=partial(round_channels, multiplier=1.0),
        norm_layer=kwargs.pop("norm_layer", None) or partial(nn.BatchNorm2d, **resolve_bn_args(kwargs)),
        act_layer=resolve_act_layer(kwargs, "relu6"),
        se_layer=partial(_ela_as_se_layer, version=version),
        **kwargs,
    )
    return _create_effnet(variant, pretrained, **model_kwargs)


@register_model
def resnet18_ela(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18 (timm's) with ELA-B after each BasicBlock's second conv + BN."""
    return _create_resnet_ela("resnet18_ela", pretrained, ELABasicBlock, (2, 2, 2, 2), "B", **kwargs)


@register_model
def resnet34_ela(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-34 (timm's) with ELA-B after each BasicBlock's second conv + BN."""
    return _create_resnet_ela("resnet34_ela", pretrained, ELABasicBlock, (3, 4, 6, 3), "B", **kwargs)


@register_model
def resnet50_ela(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-50 (timm's) with ELA-S after each Bottleneck's third conv + BN."""
    return _create_resnet_ela("resnet50_ela", pretrained, ELABottleneck, (3, 4, 6, 3), "S", **kwargs)


@register_model
def resnet101_ela(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-101 (timm's) with ELA-S after each Bottleneck's third conv + BN."""
    return _create_resnet_ela("resnet101_ela", pretrained, ELABottleneck, (3, 4, 23, 3), "S", **kwargs)


@register_model
def mobilenetv2_100_ela(pretrained: bool = False, **kwargs: Any) -> EfficientNet:
    """MobileNetV2 1.0 (timm's EfficientNet builder) with ELA-S after each block's depthwise conv."""
    return _create_mobilenetv2_ela("mobilenetv2_100_ela", pretrained, "S", **kwargs)

