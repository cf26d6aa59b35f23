"""Neighborhood Attention Transformer (NAT) and Dilated Neighborhood Attention Transformer (DiNAT, DiNAT_s).

Papers:
- NAT: Hassani et al., "Neighborhood Attention Transformer", CVPR 2023, https://arxiv.org/abs/2204.07143
- DiNAT: Hassani & Shi, "Dilated Neighborhood Attention Transformer", https://arxiv.org/abs/2209.15001

Architectures, configurations and checkpoint layouts follow the official implementation,
https://github.com/SHI-Labs/Neighborhood-Attention-Transformer (``classification/nat.py``, ``dinat.py``,
``dinats.py``), re-written in timm's layout: blocks -> stages -> model. Attention runs on
:func:`attnzoo.kernels.na2d` with NAT's relative positional bias inside the kernel.

Three hierarchical families share one model class, :class:`NAT`:
- NAT: overlapping conv stem (two stride-2 3x3 convs), strided-conv downsampling, 7x7 neighborhoods.
- DiNAT: NAT with per-layer dilations (every other layer a dilated neighborhood).
- DiNAT_s: Swin's layout (4x4 patch embedding, patch merging) with NA in place of window attention and
  dilated NA in place of shifted windows.
:class:`NATIsotropic` holds the DiNAT paper's isotropic NAT-iso / DiNAT-iso models (ViT layout, ``isotropic.py``).

Layout changes from the official checkpoints (done by :func:`checkpoint_filter_fn`): each stage starts
with the downsampling that the official code runs at the end of the previous one (``levels.{i}.downsample``
-> ``stages.{i+1}.downsample``), layer scales are timm ``LayerScale`` modules (``gamma1`` -> ``ls1.gamma``),
and the classifier is a timm ``ClassifierHead`` (``head`` -> ``head.fc``).

Inputs of any size work. Where a feature map is smaller than ``kernel_size * dilation`` on an axis, the
attention input is zero-padded at the bottom/right to that size and the output cropped back, as the
NATTEN releases the official checkpoints were trained with (0.14) do.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, LayerScale, Mlp, PatchEmbed, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs
from timm.models._features import feature_take_indices
from timm.models.swin_transformer import PatchMerging

from ..kernels import na2d
from ._registry import register_model

__all__ = ["NAT", "NATBlock", "NATIsotropic", "NATStage", "NeighborhoodAttention2d", "checkpoint_filter_fn"]


class NeighborhoodAttention2d(nn.Module):
    """Multi-head 2-D neighborhood attention with NAT's relative positional bias, on channels-last maps.

    Parameters (names as in NATTEN's ``NeighborhoodAttention2D``): ``qkv`` (dim -> 3 dim), ``rpb``
    (num_heads, 2k-1, 2k-1), ``proj`` (dim -> dim). Attention dropout is not supported (the fused kernel
    never materialises the attention matrix; no official config uses it).
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 7, dilation: int = 1, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if kernel_size < 2 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")
        if dilation < 1:
            raise ValueError(f"dilation must be >= 1, got {dilation}")
        if attn_drop > 0:
            raise ValueError(f"attn_drop={attn_drop} is not supported: the fused na2d kernel has no attention "
                             "dropout; use drop_path_rate or proj_drop_rate instead")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, dim) -> (B, H, W, dim), same dtype."""
        B, H, W, C = x.shape
        # Maps smaller than the dilated window are zero-padded at the bottom/right (NATTEN 0.14 semantics,
        # which the official checkpoints were trained with); the padded tokens act as keys only.
        window = self.kernel_size * self.dilation
        pad_h, pad_w = max(0, window - H), max(0, window - W)
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        q, k, v = self.qkv(x).reshape(B, Hp, Wp, 3, self.num_heads, self.head_dim).unbind(3)
        x = na2d(q, k, v, self.kernel_size, dilation=self.dilation, rpb=self.rpb, scale=self.scale)
        x = x.reshape(B, Hp, Wp, C)
        if pad_h or pad_w:
            x = x[:, :H, :W]
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}")


class NATBlock(nn.Module):
    """Pre-norm transformer block: x + NA(norm(x)), then x + MLP(norm(x)), optional layer scale; NHWC."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 7, dilation: int = 1, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, layer_scale: float | None = None,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: type[nn.Module] = nn.GELU, norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = NeighborhoodAttention2d(dim, num_heads, kernel_size=kernel_size, dilation=dilation,
                                            qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                                            proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, dim) -> (B, H, W, dim)."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class ConvTokenizer(nn.Module):
    """NAT's stem: two 3x3 stride-2 convolutions (no activation between), then a norm; NCHW -> NHWC, /4."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 64, norm_layer: type[nn.Module] | None = nn.LayerNorm):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
        )
        self.norm = norm_layer(embed_dim) if norm_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, ceil(H/4), ceil(W/4), embed_dim)."""
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsample(nn.Module):
    """NAT's downsampler: 3x3 stride-2 convolution without bias, then a norm; NHWC in and out, /2."""

    def __init__(self, dim: int, out_dim: int, norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = norm_layer(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, dim) -> (B, ceil(H/2), ceil(W/2), out_dim)."""
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class NATStage(nn.Module):
    """Optional downsampling (conv for NAT/DiNAT, patch merging for DiNAT_s), then ``depth`` NAT blocks."""

    def __init__(self, dim: int, out_dim: int, depth: int, num_heads: int, downsample: str | None = None,
                 kernel_size: int = 7, dilations: Sequence[int] | None = None, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, layer_scale: float | None = None,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float | Sequence[float] = 0.0,
                 norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        if dilations is not None and len(dilations) != depth:
            raise ValueError(f"got {len(dilations)} dilations for a stage of depth {depth}; give one per block")
        self.grad_checkpointing = False
        if downsample is None:
            self.downsample = nn.Identity()
        elif downsample == "conv":
            self.downsample = ConvDownsample(dim, out_dim, norm_layer=norm_layer)
        elif downsample == "merge":
            self.downsample = PatchMerging(dim, out_dim, norm_layer=norm_layer)
        else:
            raise ValueError(f"unknown downsample {downsample!r}; use 'conv', 'merge' or None")
        drop_paths = list(drop_path) if isinstance(drop_path, Sequence) else [drop_path] * depth
        self.blocks = nn.Sequential(*[
            NATBlock(out_dim, num_heads, kernel_size=kernel_size, dilation=1 if dilations is None else dilations[i],
                     mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, layer_scale=layer_scale,
                     proj_drop=proj_drop, attn_drop=attn_drop, drop_path=drop_paths[i], norm_layer=norm_layer)
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, dim) -> (B, H', W', out_dim), H' = ceil(H/2) when downsampling."""
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class _NATBase(nn.Module):
    """What NAT and NATIsotropic share: init, weight-decay exclusions, the classifier head API."""

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Official init: truncated-normal linears, zero biases, unit norms; convs keep PyTorch's default.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of the relative positional bias tables (trained without weight decay, as officially)."""
        return {n for n, _ in self.named_parameters() if n.endswith(".rpb")}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final linear layer."""
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` (0: features only, identity)."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        ref = next(self.patch_embed.parameters())
        self.head.reset(num_classes, pool_type=global_pool)
        self.head.to(device=ref.device, dtype=ref.dtype)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool (and classify) the output of :meth:`forward_features`."""
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)


