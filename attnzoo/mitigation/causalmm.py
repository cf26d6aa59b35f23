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
  causal-masked. The edited weights are never needed as such, only their product with the values: for
  ``reverse``, ``reverse_normalize`` and ``uniform`` it has a closed form in the plain output, the row's largest
  weight, the sum of the kept values and their count (:func:`attnzoo.kernels.counterfactual_attention`, one
  fused pass, no weight matrix); ``random`` multiplies its noise with the values directly (no scores). The
  counterfactual rows are computed so, the other rows by SDPA, in one ``attend`` per layer (``fused=True``,
  the default); ``fused=False`` computes explicit weights of every row and edits them (the cross-check, and the
  path taken when another attached pass edits scores or weights).

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

from ..kernels.counterfactual_attention import counterfactual_attention, counterfactual_attention_backend
from ..mllm.attention import AttentionContext, AttentionPass, Plan
from .base import check_range, register_pass
from .contrastive import ContrastiveDecoding, plausibility_cutoff

VISION_KINDS = ("random", "uniform", "reversed", "shuffle")
LANGUAGE_KINDS = ("reverse", "reverse_normalize", "random", "uniform")
COUNTERFACTUALS = {"vision": ("vision",), "language": ("language",), "both": ("vision", "language")}
_FUSED_PLAN = Plan(replace=True)  # frozen: shared, not rebuilt per call
_EXPLICIT_PLAN = Plan(weights=True)


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
    if kind == "random":
        return random_counterfactual(weights.shape, keep, real, generator, weights.dtype)
    if kind == "uniform":
        return keep / real[:, None, None, :].to(weights.dtype).sum(dim=-1, keepdim=True)
    raise ValueError(f"language_kind {kind!r} is not one of {LANGUAGE_KINDS}")


