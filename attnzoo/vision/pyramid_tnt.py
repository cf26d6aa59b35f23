"""PyramidTNT (Han et al., 2022, arXiv:2201.00978): Transformer-in-Transformer with a pyramid of four stages.

timm ships the columnar TNT (``tnt_s_patch16_224``, ``tnt_b_patch16_224``) but not PyramidTNT; this file adds
it with the official architecture (huawei-noah/Efficient-AI-Backbones, ``tnt_pytorch/pyramid_tnt.py``):

- a convolutional stem gives "sentences" (outer tokens, stride 8) and 4x4 "words" per sentence (inner
  tokens, taken from a stride-2 feature map by 4x4 unfolding);
- each stage's first block (and second, in stages deeper than 6 blocks) runs inner attention over the 16
  words of every sentence and adds their projection to the sentence; every block runs outer attention
  over the sentences, with keys/values average-pooled by ``sr_ratio`` (4, 2, 1, 1) and a learned
  relative-position bias of shape (1, heads, N, N / sr^2) shared by the stage's blocks;
- between stages, ``SentenceAggregation`` (LayerNorm + stride-2 3x3 conv) halves the sentence grid and
  ``WordAggregation`` (LayerNorm + 2x2 sentence merge of the 4x4 word grids + stride-2 3x3 conv) keeps
  4x4 words per sentence;
- classification by the mean of the final normalised sentences.

Attention runs on ``F.scaled_dot_product_attention`` with the relative-position bias as an additive mask.
The positional biases fix the input size (192 for ti, 256 otherwise; ``img_size=`` builds other sizes).

Official checkpoints (BaiduDisk links in the official README, no public URL) load with
``timm.create_model("ptnt_s_patch16_256", pretrained=True, pretrained_cfg_overlay=dict(file=path))``
through :func:`checkpoint_filter_fn`, which moves the official ``word_merges.i`` / ``sentence_merges.i``
into ``stages.{i+1}`` and strips DataParallel prefixes; every other key keeps its official name.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._features import feature_take_indices
from torch import nn

from ._registry import register_model

__all__ = ["PyramidTNT", "checkpoint_filter_fn"]

_SR_RATIOS = (4, 2, 1, 1)  # keys/values pooling of the outer attention per stage (official)
_NUM_WORDS = 16  # 4x4 words per sentence (official stem)
MAX_SDPA_BATCH = 65535  # sequences per scaled_dot_product_attention call (a CUDA grid axis limit)


class Attention(nn.Module):
    """Multi-head attention with separate ``q`` / ``kv`` projections (official key names), optional
    average-pooled keys/values (``sr_ratio`` > 1, then ``linear`` + ``norm`` on the pooled tokens) and an
    optional additive bias. Input (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, sr_ratio: int = 1) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.pool = nn.AvgPool2d(sr_ratio, stride=sr_ratio)
            self.linear = nn.Linear(dim, dim)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int], bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, C) tokens of an H x W grid (``hw``); bias: (1, heads, N, M) added to the logits."""
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        if self.sr_ratio > 1:
            pooled = self.pool(x.transpose(1, 2).reshape(b, c, *hw)).flatten(2).transpose(1, 2)
            x = self.norm(self.linear(pooled))
        kv = self.kv(x).reshape(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if bias is not None:
            bias = bias.to(q.dtype)
        dropout_p = self.attn_drop if self.training else 0.0
        if b <= MAX_SDPA_BATCH:
            out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=bias, dropout_p=dropout_p)
        else:
            # The word attention runs on B * sentences sequences (524288 at batch 128, 256 px): more than a CUDA
            # grid axis holds (65535), where SDPA's kernels fail with "invalid argument". Chunk the batch.
            out = torch.cat([
                F.scaled_dot_product_attention(q[i:i + MAX_SDPA_BATCH], kv[0, i:i + MAX_SDPA_BATCH],
                                               kv[1, i:i + MAX_SDPA_BATCH], attn_mask=bias, dropout_p=dropout_p)
                for i in range(0, b, MAX_SDPA_BATCH)])
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class Block(nn.Module):
    """PyramidTNT block: optional inner (word) attention + MLP whose result is projected into the
    sentence, then outer (sentence) attention + MLP. inner_dim <= 0 means no inner part."""

    def __init__(self, outer_dim: int, inner_dim: int, outer_heads: int, inner_heads: int, mlp_ratio: float,
                 qkv_bias: bool, proj_drop: float, attn_drop: float, drop_path: float, sr_ratio: int) -> None:
        super().__init__()
        self.has_inner = inner_dim > 0
        if self.has_inner:
            # the inner LayerNorms normalise all 16 words of a sentence jointly (official)
            self.inner_norm1 = nn.LayerNorm(_NUM_WORDS * inner_dim)
            self.inner_attn = Attention(inner_dim, inner_heads, qkv_bias, attn_drop, proj_drop)
            self.inner_norm2 = nn.LayerNorm(_NUM_WORDS * inner_dim)
            self.inner_mlp = Mlp(inner_dim, int(inner_dim * mlp_ratio), drop=proj_drop)
            self.proj_norm1 = nn.LayerNorm(_NUM_WORDS * inner_dim)
            self.proj = nn.Linear(_NUM_WORDS * inner_dim, outer_dim, bias=False)
            self.proj_norm2 = nn.LayerNorm(outer_dim)
        self.outer_norm1 = nn.LayerNorm(outer_dim)
        self.outer_attn = Attention(outer_dim, outer_heads, qkv_bias, attn_drop, proj_drop, sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.outer_norm2 = nn.LayerNorm(outer_dim)
        self.outer_mlp = Mlp(outer_dim, int(outer_dim * mlp_ratio), drop=proj_drop)

    def forward(self, inner: torch.Tensor, outer: torch.Tensor, hw: tuple[int, int],
                rel_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """inner: (B*N, 16, c) words; outer: (B, N, C) sentences on an H x W grid (``hw``)."""
        b, n, _ = outer.shape
        if self.has_inner:
            words = inner.shape[1]
            normed = self.inner_norm1(inner.reshape(b, n, -1)).reshape(b * n, words, -1)
            inner = inner + self.drop_path(self.inner_attn(normed, (4, 4)))
            normed = self.inner_norm2(inner.reshape(b, n, -1)).reshape(b * n, words, -1)
            inner = inner + self.drop_path(self.inner_mlp(normed))
            outer = outer + self.proj_norm2(self.proj(self.proj_norm1(inner.reshape(b, n, -1))))
        outer = outer + self.drop_path(self.outer_attn(self.outer_norm1(outer), hw, rel_pos))
        outer = outer + self.drop_path(self.outer_mlp(self.outer_norm2(outer)))
        return inner, outer


class SentenceAggregation(nn.Module):
    """Halve the sentence grid: LayerNorm, then a stride-2 3x3 conv. (B, H*W, C) -> (B, ceil(H/2)*ceil(W/2), C')."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim_in)
        self.conv = nn.Sequential(nn.Conv2d(dim_in, dim_out, kernel_size=3, padding=1, stride=2))

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        b, _, c = x.shape
        x = self.conv(self.norm(x).transpose(1, 2).reshape(b, c, *hw))
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class WordAggregation(nn.Module):
    """Merge the 4x4 word grids of each 2x2 group of sentences into one 8x8 grid and bring it back to 4x4
    with a stride-2 3x3 conv. (B*H*W, 16, c) -> (B*(H/2)*(W/2), 16, c') for even H, W."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.dim_out = dim_out
        self.norm = nn.LayerNorm(dim_in)
        self.conv = nn.Sequential(nn.Conv2d(dim_in, dim_out, kernel_size=3, padding=1, stride=2))

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        h, w = hw
        c = x.shape[-1]
        # even grids only (PyramidTNT checks img_size % 64 == 0); the official code pads odd grids for detection
        x = self.norm(x).reshape(-1, h, w, 4, 4, c)
        b, h2, w2 = x.shape[0], h // 2, w // 2
        # sentence (2i+di, 2j+dj) word (r, s) -> pixel (4*di + r, 4*dj + s) of merged sentence (i, j)
        x = x.reshape(b, h2, 2, w2, 2, 4, 4, c).permute(0, 1, 3, 7, 2, 5, 4, 6).reshape(b * h2 * w2, c, 8, 8)
        return self.conv(x).reshape(-1, self.dim_out, _NUM_WORDS).transpose(1, 2)


class Stem(nn.Module):
    """Convolutional stem (official ``patch_embed``): sentences at stride 8 and 4x4 words per sentence
    from a stride-2 map. (B, 3, H, W) -> words (B*N, 16, c), sentences (B, N, C), grid (H/8, W/8)."""

    def __init__(self, in_chans: int, outer_dim: int, inner_dim: int) -> None:
        super().__init__()
        self.inner_dim = inner_dim

        def conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.common_conv = nn.Sequential(*conv_bn_relu(in_chans, inner_dim * 2, 2))
        self.inner_convs = nn.Sequential(*conv_bn_relu(inner_dim * 2, inner_dim, 1))
        self.outer_convs = nn.Sequential(*conv_bn_relu(inner_dim * 2, inner_dim * 4, 2),
                                         *conv_bn_relu(inner_dim * 4, inner_dim * 8, 2),
                                         *conv_bn_relu(inner_dim * 8, outer_dim, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        b, _, h, w = x.shape
        if h % 8 or w % 8:
            raise ValueError(f"PyramidTNT needs an input size divisible by 8, got {h}x{w}")
        x = self.common_conv(x)
        words = F.unfold(self.inner_convs(x), kernel_size=4, stride=4)  # (B, c*16, N)
        words = words.transpose(1, 2).reshape(-1, self.inner_dim, _NUM_WORDS).transpose(1, 2)
        sentences = self.outer_convs(x)
        hw = (sentences.shape[2], sentences.shape[3])
        return words, sentences.flatten(2).transpose(1, 2), hw


class Stage(nn.Module):
    """Aggregation from the previous stage (none for stage 0), then the blocks. Inner parts exist in the
    first block, and in the second too when the stage has more than 6 blocks (official)."""

    def __init__(self, depth: int, dims_in: tuple[int, int] | None, outer_dim: int, inner_dim: int,
                 outer_heads: int, inner_heads: int, num_patches: int, sr_ratio: int, mlp_ratio: float,
                 qkv_bias: bool, proj_drop: float, attn_drop: float, drop_path: list[float]) -> None:
        super().__init__()
        if dims_in is not None:
            self.word_merge = WordAggregation(dims_in[1], inner_dim)
            self.sentence_merge = SentenceAggregation(dims_in[0], outer_dim)
        else:
            self.word_merge = self.sentence_merge = None
        self.blocks = nn.ModuleList([
            Block(outer_dim, inner_dim if j == 0 or (j == 1 and depth > 6) else -1, outer_heads, inner_heads,
                  mlp_ratio, qkv_bias, proj_drop, attn_drop, drop_path[j], sr_ratio)
            for j in range(depth)])
        self.relative_pos = nn.Parameter(torch.randn(1, outer_heads, num_patches, num_patches // sr_ratio ** 2))

    def forward(self, inner: torch.Tensor, outer: torch.Tensor,
                hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        if self.sentence_merge is not None:
            inner = self.word_merge(inner, hw)
            outer, hw = self.sentence_merge(outer, hw)
        if self.relative_pos.shape[2] != hw[0] * hw[1]:
            raise ValueError(f"PyramidTNT's relative position bias is built for {self.relative_pos.shape[2]} "
                             f"tokens in this stage, got a {hw[0]}x{hw[1]} grid: build the model with "
                             f"img_size=<input size>")
        for blk in self.blocks:
            inner, outer = blk(inner, outer, hw, self.relative_pos)
        return inner, outer, hw


class PyramidTNT(nn.Module):
    """PyramidTNT classifier.

    Args:
        depths, outer_dims, inner_dims, outer_heads, inner_heads: per-stage configuration (4 stages).
        img_size: input size the positional biases are built for (divisible by 64).
        in_chans, num_classes, global_pool ("avg" or ""), mlp_ratio, qkv_bias: as in timm.
        drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate: dropout rates (official defaults 0).

    Input (B, in_chans, img_size, img_size) float; output logits (B, num_classes).
    """

    def __init__(self, depths: tuple[int, ...], outer_dims: tuple[int, ...], inner_dims: tuple[int, ...],
                 outer_heads: tuple[int, ...], inner_heads: tuple[int, ...], img_size: int | tuple[int, int] = 256,
                 in_chans: int = 3, num_classes: int = 1000, global_pool: str = "avg", mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        img_size = to_2tuple(img_size)
        if img_size[0] % 64 or img_size[1] % 64:
            # the position biases hold N_i = N_0 / 4^i tokens per stage: whole 2x2 merges down to 1/64
            raise ValueError(f"PyramidTNT needs img_size divisible by 64, got {img_size[0]}x{img_size[1]}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = outer_dims[-1]
        num_patches = (img_size[0] // 8) * (img_size[1] // 8)

        self.patch_embed = Stem(in_chans, outer_dims[0], inner_dims[0])
        self.outer_pos = nn.Parameter(torch.zeros(1, num_patches, outer_dims[0]))
        self.inner_pos = nn.Parameter(torch.zeros(1, _NUM_WORDS, inner_dims[0]))
        self.pos_drop = nn.Dropout(drop_rate)

        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear stochastic-depth rule
        stages, self.feature_info, start = [], [], 0
        for i, depth in enumerate(depths):
            stages.append(Stage(
                depth, None if i == 0 else (outer_dims[i - 1], inner_dims[i - 1]), outer_dims[i], inner_dims[i],
                outer_heads[i], inner_heads[i], num_patches // 4 ** i, _SR_RATIOS[i], mlp_ratio, qkv_bias,
                proj_drop_rate, attn_drop_rate, dpr[start:start + depth]))
            start += depth
            self.feature_info.append(dict(num_chs=outer_dims[i], reduction=8 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(outer_dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(outer_dims[-1], num_classes) if num_classes > 0 else nn.Identity()

        trunc_normal_(self.outer_pos, std=0.02)
        trunc_normal_(self.inner_pos, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # official init: truncated-normal linears, fan-out normal convs, unit LayerNorms
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"outer_pos", "inner_pos"}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        inner, outer, hw = self.patch_embed(x)
        return inner + self.inner_pos, outer + self.pos_drop(self.outer_pos), hw

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normalised final sentences (B, H/64 * W/64, C)."""
        inner, outer, hw = self._embed(x)
        for stage in self.stages:
            inner, outer, hw = stage(inner, outer, hw)
        return self.norm(outer)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, N, C) sentences -> (B, C) pooled features or (B, num_classes) logits."""
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Per-stage sentence maps (B, C_i, H/2^(3+i), W/2^(3+i)) for the stages in ``indices`` (timm's
        convention: int = last n, None = all). ``norm`` applies the final norm to the last stage's map."""
        if output_fmt != "NCHW":
            raise ValueError(f"PyramidTNT gives NCHW intermediates only, got output_fmt={output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        inner, outer, hw = self._embed(x)
        for i, stage in enumerate(stages):
            inner, outer, hw = stage(inner, outer, hw)
            if i in take_indices:
                feat = self.norm(outer) if norm and i == len(self.stages) - 1 else outer
                intermediates.append(feat.transpose(1, 2).reshape(outer.shape[0], -1, *hw))
        if intermediates_only:
            return intermediates
        return self.norm(outer), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last one in ``indices`` (and the norm / head if asked)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def checkpoint_filter_fn(state_dict: dict[str, Any], model: PyramidTNT) -> dict[str, torch.Tensor]:
    """Map an official PyramidTNT checkpoint to this layout.

    Accepts the bare state dict or one wrapped under "model" / "state_dict" / "state_dict_ema", with or
    without DataParallel's "module." prefix. Official ``word_merges.{i}`` / ``sentence_merges.{i}`` move
    to ``stages.{i+1}.word_merge`` / ``stages.{i+1}.sentence_merge``; other names are unchanged.

    Raises:
        ValueError: if a position bias was trained for another input size than the model's ``img_size``.
    """
    for wrapper in ("model", "state_dict_ema", "state_dict"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
            break
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        k = k.removeprefix("module.")
        for old, new in (("word_merges.", "word_merge."), ("sentence_merges.", "sentence_merge.")):
            if k.startswith(old):
                idx, rest = k[len(old):].split(".", 1)
                k = f"stages.{int(idx) + 1}.{new}{rest}"
        if k in own and k.endswith(("relative_pos", "outer_pos")) and v.shape != own[k].shape:
            raise ValueError(f"checkpoint {k} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}: the "
                             f"official position biases fix the input size; build the model with the checkpoint's "
                             f"img_size (192 for ptnt_ti, 256 otherwise)")
        out[k] = v
    return out


def _cfg(input_size: int, **kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, input_size, input_size), "pool_size": None,
        "crop_pct": 0.9, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "first_conv": "patch_embed.common_conv.0",
        "classifier": "head", "paper_ids": "arXiv:2201.00978",
        "origin_url": "https://github.com/huawei-noah/Efficient-AI-Backbones/tree/master/tnt_pytorch",
        "license": "apache-2.0", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "ptnt_ti_patch16_192": _cfg(192),
    "ptnt_s_patch16_256": _cfg(256),
    "ptnt_m_patch16_256": _cfg(256),
    "ptnt_b_patch16_256": _cfg(256),
})