class NAT(_NATBase):
    """NAT / DiNAT / DiNAT_s classifier and backbone (timm model API).

    ``forward``: images (B, in_chans, H, W), any H, W -> logits (B, num_classes).
    ``forward_features``: -> normed channels-last map (B, H/32, W/32, num_features).
    ``forward_intermediates``: per-stage maps (B, C_i, H/2^(i+2), W/2^(i+2)), NCHW.
    """

    attnzoo_kernels = ("na2d",)

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, global_pool: str = "avg", embed_dim: int = 64,
                 depths: Sequence[int] = (3, 4, 6, 5), num_heads: Sequence[int] = (2, 4, 8, 16),
                 kernel_size: int = 7, dilations: Sequence[Sequence[int]] | None = None, mlp_ratio: float = 3.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, layer_scale: float | None = None,
                 stem_type: str = "conv", patch_size: int = 4, drop_rate: float = 0.0, pos_drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.2,
                 norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        """
        Args:
            embed_dim: channels of stage 0; stage i has ``embed_dim * 2**i``.
            depths, num_heads: blocks and heads per stage.
            kernel_size: neighborhood size (odd), all layers.
            dilations: per stage, one dilation per block (DiNAT); None: all 1 (NAT).
            layer_scale: LayerScale init value (NAT-S/B, DiNAT-B), or None for no layer scale.
            stem_type: "conv" (NAT/DiNAT: conv tokenizer, conv downsampling) or "patch" (DiNAT_s:
                ``patch_size`` patch embedding, Swin patch merging).
            drop_rate: dropout before the classifier; pos_drop_rate: after the stem; proj_drop_rate: after
                the attention projection and in the MLP (the official ``drop_rate``); drop_path_rate:
                stochastic depth, linearly increasing over all blocks.
        """
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length")
        if dilations is not None and len(dilations) != len(depths):
            raise ValueError(f"dilations has {len(dilations)} stages, depths has {len(depths)}")
        if stem_type not in ("conv", "patch"):
            raise ValueError(f"unknown stem_type {stem_type!r}; use 'conv' (NAT/DiNAT) or 'patch' (DiNAT_s)")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.output_fmt = "NHWC"
        num_stages = len(depths)
        dims = [int(embed_dim * 2 ** i) for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]

        if stem_type == "conv":
            self.patch_embed = ConvTokenizer(in_chans, embed_dim, norm_layer=norm_layer)
            stem_reduction = 4
        else:
            self.patch_embed = PatchEmbed(img_size=None, patch_size=patch_size, in_chans=in_chans,
                                          embed_dim=embed_dim, norm_layer=norm_layer, flatten=False,
                                          output_fmt="NHWC", strict_img_size=False, dynamic_img_pad=True)
            stem_reduction = patch_size
        self.pos_drop = nn.Dropout(pos_drop_rate)

        dpr = [r.tolist() for r in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        stages = []
        self.feature_info = []
        in_dim, reduction = embed_dim, stem_reduction
        for i in range(num_stages):
            if i > 0:
                reduction *= 2
            stages.append(NATStage(
                in_dim, dims[i], depths[i], num_heads[i],
                downsample=None if i == 0 else ("conv" if stem_type == "conv" else "merge"),
                kernel_size=kernel_size, dilations=None if dilations is None else dilations[i],
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, layer_scale=layer_scale,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer,
            ))
            self.feature_info.append(dict(num_chs=dims[i], reduction=reduction, module=f"stages.{i}"))
            in_dim = dims[i]
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt=self.output_fmt)
        self.apply(self._init_weights)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise LR decay (timm's convention)."""
        return dict(
            stem=r"^patch_embed",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage's blocks in backward instead of storing their activations."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
        stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward that also returns stage outputs.

        Args:
            x: images (B, in_chans, H, W).
            indices: last n stages if int, all if None, these stages if a list.
            norm: apply the final norm to the last stage's intermediate.
            stop_early: stop after the last requested stage.
            output_fmt: "NCHW" or "NHWC" for the intermediates.
            intermediates_only: return only the intermediates.

        Returns:
            The intermediates (list of (B, C_i, H_i, W_i) maps), or (final normed NHWC features,
            intermediates).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        num_stages = len(self.stages)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]

        x = self.pos_drop(self.patch_embed(x))
        last = 0
        for last, stage in enumerate(stages):
            x = stage(x)
            if last in take_indices:
                x_inter = self.norm(x) if norm and last == num_stages - 1 else x
                intermediates.append(x_inter.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else x_inter)
        if intermediates_only:
            return intermediates
        if last == num_stages - 1:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages (and norm/head) not needed to produce the stage outputs ``indices``."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, in_chans, H, W) -> normed final map (B, H/32, W/32, num_features), channels last."""
        x = self.pos_drop(self.patch_embed(x))
        x = self.stages(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, in_chans, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))


