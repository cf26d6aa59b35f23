"""BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., CVPR 2023), as timm models.

Paper: https://arxiv.org/abs/2303.08810 -- official code: https://github.com/rayleizhu/BiFormer (MIT).

The architecture follows the official ``models/biformer.py`` and ``ops/bra_legacy.py`` exactly, including
the details that look like quirks (they are what the released weights were trained with):

- the bi-level routing attention (BRA) scales logits by ``qk_dim ** -0.5`` (the full q/k width over all
  heads), not by the head width;
- routing uses the region means of q and k, detached (no gradient through the routing), and the routing
  softmax weights are computed by the official code but never used, so only the top-k indices matter;
- LePE is a 5x5 depthwise conv on V over the whole (padded) image in the BRA stages 1-3, added before the
  output projection; stage 4 runs plain full attention with 8 heads whatever its width, with LePE applied to
  the normed block input (not to V) and no qkv bias;
- every block starts with a 3x3 depthwise conv position embedding (``x + dwconv(x)``), LayerNorm eps is
  1e-6, the final norm is a BatchNorm2d, and ``n_win`` is the number of regions per side (7), so the
  region size is ``feature_size / 7``;
- ``auto_pad=True`` pads the normed input with zeros at the bottom/right up to a multiple of ``n_win``
  before the qkv projection (so padded tokens carry the qkv bias and take part in attention and in the
  region means, as in the official segmentation models), then crops. With ``auto_pad=False`` (the
  official classification setting) a non-divisible input raises a ValueError naming sizes that work.

Layout (timm's, as ``convnext``): ``stem`` (official ``downsample_layers.0``), ``stages.i.downsample``
(official ``downsample_layers.i``), ``stages.i.blocks.j`` (official ``stages.i.j``), ``norm``, ``head.fc``.
:func:`checkpoint_filter_fn` maps official checkpoints (weights under ``"model"``) to this layout.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs
from timm.models._features import feature_take_indices

from ..kernels import bilevel_routing_attention
from ._registry import register_model

__all__ = ["BiFormer", "BiLevelRoutingAttention", "FullAttentionLePE", "checkpoint_filter_fn"]


class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention on a channels-last map (official ``BiLevelRoutingAttention``, identity kv).

    Each of the ``n_win x n_win`` regions routes to the ``topk`` regions whose mean key best matches its
    mean query; its tokens then attend to all tokens of those regions
    (:func:`attnzoo.kernels.bilevel_routing_attention`: the routing, then :func:`~attnzoo.kernels.routed_attention`).

    Args:
        dim: channels of the input and output (q, k and v all have ``dim`` channels).
        num_heads: attention heads; ``dim`` must be divisible by it.
        n_win: regions per side; the feature map (after padding) must be divisible by it.
        topk: regions each region attends to (``<= n_win ** 2``).
        side_dwconv: kernel size of the LePE depthwise conv on V.
        auto_pad: zero-pad non-divisible maps (official segmentation setting) instead of raising.
    """

    def __init__(self, dim: int, num_heads: int, n_win: int = 7, topk: int = 4, side_dwconv: int = 5,
                 auto_pad: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if not 0 < topk <= n_win * n_win:
            raise ValueError(f"topk {topk} must be in [1, n_win**2 = {n_win * n_win}]")
        self.dim = dim
        self.num_heads = num_heads
        self.n_win = n_win
        self.topk = topk
        self.auto_pad = auto_pad
        # Official quirk: the scale uses the whole q/k width, not the per-head width.
        self.scale = dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, H, W, dim) -> (batch, H, W, dim), same dtype."""
        batch, height, width, channels = x.shape
        pad_b = (-height) % self.n_win
        pad_r = (-width) % self.n_win
        if pad_b or pad_r:
            if not self.auto_pad:
                raise ValueError(
                    f"feature map {height}x{width} is not divisible by n_win={self.n_win}; pad it to "
                    f"{height + pad_b}x{width + pad_r} or build the model with auto_pad=True")
            # Padding before the qkv projection, as the official code does: padded tokens get the qkv bias.
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = height + pad_b, width + pad_r
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        # Routing on detached region means over all channels (its softmax weights are unused in the official
        # model), then attention over the routed regions; one call, fused kernels where the map allows.
        heads = (batch, hp, wp, self.num_heads, channels // self.num_heads)
        out, _ = bilevel_routing_attention(q.reshape(heads), k.reshape(heads), v.reshape(heads), self.n_win,
                                           self.topk, scale=self.scale)
        lepe = self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = self.proj(out.reshape(batch, hp, wp, channels) + lepe)
        if pad_b or pad_r:
            out = out[:, :height, :width].contiguous()
        return out


class FullAttentionLePE(nn.Module):
    """Global multi-head attention with LePE on the input (official ``AttentionLePE``, BiFormer stage 4).

    Args:
        dim: channels of the input and output.
        num_heads: attention heads (the official stage 4 always uses 8).
        side_dwconv: kernel size of the LePE depthwise conv, applied to the block's normed input.
    """

    def __init__(self, dim: int, num_heads: int = 8, side_dwconv: int = 5) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, H, W, dim) -> (batch, H, W, dim); scale head_dim ** -0.5."""
        batch, height, width, channels = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, height, width, channels)
        out = out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out)