def _create_ptnt(variant: str, pretrained: bool, depths: tuple[int, ...], outer_dim: int, inner_dim: int,
                 outer_head: int, inner_head: int, default_img_size: int, **kwargs: Any) -> PyramidTNT:
    # official configs: widths and heads double from stage 0 to 1 and again to 2, then stay
    mult = (1, 2, 4, 4)
    cfg = dict(depths=depths, img_size=kwargs.pop("img_size", default_img_size),
               outer_dims=tuple(outer_dim * m for m in mult), inner_dims=tuple(inner_dim * m for m in mult),
               outer_heads=tuple(outer_head * m for m in mult), inner_heads=tuple(inner_head * m for m in mult))
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(PyramidTNT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
                                **dict(cfg, **kwargs))


@register_model
def ptnt_ti_patch16_192(pretrained: bool = False, **kwargs: Any) -> PyramidTNT:
    """PyramidTNT-Ti (official: 10.6M params, 0.6 GFLOPs at 192x192)."""
    return _create_ptnt("ptnt_ti_patch16_192", pretrained, (2, 6, 3, 2), 80, 5, 2, 1, 192, **kwargs)


@register_model
def ptnt_s_patch16_256(pretrained: bool = False, **kwargs: Any) -> PyramidTNT:
    """PyramidTNT-S (official: 32.0M params, 3.3 GFLOPs at 256x256)."""
    return _create_ptnt("ptnt_s_patch16_256", pretrained, (2, 8, 4, 2), 128, 8, 4, 2, 256, **kwargs)


@register_model
def ptnt_m_patch16_256(pretrained: bool = False, **kwargs: Any) -> PyramidTNT:
    """PyramidTNT-M (official: 85.0M params, 8.2 GFLOPs at 256x256)."""
    return _create_ptnt("ptnt_m_patch16_256", pretrained, (2, 8, 6, 2), 192, 12, 4, 2, 256, **kwargs)


@register_model
def ptnt_b_patch16_256(pretrained: bool = False, **kwargs: Any) -> PyramidTNT:
    """PyramidTNT-B (official: 157.0M params, 16.0 GFLOPs at 256x256)."""
    return _create_ptnt("ptnt_b_patch16_256", pretrained, (2, 10, 6, 2), 256, 16, 4, 2, 256, **kwargs)