class NATIsotropic(_NATBase):
    """Isotropic NAT / DiNAT (the DiNAT paper's ViT-style ablation models): a 16x16 patch embedding, then
    ``depth`` NAT blocks at one resolution (DiNAT: every other block dilated), final norm, pooled head.

    ``forward``: images (B, in_chans, H, W), any H, W (the official code fixes 224) -> logits.
    ``forward_features``: -> normed channels-last map (B, H/16, W/16, embed_dim).
    """

    attnzoo_kernels = ("na2d",)

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, global_pool: str = "avg", patch_size: int = 16,
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 12, kernel_size: int = 7,
                 dilation: int = 1, mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None,
                 drop_rate: float = 0.0, pos_drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        """
        Args:
            dilation: dilation of the odd-numbered blocks (1: NAT-iso, 2: DiNAT-iso); even blocks use 1.
            Others as in :class:`NAT`.
        """
        super().__init__()
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.output_fmt = "NHWC"
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size=None, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                                      norm_layer=norm_layer, flatten=False, output_fmt="NHWC",
                                      strict_img_size=False, dynamic_img_pad=True)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*[
            NATBlock(embed_dim, num_heads, kernel_size=kernel_size, dilation=1 if i % 2 == 0 else dilation,
                     mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, proj_drop=proj_drop_rate,
                     attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer)
            for i in range(depth)
        ])
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)]
        self.norm = norm_layer(embed_dim)
        self.head = ClassifierHead(embed_dim, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt=self.output_fmt)
        self.apply(self._init_weights)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise LR decay (timm's convention)."""
        return dict(stem=r"^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the blocks in backward instead of storing their activations."""
        self.grad_checkpointing = enable

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
        stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward that also returns block outputs, each (B, C, H/16, W/16).

        Arguments as in :meth:`NAT.forward_intermediates`, with ``indices`` counting blocks and ``norm``
        applying the final norm to every intermediate.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        x = self.pos_drop(self.patch_embed(x))
        for i, block in enumerate(blocks):
            x = block(x)
            if i in take_indices:
                x_inter = self.norm(x) if norm else x
                intermediates.append(x_inter.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else x_inter)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks (and norm/head) not needed to produce the block outputs ``indices``."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, in_chans, H, W) -> normed map (B, ceil(H/16), ceil(W/16), embed_dim), channels last."""
        x = self.pos_drop(self.patch_embed(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, in_chans, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))


def _resize_rpb(rpb: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a (heads, 2k-1, 2k-1) bias table, as the official 7x7 -> 11x11 checkpoints were made."""
    out = F.interpolate(rpb[None].float(), size=size, mode="bicubic", align_corners=False)[0]
    return out.to(rpb.dtype)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor],
                         model: NAT | NATIsotropic | None = None) -> dict[str, torch.Tensor]:
    """Convert an official NAT / DiNAT / DiNAT_s / isotropic state dict to this module's layout.

    Accepts the raw state dict the official checkpoints hold (also wrapped under "state_dict"/"model",
    or with DataParallel's "module." prefix). Renames: ``levels.{i}.downsample`` (DiNAT_s:
    ``layers.{i}.downsample``) -> ``stages.{i+1}.downsample``, ``levels.{i}.blocks`` -> ``stages.{i}.blocks``,
    ``gamma1/2`` -> ``ls1/2.gamma``, ``head`` -> ``head.fc``; isotropic models: ``layers.{i}`` -> ``blocks.{i}``.
    Relative position bias tables whose kernel
    size differs from ``model``'s are resized bicubically (skipped when ``model`` is None). A state dict
    already in this layout is returned unchanged.
    """
    for wrapper in ("state_dict", "model"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if any(k.startswith(("stages.", "blocks.")) for k in state_dict):
        return state_dict

    target = model.state_dict() if model is not None else {}
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^(?:levels|layers)\.(\d+)\.downsample\.",
                     lambda m: f"stages.{int(m.group(1)) + 1}.downsample.", key)
        key = re.sub(r"^(?:levels|layers)\.(\d+)\.blocks\.", r"stages.\1.blocks.", key)
        key = re.sub(r"^layers\.(\d+)\.(norm1|attn|norm2|mlp)\.", r"blocks.\1.\2.", key)  # isotropic models
        key = re.sub(r"\.gamma([12])$", r".ls\1.gamma", key)
        key = re.sub(r"^head\.", "head.fc.", key)
        if key.endswith(".attn.rpb") and key in target and target[key].shape != value.shape:
            value = _resize_rpb(value, tuple(target[key].shape[-2:]))
        out[key] = value
    return out


def _create_nat(variant: str, pretrained: bool = False, **kwargs: Any) -> NAT:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs.get("depths", (3, 4, 6, 5))))))
    return build_model_with_cfg(
        NAT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _create_nat_isotropic(variant: str, pretrained: bool = False, **kwargs: Any) -> NATIsotropic:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        NATIsotropic, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj.0", "classifier": "head.fc",
        "license": "mit", "paper_ids": "arXiv:2204.07143", **kwargs,
    }


def _dinat_cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return _cfg(url, paper_ids="arXiv:2209.15001", **kwargs)


def _dinat_s_cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return _cfg(url, first_conv="patch_embed.proj", paper_ids="arXiv:2209.15001", **kwargs)


def _iso_cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return _cfg(url, pool_size=(14, 14), first_conv="patch_embed.proj", paper_ids="arXiv:2209.15001", **kwargs)


_NAT_URL = "https://shi-labs.com/projects/nat/checkpoints/CLS/"
_DINAT_URL = "https://shi-labs.com/projects/dinat/checkpoints/"
_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)
_IN22K = dict(num_classes=21841)

default_cfgs = generate_default_cfgs({
    "nat_mini.in1k": _cfg(_NAT_URL + "nat_mini.pth"),
    "nat_tiny.in1k": _cfg(_NAT_URL + "nat_tiny.pth"),
    "nat_small.in1k": _cfg(_NAT_URL + "nat_small.pth"),
    "nat_base.in1k": _cfg(_NAT_URL + "nat_base.pth"),
    "dinat_mini.in1k": _dinat_cfg(_DINAT_URL + "imagenet1k/dinat_mini_in1k_224.pth"),
    "dinat_tiny.in1k": _dinat_cfg(_DINAT_URL + "imagenet1k/dinat_tiny_in1k_224.pth"),
    "dinat_small.in1k": _dinat_cfg(_DINAT_URL + "imagenet1k/dinat_small_in1k_224.pth"),
    "dinat_base.in1k": _dinat_cfg(_DINAT_URL + "imagenet1k/dinat_base_in1k_224.pth"),
    "dinat_large.in22k_ft_in1k": _dinat_cfg(_DINAT_URL + "imagenet1k/dinat_large_in22k_in1k_224.pth"),
    "dinat_large.in22k": _dinat_cfg(_DINAT_URL + "imagenet22k/dinat_large_in22k_224.pth", **_IN22K),
    "dinat_large_384.in22k_ft_in1k": _dinat_cfg(_DINAT_URL + "imagenet1k/dinat_large_in22k_in1k_384.pth", **_384),
    "dinat_large_384_11x11.in22k_ft_in1k": _dinat_cfg(
        _DINAT_URL + "imagenet1k/dinat_large_in22k_in1k_384_11x11.pth", **_384),
    # The official 22K model with its 7x7 bias tables bicubically resized to 11x11 (pre-training of the above).
    "dinat_large_384_11x11.in22k": _dinat_cfg(
        _DINAT_URL + "imagenet22k/dinat_large_in22k_224_11x11interp.pth", **_IN22K),
    "dinat_s_tiny.in1k": _dinat_s_cfg(_DINAT_URL + "imagenet1k/dinat_s_tiny_in1k_224.pth"),
    "dinat_s_small.in1k": _dinat_s_cfg(_DINAT_URL + "imagenet1k/dinat_s_small_in1k_224.pth"),
    "dinat_s_base.in1k": _dinat_s_cfg(_DINAT_URL + "imagenet1k/dinat_s_base_in1k_224.pth"),
    "dinat_s_large.in22k_ft_in1k": _dinat_s_cfg(_DINAT_URL + "imagenet1k/dinat_s_large_in1k_224.pth"),
    "dinat_s_large.in22k": _dinat_s_cfg(_DINAT_URL + "imagenet22k/dinat_s_large_in22k_224.pth", **_IN22K),
    "dinat_s_large_384.in22k_ft_in1k": _dinat_s_cfg(_DINAT_URL + "imagenet1k/dinat_s_large_in1k_384.pth", **_384),
    "nat_isotropic_small.in1k": _iso_cfg(_DINAT_URL + "isotropic/nat_isotropic_small_in1k_224.pth"),
    "nat_isotropic_base.in1k": _iso_cfg(_DINAT_URL + "isotropic/nat_isotropic_base_in1k_224.pth"),
    "dinat_isotropic_small.in1k": _iso_cfg(_DINAT_URL + "isotropic/dinat_isotropic_small_in1k_224.pth"),
    "dinat_isotropic_base.in1k": _iso_cfg(_DINAT_URL + "isotropic/dinat_isotropic_base_in1k_224.pth"),
})

# Dilations of the official configs, per stage and block: dilated layers alternate with plain ones so
# that a dilated window spans about the whole map at the model's resolution (224: 56/28/14/7).
_DIL_MINI = ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 3, (1,) * 5)
_DIL_18 = ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 9, (1,) * 5)
_DIL_18_384 = ((1, 13, 1), (1, 6, 1, 6), (1, 3) * 9, (1,) * 5)
_DIL_S6 = ((1, 8), (1, 4), (1, 2) * 3, (1, 1))
_DIL_S18 = ((1, 8), (1, 4), (1, 2) * 9, (1, 1))
_DIL_S18_384 = ((1, 13), (1, 6), (1, 3) * 9, (1, 1))

_MINI = dict(depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), embed_dim=64, mlp_ratio=3.0, drop_path_rate=0.2)
_TINY = dict(depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), embed_dim=64, mlp_ratio=3.0, drop_path_rate=0.2)
_SMALL = dict(depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), embed_dim=96, mlp_ratio=2.0, drop_path_rate=0.3)
_BASE = dict(depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), embed_dim=128, mlp_ratio=2.0, drop_path_rate=0.5)
_LARGE = dict(depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), embed_dim=192, mlp_ratio=2.0, drop_path_rate=0.35)
_S_COMMON = dict(stem_type="patch", patch_size=4, mlp_ratio=4.0)
_S_TINY = dict(depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), embed_dim=96, drop_path_rate=0.2, **_S_COMMON)
_S_SMALL = dict(depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), embed_dim=96, drop_path_rate=0.3, **_S_COMMON)
_S_BASE = dict(depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), embed_dim=128, drop_path_rate=0.5, **_S_COMMON)
_S_LARGE = dict(depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), embed_dim=192, drop_path_rate=0.35, **_S_COMMON)


def _build(variant: str, pretrained: bool, model_args: dict[str, Any], kwargs: dict[str, Any]) -> NAT:
    return _create_nat(variant, pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def nat_mini(pretrained: bool = False, **kwargs: Any) -> NAT:
    """NAT-Mini: 19.98M params, 2.7 GFLOPs, 81.8% ImageNet-1K top-1 (official)."""
    return _build("nat_mini", pretrained, dict(_MINI, kernel_size=7), kwargs)


@register_model
def nat_tiny(pretrained: bool = False, **kwargs: Any) -> NAT:
    """NAT-Tiny: 27.90M params, 4.3 GFLOPs, 83.2% top-1."""
    return _build("nat_tiny", pretrained, dict(_TINY, kernel_size=7), kwargs)


@register_model
def nat_small(pretrained: bool = False, **kwargs: Any) -> NAT:
    """NAT-Small: 51M params, 7.8 GFLOPs, 83.7% top-1; layer scale 1e-5."""
    return _build("nat_small", pretrained, dict(_SMALL, kernel_size=7, layer_scale=1e-5), kwargs)


@register_model
def nat_base(pretrained: bool = False, **kwargs: Any) -> NAT:
    """NAT-Base: 90M params, 13.7 GFLOPs, 84.3% top-1; layer scale 1e-5."""
    return _build("nat_base", pretrained, dict(_BASE, kernel_size=7, layer_scale=1e-5), kwargs)


@register_model
def dinat_mini(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Mini: NAT-Mini with dilations 8/4/2 in every other layer of stages 1-3; 81.8% top-1."""
    return _build("dinat_mini", pretrained, dict(_MINI, kernel_size=7, dilations=_DIL_MINI), kwargs)


@register_model
def dinat_tiny(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Tiny: 28M params, 4.3 GFLOPs, 82.7% top-1."""
    return _build("dinat_tiny", pretrained, dict(_TINY, kernel_size=7, dilations=_DIL_18), kwargs)


@register_model
def dinat_small(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Small: 51M params, 7.8 GFLOPs, 83.8% top-1 (no layer scale, unlike NAT-Small)."""
    return _build("dinat_small", pretrained, dict(_SMALL, kernel_size=7, dilations=_DIL_18), kwargs)


@register_model
def dinat_base(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Base: 90M params, 13.7 GFLOPs, 84.4% top-1; layer scale 1e-5."""
    return _build("dinat_base", pretrained, dict(_BASE, kernel_size=7, dilations=_DIL_18, layer_scale=1e-5), kwargs)


@register_model
def dinat_large(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Large at 224: 200M params, 30.6 GFLOPs, 86.6% top-1 (ImageNet-22K pre-trained)."""
    return _build("dinat_large", pretrained, dict(_LARGE, kernel_size=7, dilations=_DIL_18), kwargs)


@register_model
def dinat_large_384(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Large at 384, 7x7 kernel, dilations 13/6/3: 89.7 GFLOPs, 87.4% top-1."""
    return _build("dinat_large_384", pretrained, dict(_LARGE, kernel_size=7, dilations=_DIL_18_384), kwargs)


@register_model
def dinat_large_384_11x11(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Large at 384, 11x11 kernel, dilations 8/4/2: 92.4 GFLOPs, 87.5% top-1."""
    return _build("dinat_large_384_11x11", pretrained, dict(_LARGE, kernel_size=11, dilations=_DIL_18), kwargs)


@register_model
def dinat_s_tiny(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT_s-Tiny (Swin-T layout with NA / dilated NA): 28M params, 4.5 GFLOPs, 81.8% top-1."""
    return _build("dinat_s_tiny", pretrained, dict(_S_TINY, kernel_size=7, dilations=_DIL_S6), kwargs)


@register_model
def dinat_s_small(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT_s-Small: 50M params, 8.7 GFLOPs, 83.5% top-1."""
    return _build("dinat_s_small", pretrained, dict(_S_SMALL, kernel_size=7, dilations=_DIL_S18), kwargs)


@register_model
def dinat_s_base(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT_s-Base: 88M params, 15.4 GFLOPs, 83.8% top-1."""
    return _build("dinat_s_base", pretrained, dict(_S_BASE, kernel_size=7, dilations=_DIL_S18), kwargs)


@register_model
def dinat_s_large(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT_s-Large at 224: 197M params, 34.5 GFLOPs, 86.5% top-1 (ImageNet-22K pre-trained)."""
    return _build("dinat_s_large", pretrained, dict(_S_LARGE, kernel_size=7, dilations=_DIL_S18), kwargs)


@register_model
def dinat_s_large_384(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT_s-Large at 384, dilations 13/6/3: 101.5 GFLOPs, 87.4% top-1."""
    return _build("dinat_s_large_384", pretrained, dict(_S_LARGE, kernel_size=7, dilations=_DIL_S18_384), kwargs)


_ISO_SMALL = dict(embed_dim=384, depth=12, num_heads=12, mlp_ratio=4.0, kernel_size=7, drop_path_rate=0.1)
_ISO_BASE = dict(embed_dim=768, depth=12, num_heads=24, mlp_ratio=4.0, kernel_size=7, drop_path_rate=0.4)


@register_model
def nat_isotropic_small(pretrained: bool = False, **kwargs: Any) -> NATIsotropic:
    """NAT-iso-Small (ViT-S layout, 7x7 NA): 22M params, 4.3 GFLOPs, 80.0% top-1."""
    return _create_nat_isotropic("nat_isotropic_small", pretrained, **dict(_ISO_SMALL, dilation=1) | kwargs)


@register_model
def nat_isotropic_base(pretrained: bool = False, **kwargs: Any) -> NATIsotropic:
    """NAT-iso-Base (ViT-B layout, 7x7 NA): 86M params, 16.9 GFLOPs, 81.6% top-1."""
    return _create_nat_isotropic("nat_isotropic_base", pretrained, **dict(_ISO_BASE, dilation=1) | kwargs)


@register_model
def dinat_isotropic_small(pretrained: bool = False, **kwargs: Any) -> NATIsotropic:
    """DiNAT-iso-Small: NAT-iso-Small with dilation 2 in every other block; 80.8% top-1."""
    return _create_nat_isotropic("dinat_isotropic_small", pretrained, **dict(_ISO_SMALL, dilation=2) | kwargs)


@register_model
def dinat_isotropic_base(pretrained: bool = False, **kwargs: Any) -> NATIsotropic:
    """DiNAT-iso-Base: NAT-iso-Base with dilation 2 in every other block; 82.1% top-1."""
    return _create_nat_isotropic("dinat_isotropic_base", pretrained, **dict(_ISO_BASE, dilation=2) | kwargs)
