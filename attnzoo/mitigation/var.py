"""VAR: Visual Attention Redistribution (Kang et al., "See What You Are Told: Visual Attention Sink in Large
Multimodal Models", ICLR 2025; official code MICV-yonsei/VisAttnSink).

Sink tokens are tokens whose RMS-normalised residual stream is massive (above ``tau``) in the model's sink
dimensions; they are found during prefill, separately for each layer from ``first_layer`` on, and reused
for every decode step. In each such layer (the last one skipped), a (head, query) cell is *image-centric*
when at least ``summ`` of its attention lies on the image and at most ``rho`` of its image attention lies on
visual sink tokens. There, the attention on every sink key (visual and textual) is multiplied by ``p`` and
the freed mass ``(1 - p) * sum(sink attention)`` is given to the non-sink image tokens in proportion to
their attention. During prefill only queries after the image are redistributed (decode queries always are).

Unlike the official code (batch size 1), sinks, image spans and selections are per sample, so left-padded
batches of any size work.

Two implementations of the same edit (``fused`` field). The official code runs the whole model with eager
attention to get the weights. Here the edit is a re-weighting of four key groups (other text, non-sink image,
visual sink, text sink): the edited output of a cell is ``O_text + p * (O_vsink + O_tsink) + (1 + budget /
M_image) * O_image`` with ``O_g`` the cell's attention output restricted to group g and ``M_g`` its mass, and
the selection needs only the masses. ``fused=True`` (default) runs the whole edit in one fused kernel
(:func:`attnzoo.kernels.grouped_attention.var_attention`: one online softmax accumulates ``O_g`` and ``M_g``, and
its epilogue selects the cells and writes the edited output; no attention matrix, one launch per edited layer,
the prompt's group ids and per-sample constants computed once per batch and reused at every decode step);
``fused=False`` edits the explicit post-softmax weights (float32 matrix per layer), kept for comparison and as a
cross-check. ``combine_groups`` (the same edit on the outputs of :func:`attnzoo.kernels.key_group_attention`)
serves runtimes that plan key groups without the fused call.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .._logging import get_logger, log_once
from ..kernels.grouped_attention import var_attention, var_attention_backend
from ..mllm.attention import AttentionContext, Plan
from .base import Pass, check_range, register_pass

logger = get_logger("attnzoo.mitigation")

_FUSED_PLAN, _EXPLICIT_PLAN = Plan(key_groups=True), Plan(weights=True)

# Sink dimensions published with the paper's code (its constants: llama-v2-7b -> 2533, 1415 and llama-v2-13b ->
# 2100, 4743, with LLaVA-1.5-7B on the 7B backbone and LLaVA-1.5-13B / LLaVA-1.6-Vicuna-13B on the 13B one).
# Keys are regular expressions matched against the model's name or path (lower case).
KNOWN_SINK_DIMS: dict[str, tuple[int, ...]] = {
    r"llava-(v)?1\.5-7b": (2533, 1415),
    r"llava-(v)?1\.5-13b": (2100, 4743),
    r"llava-(v)?1\.6-vicuna-13b": (2100, 4743),
}


def known_sink_dims(name_or_path: str) -> tuple[int, ...] | None:
    """The published sink dimensions for a model name or path, or None when the model is not in the table."""
    low = name_or_path.lower()
    for pattern, dims in KNOWN_SINK_DIMS.items():
        if re.search(pattern, low):
            return dims
    return None


def rms_normalize(hidden: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``hidden / rms(hidden)`` over the last dim, in float32 (no learned weight), as the paper measures sinks."""
    h = hidden.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