def random_counterfactual(shape: torch.Size | tuple[int, ...], keep: torch.Tensor, real: torch.Tensor,
                          generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``random`` counterfactual weights ``(B, H, q, kv)`` of ``dtype``: ``U[0, 1)`` noise (one draw of
    ``shape`` from ``generator``), normalised over the real keys ``real`` (bool ``(B, kv)``), 0 off ``keep`` (bool
    ``(B, 1 or H, q, kv)``). Needs no attention weights, only their shape."""
    noise = torch.rand(shape, generator=generator, device=keep.device, dtype=dtype) * real[:, None, None, :]
    return noise / noise.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny) * keep


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
        fused: implementation switch, not a paper hyper-parameter: the language counterfactual's output in closed
            form (True; no attention weights) or from explicit, edited weights (False); both compute the same edit.
            With another attached pass that edits scores or weights the explicit path is taken.
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
    fused: bool = True

    def __post_init__(self) -> None:
        self._hook: Any = None
        self._explicit = not self.fused  # the explicit-weights path for the language counterfactual
        self._real: tuple[Any, int, torch.Tensor, torch.Tensor] | None = None  # (layout, kv, real keys, counts)
        self._feature_layer: int | None = None
        self._maps: torch.Tensor | None = None
        self._generator: torch.Generator | None = None
        self._active_layout: Any = None
        self._launch: Any = None  # the counterfactual kernel's backend function once a checked call ran
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
        """The language counterfactual edits attention weights, so no pass may compute attention itself; one that
        edits scores or weights too makes the counterfactual take the explicit-weights path (edits compose)."""
        if "language" not in self.roles:
            return
        others = [p for p in lvlm.passes if p is not self]
        replacing = [type(p).__name__ for p in others if type(p).attend is not AttentionPass.attend]
        if replacing:
            raise ValueError(f"CausalMM's language counterfactual edits decoder attention weights, but {replacing} "
                             "compute attention themselves (no weights to edit); use counterfactual='vision' or "
                             "detach them")
        editing = any(type(p).edit_scores is not AttentionPass.edit_scores
                      or type(p).edit_weights is not AttentionPass.edit_weights for p in others)
        self._explicit = not self.fused or editing

    # ------------------------------------------------------------------ decoding

    def start(self, lvlm: Any) -> None:
        self._maps = None
        self._real = None
        self._launch = None
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

    def _span(self, role: str) -> slice | None:
        """The rows of the running forward in branch ``role`` (host side, no device sync), or None."""
        if role not in self.roles:
            return None
        return self.branch_span(self.roles.index(role))

    def _rows(self, role: str) -> torch.Tensor | None:
        """Bool ``(rows,)``: the rows of the running forward in branch ``role`` (None when there are none)."""
        if self._span(role) is None:
            return None
        return self.row_branch == self.roles.index(role)

    def _real_keys(self, ctx: AttentionContext, span: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Bool ``(b, kv)`` real (non-padding) keys of the rows ``span`` and their float32 counts ``(b,)``, built
        once per forward (every layer of a step has the same keys)."""
        cached = self._real
        if cached is not None and cached[0] is ctx.layout and cached[1] == ctx.kv_length:
            return cached[2], cached[3]
        real = ctx.layout.attention_mask[span].to(ctx.device).bool()
        real = torch.cat([real, real.new_ones(real.shape[0], ctx.kv_length - real.shape[1])], dim=-1)
        counts = real.sum(-1, dtype=torch.float32)
        self._real = (ctx.layout, ctx.kv_length, real, counts)
        return real, counts

    # ------------------------------------------------------------------ attention hooks

    def plan(self, ctx: AttentionContext) -> Plan | None:
        if ctx.layout is None or ctx.image_free:
            return None
        if ctx.site == "vision":
            if ctx.layer == self._feature_layer and ctx.layout.vision_rows is not None and self._span("vision") \
                    is not None:
                return _EXPLICIT_PLAN
            return None
        if self._span("language") is not None and ctx.batch_size == self.row_branch.shape[0]:
            return _EXPLICIT_PLAN if self._explicit else _FUSED_PLAN
        return None

    def edit_weights(self, ctx: AttentionContext, weights: torch.Tensor) -> torch.Tensor:
        if ctx.site == "vision":
            rows = self._rows("vision")[ctx.layout.vision_rows.to(weights.device)]
            self._maps = weights[rows].detach()
            return weights
        rows = self._span("language")
        real, _ = self._real_keys(ctx, rows)
        keep = ctx.mask.to(weights.device)
        out = weights.clone()
        out[rows] = language_counterfactual(weights[rows], keep[rows], real, self.language_kind, self._generator)
        return out

    def attend(self, ctx: AttentionContext, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """The fused language counterfactual (text site, ``fused=True``): SDPA for every row, then the rows of the
        language branch overwritten with the counterfactual output (closed form; see the module docstring).
        q ``(B, H, q, D)``, k/v ``(B, Hkv, kv, D)``, mask bool ``(B, 1 or H, q, kv)``; returns ``(B, H, q, D)``."""
        n_rep = query.shape[1] // key.shape[1]
        # a plain causal mask with one query row (decode) or no cache (prefill): SDPA and the kernel need no mask
        plain = mask is ctx.mask and ctx.base_mask is None and ctx.q_length in (1, ctx.kv_length)
        k_all = key.repeat_interleave(n_rep, 1) if n_rep > 1 else key
        v_all = value.repeat_interleave(n_rep, 1) if n_rep > 1 else value
        if plain:
            out = F.scaled_dot_product_attention(query, k_all, v_all, is_causal=ctx.q_length > 1, scale=ctx.scaling)
        else:
            # left-padding query rows have no key: give them a uniform row, as the models' eager code does
            sdpa_mask = mask if ctx.q_length == 1 else mask | ~mask.any(-1, keepdim=True)
            out = F.scaled_dot_product_attention(query, k_all, v_all, attn_mask=sdpa_mask, scale=ctx.scaling)
        rows = self._span("language")
        target = out[rows]
        row_mask = None if plain else mask[rows]
        if self.language_kind == "random":
            real, _ = self._real_keys(ctx, rows)
            keep = ctx.mask[rows] if row_mask is None else row_mask
            weights = random_counterfactual((*target.shape[:3], key.shape[2]), keep, real, self._generator)
            target.copy_(torch.matmul(weights.to(query.dtype), v_all[rows]))
        else:
            counts = self._real_keys(ctx, rows)[1] if self.language_kind == "uniform" else None
            launch = self._launch
            if launch is None or ctx.is_prefill:  # checked; decode steps then skip the checks (host time per layer)
                counterfactual_attention(query[rows], key[rows], value[rows], self.language_kind, mask=row_mask,
                                         causal=ctx.causal, scale=ctx.scaling, real_keys=counts, out=target)
                self._launch = counterfactual_attention_backend(query.device)
            else:
                launch(query[rows], key[rows], value[rows], self.language_kind, ctx.scaling, ctx.causal, row_mask,
                       counts, target)
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