class BiFormerBlock(nn.Module):
    """``x + dwconv3x3(x)``, then pre-norm attention and MLP residuals. Input and output are NCHW.

    Args:
        dim: channels.
        num_heads: heads of the routed attention (ignored by full attention, which uses ``full_attn_heads``).
        topk: regions per query region; ``None`` for full attention with LePE (official ``topk=-2``).
        n_win, side_dwconv, auto_pad: see :class:`BiLevelRoutingAttention`.
        mlp_ratio: hidden width of the MLP over ``dim``.
        drop_path: stochastic-depth rate of both residual branches.
        full_attn_heads: heads of the full attention.
    """

    def __init__(self, dim: int, num_heads: int, topk: int | None, n_win: int = 7, mlp_ratio: float = 3.0,
                 side_dwconv: int = 5, drop_path: float = 0.0, auto_pad: bool = False,
                 full_attn_heads: int = 8) -> None:
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk is None:
            self.attn: nn.Module = FullAttentionLePE(dim, full_attn_heads, side_dwconv)
        else:
            self.attn = BiLevelRoutingAttention(dim, num_heads, n_win, topk, side_dwconv, auto_pad)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, dim, H, W) -> same shape."""
        x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.permute(0, 3, 1, 2)


def _downsample(in_chs: int, out_chs: int) -> nn.Sequential:
    """Official patch merging: 3x3 stride-2 conv + BatchNorm (``ceil(size / 2)`` per axis)."""
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1), nn.BatchNorm2d(out_chs))


class BiFormerStage(nn.Module):
    """Optional downsampling followed by ``depth`` :class:`BiFormerBlock`; NCHW in and out."""

    def __init__(self, in_chs: int, dim: int, depth: int, downsample: bool, num_heads: int, topk: int | None,
                 n_win: int, mlp_ratio: float, side_dwconv: int, drop_path: Sequence[float], auto_pad: bool,
                 full_attn_heads: int) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = _downsample(in_chs, dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            BiFormerBlock(dim, num_heads, topk, n_win, mlp_ratio, side_dwconv, drop_path[i], auto_pad,
                          full_attn_heads)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, in_chs, H, W) -> (batch, dim, H', W') with H' = ceil(H / 2) when downsampling."""
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class BiFormer(nn.Module):
    """BiFormer image classifier / backbone (four stages, strides 4, 8, 16, 32).

    Args:
        depths: blocks per stage.
        embed_dims: channels per stage (q, k and v have the same width in every official variant).
        mlp_ratios: MLP hidden width over channels, per stage.
        topks: routed regions per stage; ``None`` runs full attention with LePE (official ``topk=-2``).
        head_dim: channels per head of the routed attention (heads = ``embed_dim // head_dim``).
        n_win: regions per side in every routed stage.
        side_dwconv: LePE depthwise kernel size.
        full_attn_heads: heads of the full-attention stages (the official code's default, 8).
        auto_pad: pad maps not divisible by ``n_win`` (official segmentation setting) instead of raising.
        in_chans, num_classes, global_pool, drop_rate, drop_path_rate: as in timm.
    """

    attnzoo_kernels = ("routed_attention",)

    def __init__(self, depths: Sequence[int] = (2, 2, 8, 2), embed_dims: Sequence[int] = (64, 128, 256, 512),
                 mlp_ratios: Sequence[float] = (3, 3, 3, 3), topks: Sequence[int | None] = (1, 4, 16, None),
                 head_dim: int = 32, n_win: int = 7, side_dwconv: int = 5, full_attn_heads: int = 8,
                 auto_pad: bool = False, in_chans: int = 3, num_classes: int = 1000, global_pool: str = "avg",
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        num_stages = len(depths)
        if not len(embed_dims) == len(mlp_ratios) == len(topks) == num_stages:
            raise ValueError("depths, embed_dims, mlp_ratios and topks need one entry per stage; got lengths "
                             f"{len(depths)}, {len(embed_dims)}, {len(mlp_ratios)}, {len(topks)}")
        self.num_classes = num_classes
        self.n_win = n_win
        self.topks = tuple(topks)
        self.auto_pad = auto_pad
        self.num_features = self.head_hidden_size = embed_dims[-1]

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, embed_dims[0] // 2, 3, stride=2, padding=1),
            nn.BatchNorm2d(embed_dims[0] // 2),
            nn.GELU(),
            nn.Conv2d(embed_dims[0] // 2, embed_dims[0], 3, stride=2, padding=1),
            nn.BatchNorm2d(embed_dims[0]),
        )
        # Stochastic depth grows linearly over all blocks (python floats: the model builds on the meta device).
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, self.feature_info = [], []
        for i in range(num_stages):
            first = sum(depths[:i])
            stages.append(BiFormerStage(
                embed_dims[max(i - 1, 0)], embed_dims[i], depths[i], downsample=i > 0,
                num_heads=embed_dims[i] // head_dim, topk=topks[i], n_win=n_win, mlp_ratio=mlp_ratios[i],
                side_dwconv=side_dwconv, drop_path=rates[first:first + depths[i]], auto_pad=auto_pad,
                full_attn_heads=full_attn_heads))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=2 ** (i + 2), module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(embed_dims[-1])
        self.head = ClassifierHead(embed_dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Official init: truncated-normal Linear weights with zero bias; convs and norms keep torch defaults.
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, object]:
        """Parameter groups for layer-wise learning-rate decay (timm convention)."""
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass of every stage (saves memory)."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final linear layer."""
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (0: no classifier)."""
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def valid_input_size(self, size: int) -> bool:
        """True when an input side of ``size`` pixels gives maps divisible by ``n_win`` in every routed stage."""
        side = size
        for i, topk in enumerate(self.topks):
            side = math.ceil(side / (4 if i == 0 else 2))  # stem: two stride-2 convs, then one per stage
            if topk is not None and side % self.n_win:
                return False
        return True

    def _check_input_size(self, x: torch.Tensor) -> None:
        if self.auto_pad:
            return
        for axis, size in zip(("height", "width"), x.shape[-2:]):
            if self.valid_input_size(size):
                continue
            below = next((s for s in range(size - 1, 0, -1) if self.valid_input_size(s)), None)
            above = next(s for s in range(size + 1, 16 * size + 1024) if self.valid_input_size(s))
            works = f"{below} or {above}" if below else f"{above}"
            routed = [i for i, topk in enumerate(self.topks) if topk is not None]
            period = 2 ** (max(routed) + 2) * self.n_win
            raise ValueError(
                f"input {axis} {size} gives feature maps not divisible by n_win={self.n_win} in a routed stage; "
                f"the nearest {axis}s that work are {works} (multiples of {period} always do), or build the "
                "model with auto_pad=True")

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Features after the selected stages (timm convention).

        Args:
            x: images (batch, in_chans, H, W).
            indices: last n stages if int, all if None, or the stage indices to return.
            norm: apply the final BatchNorm to the last stage's feature map if it is returned.
            stop_early: stop after the last requested stage.
            output_fmt: only ``"NCHW"``.
            intermediates_only: return only the list of features.

        Returns:
            list of (batch, C_i, H / 2**(i+2), W / 2**(i+2)) maps (ceil), or (final features, that list).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt {output_fmt!r} is not supported; BiFormer features are 'NCHW'")
        self._check_input_size(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages[:max_index + 1] if stop_early and not torch.jit.is_scripting() else self.stages
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages (and norm / head) not needed for ``indices``; returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # the final BatchNorm is sized for the last stage
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            prune_head = True
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """images (batch, in_chans, H, W) -> normed last-stage map (batch, num_features, H/32, W/32) (ceil)."""
        self._check_input_size(x)
        x = self.stem(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool then the classifier: (batch, C, h, w) -> (batch, num_classes or C)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """images (batch, in_chans, H, W) float -> logits (batch, num_classes)."""
        return self.forward_head(self.forward_features(x))


_OFFICIAL_RENAMES = (
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"\.attn\.qkv\.qkv\.", ".attn.qkv."),
    (r"\.attn\.wo\.", ".attn.proj."),
    (r"\.mlp\.0\.", ".mlp.fc1."),
    (r"\.mlp\.3\.", ".mlp.fc2."),
    (r"^head\.", "head.fc."),
)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an official BiFormer checkpoint (``torch.load`` of the released .pth) to this module's layout.

    Accepts the full checkpoint dict (weights under ``"model"``) or the bare state dict; strips ``module.``
    (DDP) and fairscale ``_checkpoint_wrapped_module.`` prefixes; leaves a state dict already in the timm
    layout unchanged. Tensors are not copied.
    """
    for wrapper in ("model", "state_dict"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    if "stem.0.weight" in state_dict:
        return state_dict
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.").replace("_checkpoint_wrapped_module.", "")
        for pattern, repl in _OFFICIAL_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        BiFormer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs)


def _cfg(url: str = "", **kwargs) -> dict[str, object]:
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0", "classifier": "head.fc", "license": "mit",
        "paper_ids": "arXiv:2303.08810", "origin_url": "https://github.com/rayleizhu/BiFormer",
        **kwargs,
    }


# Official release links (README of rayleizhu/BiFormer). They all end in ``/content``, so timm's download
# cache would store them under one file name: prefer a local file (pretrained_cfg_overlay=dict(file=...)).
default_cfgs = generate_default_cfgs({
    "biformer_tiny.in1k": _cfg(
        url="https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHEOoGkgwgQzEDlM/root/content"),
    "biformer_small.in1k": _cfg(
        url="https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHDyM-x9KWRBZ832/root/content"),
    "biformer_base.in1k": _cfg(
        url="https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHI_XPhoadjaNxtO/root/content"),
})


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-T, 13.14M params, 81.4% ImageNet-1k top-1 at 224 (official)."""
    args = dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512))
    return _create_biformer("biformer_tiny", pretrained, **dict(args, **kwargs))


@register_model
def biformer_small(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-S, 25.54M params, 83.8% ImageNet-1k top-1 at 224 (official)."""
    args = dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512))
    return _create_biformer("biformer_small", pretrained, **dict(args, **kwargs))


@register_model
def biformer_base(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-B, 56.80M params, 84.3% ImageNet-1k top-1 at 224 (official)."""
    args = dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768))
    return _create_biformer("biformer_base", pretrained, **dict(args, **kwargs))