@torch.no_grad()
def find_sink_dims(lvlm: Any, images: Sequence[Any], prompts: Sequence[str] | None = None, top: int = 2,
                   first_layer: int = 2) -> tuple[int, ...]:
    """Find a model's sink dimensions from data, as the paper does: the hidden dimensions with massive activations.

    Runs the prompts (default: a description request per image) through the model, RMS-normalises the residual
    stream entering every decoder layer from ``first_layer`` on, takes for each hidden dimension its largest
    absolute value over tokens, and returns the ``top`` dimensions whose median over layers is largest (massive
    activations sit in the same few dimensions in every layer). Returns a tuple of ints.
    """
    if prompts is None:
        prompts = ["Describe the image."] * len(images)
    batch = lvlm.prepare(list(images), list(prompts))
    real = batch.layout.attention_mask.bool()
    per_layer: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        values = rms_normalize(hidden).abs().masked_fill(~real[..., None].to(hidden.device), 0)
        per_layer.append(values.amax(dim=(0, 1)).cpu())

    layers = list(lvlm.decoder_layers)[first_layer:]
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        lvlm.forward(batch)
    finally:
        for h in handles:
            h.remove()
    if not per_layer:
        raise ValueError(f"the model has {lvlm.num_layers} layers, none at or after first_layer={first_layer}")
    score = torch.stack(per_layer).median(dim=0).values
    return tuple(int(i) for i in score.topk(top).indices)


