"""CausalMM: counterfactual attention + contrastive decoding (Zhou et al., "Mitigating Modality Prior-Induced
Hallucinations in Multimodal Large Language Models via Deciphering Attention Causality", ICLR 2025; official code
The-Martyr/CausalMM).

Two counterfactuals of the model, each decoded in the same batched forward as the real one:

- **vision** (``cf_encoder.py``): the vision tower's attention map of the layer the projector reads,
  ``(N, H, P+1, P+1)`` with the CLS token, is edited (:func:`vision_counterfactual`: ``random`` -- uniform noise
  in [0, 2); ``uniform`` -- every entry the map's mean; ``reversed`` -- the map's maximum minus the map;
  ``shuffle`` -- the entries of each head randomly permuted, the official default), bilinearly resized to the
  ``h x w`` patch grid, averaged over heads and multiplied into the patch features before the projector.
- **language** (the README's LLM counterfactual attention): the decoder's post-softmax attention is replaced in
  every layer (:func:`language_counterfactual`: ``reverse``, ``reverse_normalize``, ``random``, ``uniform``), all
  causal-masked.

Contrast (``causalmm_sm.py`` / ``causalmm_mm.py``): ``l' = (1 + gamma) l - gamma l_cf`` for one counterfactual,
``l' = (1 + 2 gamma) l - gamma l_vision - gamma l_language`` for both, then the plausibility cut-off
``l' = -inf where l < log(epsilon) + max l``; the official code samples from ``softmax(l')``.
Defaults are the official POPE script's: ``gamma = 1``, ``epsilon = 0.6``, vision counterfactual by ``shuffle``,
sampling.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..mllm.attention import AttentionContext, AttentionPass, Plan
from .base import check_range, register_pass
from .contrastive import ContrastiveDecoding, plausibility_cutoff

VISION_KINDS = ("random", "uniform", "reversed", "shuffle")
LANGUAGE_KINDS = ("reverse", "reverse_normalize", "random", "uniform")
COUNTERFACTUALS = {"vision": ("vision",), "language": ("language",), "both": ("vision", "language")}


def vision_counterfactual(maps: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """The official counterfactual of a vision attention map ``(N, H, S, S)`` float (S = patches + CLS).

    ``random``: ``2 * U[0, 1)`` noise; ``uniform``: the mean of each ``(n, h)`` map everywhere; ``reversed``:
    ``max - map`` with the maximum of each ``(n, h)`` map; ``shuffle``: the ``S * S`` entries of head ``h``
    permuted by one random permutation per head, the same for every row ``n`` (as the official loop does).
    """
    N, H, S, T = maps.shape
    if kind == "random":
        return torch.rand(maps.shape, generator=generator, device=maps.device, dtype=maps.dtype) * 2
    if kind == "uniform":
        return maps.mean(dim=(2, 3), keepdim=True).expand_as(maps)
    if kind == "reversed":
        return maps.amax(dim=(2, 3), keepdim=True) - maps
    if kind == "shuffle":
        perm = torch.stack([torch.randperm(S * T, generator=generator, device=maps.device) for _ in range(H)])
        return maps.flatten(2).gather(2, perm[None].expand(N, -1, -1)).view_as(maps)
    raise ValueError(f"vision_kind {kind!r} is not one of {VISION_KINDS}")


def language_counterfactual(weights: torch.Tensor, keep: torch.Tensor, real: torch.Tensor, kind: str,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """The README's counterfactual decoder attention, causal-masked.

    Args:
        weights: post-softmax attention ``(B, H, q, kv)`` float32.
        keep: bool ``(B, 1 or H, q, kv)``, True where the query may attend (causal + padding).
        real: bool ``(B, kv)``, True on the sample's non-padding keys (normalisers count these, so a sample's
            counterfactual does not depend on the padding its batch gives it).
        kind: ``reverse`` -- ``max_row - w``; ``reverse_normalize`` -- that, divided by its row sum; ``random`` --
            ``U[0, 1)`` normalised over the real keys; ``uniform`` -- ``1 / number of real keys``. Masked
            positions are 0 afterwards (rows of ``reverse``, ``random`` and ``uniform`` need not sum to 1, as in the
            official code). A row whose reversed weights are all 0 (a query with a single key) stays 0 under
            ``reverse_normalize``, where the official code divides 0 by 0.
    """
    keep = keep.expand_as(weights)
    if kind in ("reverse", "reverse_normalize"):
        out = (weights.amax(dim=-1, keepdim=True) - weights) * keep
        if kind == "reverse_normalize":
            out = out / out.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)
        return out
    real = real[:, None, None, :].to(weights.dtype)
    if kind == "random":
        noise = torch.rand(weights.shape, generator=generator, device=weights.device, dtype=weights.dtype) * real
        return noise / noise.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny) * keep
    if kind == "uniform":
        return keep / real.sum(dim=-1, keepdim=True)
    raise ValueError(f"language_kind {kind!r} is not one of {LANGUAGE_KINDS}")


def weight_features(features: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Official ``apply_attention``: ``features (N, h*w, C)`` times the head-averaged ``maps (N, H, S, S)``
    bilinearly resized to ``h x w`` (align_corners False). Returns ``(N, h*w, C)`` in the features' dtype."""
    n = features.shape[1]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"CausalMM's vision counterfactual needs a square patch grid; the projector gets {n} "
                         "tokens per image (use vision_feature_select_strategy='default')")
    resized = F.interpolate(maps.float(), size=(side, side), mode="bilinear", align_corners=False)
    weight = resized.mean(dim=1).reshape(maps.shape[0], n, 1)
    return (features.float() * weight).to(features.dtype)


