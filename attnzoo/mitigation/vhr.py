"""VHR: Vision-aware Head Reinforcement (He et al., "Cracking the Code of Hallucination in LVLMs with Vision-aware
Head Divergence", ACL 2025, arXiv 2412.13949; official code jinghan1he/VHR, which we could not read).

What the paper states (Sec. 3, Algorithm 1, Sec. 4.4, App. C/D), and this pass does:

- Vision-aware Head Divergence (Eq. 4): ``VHD[l, i] = d(A[l, i](y_t | y_<t, x_V, x_T), A[l, i](y_t | y_<t, x_T))``,
  the distance between head ``i``'s output in layer ``l`` with and without the image, ``d`` = Euclidean.
  ``A[l, i]`` is the head's attention output before the output projection (Eq. 3).
- It is computed at the first generation step (``t = 0``: the query at the last prompt token, during prefill),
  with one extra forward of the prompt without the image (Sec. 4.7), and the heads chosen there are reused for
  every later token, so that the KV cache stays consistent (Sec. 3.2, "Determine the heads at the first
  generation step").
- Outliers (Eq. 6): ``VHD[l, i]`` is set to 0 when ``VHD[l, i] > mean + std`` of the layer's VHD *and*
  ``TA[l, i] > mean + std`` of the layer's ``TA = ||A[l, i](y_t | y_<t, x_T)||^2`` (a head whose output surges
  when the image is removed).
- Selection and reinforcement (Eq. 7): the heads with ``VHD > median(VHD[l, :])`` have their outputs
  multiplied by ``alpha`` (2, Sec. 4.4).
- Layer by layer (Sec. 3.2): selection and reinforcement happen in the same forward, so when layer ``l``'s VHD
  is computed the earlier reinforced layers have already been reinforced.
- Layers (Sec. 4.4): "the second and last 14 layers" for the LLaVA series (layer index 1 and 18..31 of
  LLaVA-1.5-7B's 32).

What the paper leaves open, and the choice made here (each a field, documented in the class and
docs/mitigation.md):

- Whether the image-free branch is reinforced too (``reinforce_image_free``). The paper describes one
  *additional* image-free pass and layer-by-layer selection "within a single forward pass"; by default (False)
  the image-free prompt runs once, unmodified, before the image prompt's layers are scored, and only the image
  forward is reinforced. With True, layer ``l`` is scored against an image-free forward whose earlier
  reinforced layers are scaled with the heads already chosen (both branches reinforced in lockstep); this costs
  one image-free forward, cut after layer ``l``, per reinforced layer.
- ``sigma`` in Eq. 6: sample (unbiased, ``unbiased_std=True``, torch's default) or population standard deviation.
- The distance: ``distance="euclidean"`` as Eq. 4 says. A third-party port in the public code index that says it
  follows the released code uses the squared distance and applies Eq. 6 only when the layer's VHD standard
  deviation exceeds 1; ``distance="squared"`` and ``outlier_min_std=1.0`` reproduce that reading. The median rule
  is the same under both distances; the outlier rule is not.
- Which query positions are scaled: every position of every forward after selection (the whole prompt at
  prefill, each generated token afterwards), so that keys and values of all tokens come from the same heads.
- Samples without an image (``None`` in the batch) get no reinforced heads (their VHD is 0 up to rounding).
- Models of other depths: the default layer set is layer 1 plus the last ``last_layers`` (14) layers, clipped to
  the model's depth; give ``layers=...`` to choose explicitly.

Unlike a single-sample implementation, every sample of a (left-padded) batch gets its own heads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from .._logging import get_logger, log_once
from ..mllm.attention import AttentionContext, Plan
from .base import Pass, check_range, register_pass

logger = get_logger("attnzoo.mitigation")

DISTANCES = ("euclidean", "squared")
_OUTPUTS_PLAN = Plan(outputs=True)  # frozen: shared, not rebuilt per call


class _StopForward(Exception):
    """Raised inside the image-free forward once the last layer it is needed for has run."""


def head_divergence(with_image: torch.Tensor, without_image: torch.Tensor, distance: str = "euclidean") -> torch.Tensor:
    """VHD per head: ``(B, H, D)`` head outputs with / without the image -> ``(B, H)`` float32 distances.

    ``distance`` "euclidean" is ``||a - b||_2`` (the paper's Eq. 4), "squared" is ``||a - b||_2^2``.
    """
    sq = (with_image.float() - without_image.float()).pow(2).sum(-1)
    return sq.sqrt() if distance == "euclidean" else sq


def select_heads(vhd: torch.Tensor, text_activation: torch.Tensor, outlier_filter: bool = True,
                 unbiased_std: bool = True, outlier_min_std: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's Eq. 6 and 7 for one layer, per sample.

    Args:
        vhd: ``(B, H)`` float32 head divergences.
        text_activation: ``(B, H)`` float32 ``||A(y_t | x_T)||^2``, the squared norm of each head's output
            without the image.
        outlier_filter: zero the VHD of heads above ``mean + std`` in both VHD and text activation (Eq. 6).
        unbiased_std: sample (True) or population (False) standard deviation over the layer's heads.
        outlier_min_std: apply Eq. 6 only to samples whose VHD standard deviation exceeds this (0: always).

    Returns:
        ``(selected, outliers)``: ``(B, H)`` bool each; selected = filtered VHD above the layer median (Eq. 7).
    """
    correction = 1 if unbiased_std else 0
    outliers = torch.zeros_like(vhd, dtype=torch.bool)
    filtered = vhd
    if outlier_filter:
        std = vhd.std(-1, correction=correction, keepdim=True)
        ta_bound = text_activation.mean(-1, keepdim=True) + text_activation.std(-1, correction=correction,
                                                                                 keepdim=True)
        outliers = (vhd > vhd.mean(-1, keepdim=True) + std) & (text_activation > ta_bound) & (std > outlier_min_std)
        filtered = vhd.masked_fill(outliers, 0.0)
    # torch's median is the lower middle value; "> median" selects the same heads as with the averaged median
    # whenever the two middle values differ
    selected = filtered > filtered.median(-1, keepdim=True).values
    return selected, outliers


def default_layers(num_layers: int, last_layers: int = 14, second_layer: bool = True) -> tuple[int, ...]:
    """The paper's layer set for the LLaVA series: layer 1 (the second) and the last ``last_layers``, clipped."""
    layers = set(range(max(0, num_layers - last_layers), num_layers))
    if second_layer and num_layers > 1:
        layers.add(1)
    return tuple(sorted(layers))


@register_pass
@dataclasses.dataclass
class VHR(Pass):
    """Vision-aware Head Reinforcement. Defaults are the paper's; fields marked (choice) are not fixed by it.

    Attributes:
        alpha: scale factor of the selected heads' outputs (2; Sec. 4.4). Must be > 0.
        layers: decoder layers to reinforce; None = layer 1 and the last ``last_layers`` layers (the paper's
            "second and last 14 layers" for LLaVA-1.5 / LLaVA-NeXT), clipped to the model's depth.
        last_layers: how many final layers the default set holds (14).
        second_layer: include layer 1 in the default set (True; App. C).
        outlier_filter: zero the VHD of outlier heads before the median rule (True; Eq. 6).
        distance: "euclidean" (Eq. 4) or "squared" (choice; see the module docstring).
        unbiased_std: sigma in Eq. 6 as the sample standard deviation (True; choice, torch's default).
        outlier_min_std: apply Eq. 6 only when the layer's VHD std exceeds this (0.0 = always, as the paper's text;
            choice).
        reinforce_image_free: score each layer against an image-free branch reinforced with the heads chosen in the
            earlier layers (True), or against the plain image-free forward (False; choice, see the module
            docstring).

    After a forward or a generation, :meth:`scores`, :meth:`heads` and :meth:`outliers` give per layer the
    ``(B, H)`` VHD scores, the reinforced heads and the zeroed outliers of that batch.
    """

    name: ClassVar[str] = "vhr"
    summary: ClassVar[str] = "scale the outputs of vision-aware heads (large with/without-image divergence) by alpha"

    alpha: float = 2.0
    layers: tuple[int, ...] | None = None
    last_layers: int = 14
    second_layer: bool = True
    outlier_filter: bool = True
    distance: str = "euclidean"
    unbiased_std: bool = True
    outlier_min_std: float = 0.0
    reinforce_image_free: bool = False

    def __post_init__(self) -> None:
        self._lvlm: Any = None
        self._targets: frozenset[int] = frozenset()
        self._capturing = False
        self._stop_at: int | None = None  # the image-free forward stops after this layer's attention
        self._free_batch: Any = None  # the image-free Batch of the current layout
        self._free: dict[int, torch.Tensor] | None = None  # layer -> (B, H, D) image-free outputs, last position
        self._scores: dict[int, torch.Tensor] = {}
        self._heads: dict[int, torch.Tensor] = {}
        self._outliers: dict[int, torch.Tensor] = {}
        self._scale: dict[int, torch.Tensor] = {}  # layer -> (B, 1, H, 1) in the model dtype
        super().__post_init__()

    def validate(self) -> None:
        check_range("alpha", self.alpha, 0.0, None, low_open=True)
        check_range("last_layers", self.last_layers, 0, None)
        check_range("outlier_min_std", self.outlier_min_std, 0.0, None)
        if self.distance not in DISTANCES:
            raise ValueError(f"distance = {self.distance!r} is not one of {DISTANCES}")
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
            if not self.layers:
                raise ValueError("layers is empty; give at least one decoder layer index or None for the paper's set")
            bad = [i for i in self.layers if i < 0]
            if bad:
                raise ValueError(f"layers {bad} are outside the valid range [0, num_layers - 1]")
        elif self.last_layers == 0 and not self.second_layer:
            raise ValueError("last_layers = 0 and second_layer = False leave no layer to reinforce")

    # ------------------------------------------------------------------ attach

    def on_attach(self, lvlm: Any) -> None:
        n = lvlm.num_layers
        if self.layers is not None:
            bad = [i for i in self.layers if i >= n]
            if bad:
                raise ValueError(f"layers {bad} are outside the valid range [0, {n - 1}] for this model's {n} decoder "
                                 "layers")
            targets = self.layers
        else:
            targets = default_layers(n, self.last_layers, self.second_layer)
            if self.last_layers > n:
                log_once(logger, f"VHR: last_layers = {self.last_layers} > the model's {n} layers; all layers used")
        self._targets = frozenset(targets)
        self._lvlm = lvlm
        log_once(logger, f"VHR: layers {sorted(self._targets)}, alpha={self.alpha}, distance={self.distance}")

    def on_detach(self, lvlm: Any) -> None:
        self._lvlm = None

    def on_layout(self, layout: Any) -> None:
        if self._capturing or layout is None:
            return  # the image-free forward's own layouts; or the end of a batch (its scores stay readable)
        self._free = self._free_batch = None
        self._scores, self._heads, self._outliers, self._scale = {}, {}, {}, {}

    # ------------------------------------------------------------------ the image-free forward

    def _run_image_free(self, layout: Any, stop_at: int) -> None:
        """A forward of the same prompts without images, cut after layer ``stop_at``; ``edit_outputs`` records the
        target layers' outputs at the last position (all of them, or only ``stop_at`` in lockstep mode)."""
        if self._free_batch is None:
            self._free_batch = self._lvlm.image_free(layout)
        if self._free is None:
            self._free = {}
        self._capturing, self._stop_at = True, stop_at
        try:
            with torch.no_grad():
                self._lvlm.forward(self._free_batch, image_free=True, use_cache=False, logits_to_keep=1)
        except _StopForward:
            pass  # the layers after the last one needed are not run
        finally:
            self._capturing, self._stop_at = False, None

    # ------------------------------------------------------------------ plan / edit

    def may_act(self, site: str, layer: int, is_prefill: bool) -> bool:
        # prefill: every text layer (the first call starts the image-free forward); decode: the reinforced layers
        return site == "text" and (is_prefill or layer in self._scale)

    def plan(self, ctx: AttentionContext) -> Plan | None:
        if ctx.site != "text" or ctx.layout is None:
            return None
        if ctx.image_free:
            return _OUTPUTS_PLAN if self._capturing and ctx.layer in self._targets else None
        if ctx.is_prefill:
            if self.reinforce_image_free:
                if ctx.layer not in self._targets:
                    return None
                # the image-free branch up to this layer, its earlier layers reinforced with the heads chosen so far
                self._run_image_free(ctx.layout, ctx.layer)
            elif self._free is None:
                # first text attention call of the prefill: one plain image-free forward serves every target layer
                self._run_image_free(ctx.layout, max(self._targets))
            return _OUTPUTS_PLAN if ctx.layer in self._targets else None
        return _OUTPUTS_PLAN if ctx.layer in self._scale else None

    def edit_outputs(self, ctx: AttentionContext, outputs: torch.Tensor) -> torch.Tensor:
        if ctx.image_free:
            if self.reinforce_image_free and ctx.layer != self._stop_at:
                return outputs * self._scale[ctx.layer]  # an earlier layer: its heads are chosen already
            self._free[ctx.layer] = outputs[:, -1].float()  # (B, H, D): the query of the first generated token
            if ctx.layer == self._stop_at:
                raise _StopForward
            return outputs
        if ctx.is_prefill:
            self._select(ctx, outputs[:, -1])
        return outputs * self._scale[ctx.layer]

    def _select(self, ctx: AttentionContext, with_image: torch.Tensor) -> None:
        without = self._free[ctx.layer].to(with_image.device)
        vhd = head_divergence(with_image, without, self.distance)
        heads, outliers = select_heads(vhd, without.pow(2).sum(-1), self.outlier_filter, self.unbiased_std,
                                       self.outlier_min_std)
        has_image = torch.tensor(ctx.layout.has_image, dtype=torch.bool, device=heads.device)
        heads = heads & has_image[:, None]
        self._scores[ctx.layer], self._heads[ctx.layer], self._outliers[ctx.layer] = vhd, heads, outliers
        scale = torch.where(heads, torch.tensor(float(self.alpha), device=heads.device), 1.0)
        self._scale[ctx.layer] = scale.to(with_image.dtype)[:, None, :, None]

    # ------------------------------------------------------------------ inspection

    def scores(self) -> dict[int, torch.Tensor]:
        """VHD of the last batch at its first generation step: layer -> ``(B, H)`` float32 (before outlier zeroing)."""
        return dict(self._scores)

    def heads(self) -> dict[int, torch.Tensor]:
        """The reinforced heads of the last batch: layer -> ``(B, H)`` bool."""
        return dict(self._heads)

    def outliers(self) -> dict[int, torch.Tensor]:
        """The heads whose VHD was zeroed by the outlier rule (Eq. 6): layer -> ``(B, H)`` bool."""
        return dict(self._outliers)