@register_pass
@dataclasses.dataclass
class VAR(Pass):
    """Visual Attention Redistribution. Fields are the paper's hyper-parameters (defaults = the paper's).

    Attributes:
        tau: sink threshold on the RMS-normalised residual stream in the sink dimensions (20).
        rho: a cell is image-centric only if at most this share of its image attention is on visual sinks (0.5).
        summ: ... and at least this much of its attention is on the image (0.2).
        p: attention on sink keys is multiplied by p; the rest is redistributed (0.6).
        sink_dims: the model's sink dimensions; None looks the model up in :data:`KNOWN_SINK_DIMS` when applied
            (use :func:`find_sink_dims` for other models).
        first_layer: sinks are detected (and attention redistributed) from this layer on (2).
        except_last_layer: leave the last decoder layer alone (True).
        fused: implementation switch, not a paper hyper-parameter: fused key-group attention (True) or the
            explicit post-softmax weights (False); both compute the same edit.
    """

    name: ClassVar[str] = "var"
    summary: ClassVar[str] = "redistribute attention from visual sink tokens to the image in image-centric heads"

    tau: float = 20.0
    rho: float = 0.5
    summ: float = 0.2
    p: float = 0.6
    sink_dims: tuple[int, ...] | None = None
    first_layer: int = 2
    except_last_layer: bool = True
    fused: bool = True

    # key groups of the fused path
    OTHER, IMAGE, VISUAL_SINK, TEXT_SINK = 0, 1, 2, 3
    NUM_GROUPS: ClassVar[int] = 4
    # sinks are found at prefill only: decode steps run without the per-layer residual hooks
    residual_at_decode: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self._sinks: dict[int, torch.Tensor] = {}
        self._skipped_layer = -1  # the last decoder layer when except_last_layer (set on attach)
        self._groups: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._dims: tuple[int, ...] | None = None
        self._launch: Any = None  # var_attention's backend function once a checked call ran on this batch
        super().__post_init__()

    def validate(self) -> None:
        check_range("tau", self.tau, 0.0, None, low_open=True)
        check_range("rho", self.rho, 0.0, 1.0)
        check_range("summ", self.summ, 0.0, 1.0)
        check_range("p", self.p, 0.0, 1.0)
        check_range("first_layer", self.first_layer, 0, None)
        if self.sink_dims is not None:
            self.sink_dims = tuple(int(d) for d in self.sink_dims)
            if not self.sink_dims:
                raise ValueError("sink_dims is empty; give at least one hidden dimension or None")

    # ------------------------------------------------------------------ attach

    def on_attach(self, lvlm: Any) -> None:
        if self.first_layer >= lvlm.num_layers:
            raise ValueError(f"first_layer = {self.first_layer} is outside the valid range [0, {lvlm.num_layers - 1}] "
                             f"for this model's {lvlm.num_layers} decoder layers")
        dims = self.sink_dims
        if dims is None:
            name = str(getattr(lvlm.model.config, "_name_or_path", "") or "")
            dims = known_sink_dims(name)
            if dims is None:
                raise ValueError(
                    f"VAR: no published sink dimensions for {name or 'this model'!r}; pass sink_dims=... or find "
                    "them with attnzoo.mitigation.var.find_sink_dims(lvlm, images)")
        bad = [d for d in dims if not 0 <= d < lvlm.hidden_size]
        if bad:
            raise ValueError(f"sink_dims {bad} are outside the valid range [0, {lvlm.hidden_size - 1}] "
                             f"(hidden size {lvlm.hidden_size})")
        self._dims = tuple(dims)
        self._skipped_layer = lvlm.num_layers - 1 if self.except_last_layer else -1
        log_once(logger, f"VAR: sink dims {self._dims}, tau={self.tau}, rho={self.rho}, summ={self.summ}, p={self.p}")

    def on_layout(self, layout: Any) -> None:
        if layout is not None:
            self._sinks = {}  # a new batch: its sinks are found again at its prefill (kept after it ends)
            self._groups = {}
            self._launch = None

    # ------------------------------------------------------------------ sink detection (prefill)

    def edit_residual(self, ctx: AttentionContext, hidden: torch.Tensor) -> torch.Tensor | None:
        if not ctx.is_prefill or ctx.layer < self.first_layer or ctx.layout is None or ctx.image_free:
            return None
        values = rms_normalize(hidden)[..., list(self._dims)].abs().amax(-1)  # (B, L)
        real = ctx.layout.attention_mask.to(hidden.device).bool()
        self._sinks[ctx.layer] = (values > self.tau) & real
        return None

    # ------------------------------------------------------------------ redistribution

    def may_act(self, site: str, layer: int, is_prefill: bool) -> bool:
        # the layers with sinks of the current batch (found at its prefill, before each layer's attention)
        return site == "text" and layer in self._sinks and layer != self._skipped_layer

    def plan(self, ctx: AttentionContext) -> Plan | None:
        if ctx.site != "text" or ctx.layout is None or ctx.image_free or ctx.layer not in self._sinks:
            return None
        if self.except_last_layer and ctx.layer == ctx.num_layers - 1:
            return None
        return _FUSED_PLAN if self.fused else _EXPLICIT_PLAN  # frozen: shared, not rebuilt per call

    def edit_weights(self, ctx: AttentionContext, weights: torch.Tensor) -> torch.Tensor:
        layout, kv = ctx.layout, ctx.kv_length
        image = layout.image_keys(kv).to(weights.device)[:, None, None, :]  # (B, 1, 1, kv)
        sink = layout.keys(self._sinks[ctx.layer], kv).to(weights.device)[:, None, None, :]
        visual_sink = sink & image
        has_visual_sink = visual_sink.flatten(1).any(1)[:, None, None]  # (B, 1, 1)

        image_attention = weights * image
        total_on_image = image_attention.sum(-1)  # (B, h, q)
        n_image = image.sum(-1).to(weights.dtype)
        # the official share keeps +1e-6 per image key in the denominator
        portion = (weights * visual_sink).sum(-1) / (total_on_image + 1e-6 * n_image)
        selected = (portion <= self.rho) & (total_on_image >= self.summ) & has_visual_sink
        if ctx.is_prefill:
            last_image = torch.where(image[:, 0, 0], torch.arange(kv, device=weights.device), -1).amax(-1)
            selected &= ctx.query_positions[None, None, :] > last_image[:, None, None]
        if not bool(selected.any()):
            return weights

        budget = (1.0 - self.p) * (weights * sink).sum(-1, keepdim=True)  # freed mass, text + visual sinks
        receivers = weights * (image & ~visual_sink)
        share = receivers / receivers.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        redistributed = torch.where(sink, weights * self.p, weights) + budget * share
        return torch.where(selected[..., None], redistributed, weights)

    # ------------------------------------------------------------------ fused path (key groups)

    def _layer_groups(self, ctx: AttentionContext) -> tuple[torch.Tensor, ...]:
        """Per layer, computed once per batch (reused at every decode step): prompt key groups ``(B, L)`` int32;
        ``1e-6 * (number of image keys)``, "has a visual sink" and the last image position, each ``(B, 1, 1)``;
        the group weights of an edited cell without the image gain ``(G,)`` and the image group's unit vector;
        for :func:`var_attention`: the position after which queries are redistributed ``(B,)`` int32 (past any
        sequence for a sample without visual sinks) and ``1e-6 * (number of image keys)`` ``(B,)`` float32."""
        cached = self._groups.get(ctx.layer)
        if cached is None:
            image = ctx.layout.image_mask.to(ctx.device)
            sink = self._sinks[ctx.layer].to(ctx.device)
            ids = torch.where(image, torch.where(sink, self.VISUAL_SINK, self.IMAGE),
                              torch.where(sink, self.TEXT_SINK, self.OTHER)).to(torch.int32).contiguous()
            positions = torch.arange(image.shape[1], device=ctx.device)
            edited = torch.ones(self.NUM_GROUPS, device=ctx.device)
            edited[[self.VISUAL_SINK, self.TEXT_SINK]] = self.p
            image_axis = torch.zeros(self.NUM_GROUPS, device=ctx.device)
            image_axis[self.IMAGE] = 1.0
            image_eps = 1e-6 * image.sum(-1).float()
            has_visual_sink = (sink & image).any(-1)
            last_image = torch.where(image, positions, -1).amax(-1)
            after = torch.where(has_visual_sink, last_image, 2**30).to(torch.int32)
            cached = (ids, image_eps[:, None, None], has_visual_sink[:, None, None], last_image[:, None, None],
                      edited, image_axis, after, image_eps)
            self._groups[ctx.layer] = cached
        return cached

    def key_groups(self, ctx: AttentionContext) -> tuple[torch.Tensor, int]:
        ids = self._layer_groups(ctx)[0]
        extra = ctx.kv_length - ids.shape[1]  # generated tokens: neither image nor sink
        return (torch.nn.functional.pad(ids, (0, extra), value=self.OTHER) if extra > 0 else ids), self.NUM_GROUPS

    def combine_groups(self, ctx: AttentionContext, outputs: torch.Tensor, masses: torch.Tensor) -> torch.Tensor:
        _, image_eps, has_visual_sink, last_image, edited, image_axis, _, _ = self._layer_groups(ctx)
        m_image, m_visual_sink, m_text_sink = (masses[..., g] for g in (self.IMAGE, self.VISUAL_SINK, self.TEXT_SINK))
        total_on_image = m_image + m_visual_sink  # (B, h, q)
        # the official share keeps +1e-6 per image key in the denominator
        portion = m_visual_sink / (total_on_image + image_eps)
        selected = (portion <= self.rho) & (total_on_image >= self.summ) & has_visual_sink
        if ctx.is_prefill:
            selected &= ctx.query_positions[None, None, :] > last_image
        # Selected cells: sink keys keep p of their weight, and the freed mass (1 - p) * (sink mass) goes to the
        # non-sink image keys in proportion to their weight, i.e. the image group's output grows by that mass
        # over the image group's mass. Other cells: every group weight 1 (the plain attention).
        gain = (1.0 - self.p) * (m_visual_sink + m_text_sink) / m_image.clamp_min(torch.finfo(torch.float32).tiny)
        weights = torch.where(selected[..., None], torch.addcmul(edited, gain[..., None], image_axis), 1.0)
        return (weights[..., None] * outputs).sum(-2)

    def fused_key_groups(self, ctx: AttentionContext, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         mask: torch.Tensor | None) -> torch.Tensor:
        """The edited outputs ``(B, q, H, D)`` of all heads from one :func:`var_attention` call: the prompt's
        group ids (keys after the prompt are generated text, group 0), no per-step allocation but the output.

        Prefill calls go through :func:`var_attention`'s argument checks; decode calls of the same batch (same
        tensors' kinds, longer keys) go straight to its backend function: at decode this runs once per edited
        layer per token, and the checks cost about as much host time as the kernel launch."""
        ids, _, _, _, _, _, after, image_eps = self._layer_groups(ctx)
        launch = self._launch
        if launch is None or ctx.is_prefill:
            out = var_attention(query, key, value, ids, after, image_eps, self.p, self.summ, self.rho,
                                scale=ctx.scaling, causal=ctx.causal, mask=mask)
            self._launch = var_attention_backend(query.device)
            return out
        return launch(query, key, value, ids, after, image_eps, self.p, self.summ, self.rho, ctx.scaling, ctx.causal,
                      mask, None)

    def sinks(self) -> dict[int, torch.Tensor]:
        """The sink tokens found at the last prefill: layer -> ``(B, L)`` bool over prompt positions."""
        return dict(self._sinks)