@register_pass
@dataclasses.dataclass
class CausalMM(ContrastiveDecoding):
    """CausalMM: contrast the model with counterfactual vision and/or decoder attention.

    Attributes:
        gamma: contrast strength (1.0, the official POPE script).
        epsilon: plausibility cut-off, keep tokens with ``p >= epsilon * max p`` (0.6, the official POPE script).
        counterfactual: "vision" (the official POPE script, ``causalmm_sm``), "language", or "both"
            (``causalmm_mm``: three branches, ``(1 + 2 gamma) l - gamma l_v - gamma l_l``).
        vision_kind: one of :data:`VISION_KINDS` ("shuffle", the official default).
        language_kind: one of :data:`LANGUAGE_KINDS` ("reverse").
        do_sample: True samples from the contrasted distribution as the official code does (temperature / top-k /
            top-p from ``generate``); False decodes greedily; None follows ``generate(do_sample=...)``.
        seed: seeds the counterfactual's randomness (shuffle / random) at every generation; None uses the global
            torch RNG as the official code does.
    """

    name: ClassVar[str] = "causalmm"
    summary: ClassVar[str] = "contrast with counterfactual (edited) vision / decoder attention"

    gamma: float = 1.0
    epsilon: float = 0.6
    counterfactual: str = "vision"
    vision_kind: str = "shuffle"
    language_kind: str = "reverse"
    do_sample: bool | None = True
    seed: int | None = None

    def __post_init__(self) -> None:
        self._hook: Any = None
        self._feature_layer: int | None = None
        self._maps: torch.Tensor | None = None
        self._generator: torch.Generator | None = None
        self._active_layout: Any = None
        super().__post_init__()

    def validate(self) -> None:
        check_range("gamma", self.gamma, 0.0, None)
        check_range("epsilon", self.epsilon, 0.0, 1.0, low_open=True)
        if self.counterfactual not in COUNTERFACTUALS:
            raise ValueError(f"counterfactual = {self.counterfactual!r} is not one of {tuple(COUNTERFACTUALS)}")
        if self.vision_kind not in VISION_KINDS:
            raise ValueError(f"vision_kind = {self.vision_kind!r} is not one of {VISION_KINDS}")
        if self.language_kind not in LANGUAGE_KINDS:
            raise ValueError(f"language_kind = {self.language_kind!r} is not one of {LANGUAGE_KINDS}")

    @property
    def roles(self) -> tuple[str, ...]:
        """The branches in row order: "factual" then the counterfactuals."""
        return ("factual", *COUNTERFACTUALS[self.counterfactual])

    # ------------------------------------------------------------------ attach

    def on_attach(self, lvlm: Any) -> None:
        super().on_attach(lvlm)
        self.check_passes(lvlm)
        if "vision" in self.roles:
            if lvlm.family not in ("llava", "llava_next") or lvlm.vision_feature_layer is None:
                raise ValueError(f"CausalMM's vision counterfactual edits a CLIP feature layer's attention map before "
                                 f"the projector (LLaVA / LLaVA-NeXT); {lvlm.family} has none -- use "
                                 "counterfactual='language'")
            self._feature_layer = lvlm.vision_feature_layer
            projector = lvlm.model.model.multi_modal_projector
            self._hook = projector.register_forward_pre_hook(self._weight_features)

    def on_detach(self, lvlm: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._maps = None

    def check_passes(self, lvlm: Any) -> None:
        """The language counterfactual edits attention weights, so no pass may compute attention itself."""
        if "language" not in self.roles:
            return
        replacing = [type(p).__name__ for p in lvlm.passes
                     if p is not self and type(p).attend is not AttentionPass.attend]
        if replacing:
            raise ValueError(f"CausalMM's language counterfactual edits decoder attention weights, but {replacing} "
                             "compute attention themselves (no weights to edit); use counterfactual='vision' or "
                             "detach them")

    # ------------------------------------------------------------------ decoding

    def start(self, lvlm: Any) -> None:
        self._maps = None
        self._generator = None
        if self.seed is not None:
            self._generator = torch.Generator(device=lvlm.device).manual_seed(self.seed)

    def branch_prompts(self, lvlm: Any, batch: Any, extra: dict[str, Any]) -> list[list[str]]:
        return [list(batch.layout.prompts)] * len(self.roles)

    def contrast(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        factual, *cfs = logits
        contrasted = (1 + len(cfs) * self.gamma) * factual
        for cf in cfs:
            contrasted = contrasted - self.gamma * cf
        return plausibility_cutoff(factual, contrasted, self.epsilon)

    def _rows(self, role: str) -> torch.Tensor | None:
        """Bool ``(rows,)``: the rows of the running forward in branch ``role`` (None when there are none)."""
        if self.row_branch is None or role not in self.roles:
            return None
        rows = self.row_branch == self.roles.index(role)
        return rows if bool(rows.any()) else None

    # ------------------------------------------------------------------ attention hooks

    def plan(self, ctx: AttentionContext) -> Plan | None:
        if ctx.layout is None or ctx.image_free:
            return None
        if ctx.site == "vision":
            if ctx.layer == self._feature_layer and ctx.layout.vision_rows is not None and self._rows("vision") \
                    is not None:
                return Plan(weights=True)
            return None
        if self._rows("language") is not None and ctx.batch_size == self.row_branch.shape[0]:
            return Plan(weights=True)
        return None

    def edit_weights(self, ctx: AttentionContext, weights: torch.Tensor) -> torch.Tensor:
        if ctx.site == "vision":
            rows = self._rows("vision")[ctx.layout.vision_rows.to(weights.device)]
            self._maps = weights[rows].detach()
            return weights
        rows = self._rows("language")
        layout = ctx.layout
        real = layout.attention_mask.to(weights.device).bool()
        real = torch.cat([real, real.new_ones(real.shape[0], ctx.kv_length - real.shape[1])], dim=-1)
        keep = ctx.mask.to(weights.device)
        out = weights.clone()
        out[rows] = language_counterfactual(weights[rows], keep[rows], real[rows], self.language_kind,
                                            self._generator)
        return out

    def _weight_features(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        maps, self._maps = self._maps, None
        if maps is None:
            return None
        layout = self._layout_rows()
        if layout is None:
            return None
        features = args[0]
        edited = vision_counterfactual(maps.float(), self.vision_kind, self._generator)
        out = features.clone()
        out[layout] = weight_features(features[layout], edited)
        return (out, *args[1:])

    def _layout_rows(self) -> torch.Tensor | None:
        rows = self._rows("vision")
        layout = self._active_layout
        if rows is None or layout is None or layout.vision_rows is None:
            return None
        return rows[layout.vision_rows.to(rows.device)]

    def on_layout(self, layout: Any) -> None:
        self._active_layout = layout
