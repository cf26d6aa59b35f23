"""The one attention function every wrapped LVLM runs through, and the protocol passes implement.

``register()`` adds ``attnzoo_attention`` to ``transformers.AttentionInterface`` under the name "attnzoo" and
registers the SDPA mask builder for that name in ``AttentionMaskInterface`` (without it a custom name gets
``attention_mask=None``, i.e. no causal or padding mask). :func:`attnzoo.mllm.load` sets "attnzoo" on the
whole model (decoder and vision tower) and tags each attention module with its site and layer.

When no pass is attached the function forwards its arguments unchanged to transformers' SDPA function (or
to an eager implementation with ``attn_backend="eager"``), so outputs are bit-identical to the plain model.
When passes are attached, each is first asked whether it may act at all in the call (``may_act(site, layer,
is_prefill)``, a cheap check before any context is built: during decoding most layers never see a context),
then for a :class:`Plan` (site, layer, step); calls no pass plans for stay on SDPA. Otherwise:

1. ``edit_mask``: passes may change the boolean mask ``(B, 1 or H, q, kv)``, True = attend.
2. Heads that some pass reads or edits scores/weights of are computed explicitly (float32 softmax, as the
   models' eager code); all other heads go through SDPA with the (edited) mask.
   ``edit_scores`` sees pre-softmax scores ``(B, h, q, kv)`` float32 (scaled, masked with the dtype minimum);
   ``edit_weights`` sees post-softmax weights ``(B, h, q, kv)`` float32; ``h`` = the pass's planned heads.
3. ``edit_outputs`` sees per-head outputs ``(B, q, H, D)`` before ``o_proj`` (all heads).

A pass may instead ``replace`` the whole computation (``attend``), e.g. with a fused kernel, or plan
``key_groups``: a re-weighting of whole groups of keys decided per (head, query) from the attention mass on
each group (VAR). The runtime then asks the pass for a group id per key (``key_groups``), computes per-group
partial outputs and masses with :func:`attnzoo.kernels.key_group_attention` (one fused pass, no attention
matrix) and hands them to ``combine_groups``, which returns the heads' outputs. A pass whose re-weighting
is fused into a kernel returns the finished outputs from ``fused_key_groups`` instead (all heads planned).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from .._logging import get_logger

if TYPE_CHECKING:
    from .layout import TokenLayout

logger = get_logger("attnzoo.mllm")

ATTN_NAME = "attnzoo"
SITES = ("text", "vision")


@dataclass(frozen=True)
class Plan:
    """What a pass does in one attention call.

    Attributes:
        heads: query-head indices whose scores/weights the pass reads or edits; ``None`` = all heads. Heads
            outside every pass's plan run on SDPA, so a narrow plan is cheap.
        mask, scores, weights, outputs: call ``edit_mask`` / ``edit_scores`` / ``edit_weights`` /
            ``edit_outputs`` in this call.
        replace: call ``attend`` to compute the whole attention (no other pass may plan scores/weights/replace
            in the same call).
        key_groups: compute ``heads`` with the fused key-group attention and ``combine_groups`` (no other pass
            may plan scores/weights/replace/key_groups in the same call; mask and output edits combine).
    """

    heads: Sequence[int] | torch.Tensor | None = None
    mask: bool = False
    scores: bool = False
    weights: bool = False
    outputs: bool = False
    replace: bool = False
    key_groups: bool = False

    @property
    def explicit(self) -> bool:
        """True when the call needs explicit scores or weights for ``heads``."""
        return self.scores or self.weights


@dataclass
class AttentionContext:
    """What a pass knows about one attention call (one layer, one forward step).

    Attributes:
        site: "text" (language-model decoder) or "vision" (vision tower encoder).
        layer: layer index within the site (0-based).
        num_layers: number of layers at the site.
        num_heads, num_kv_heads, head_dim: attention shape of the module.
        batch_size, q_length, kv_length: this call's shapes.
        query_positions: ``(q_length,)`` long, positions of the queries in the padded sequence
            (``kv_length - q_length + i``); keys are positions ``0 .. kv_length - 1``.
        is_prefill: True for the first forward of a sequence (no cached keys before it).
        step: decode step: 0 at prefill, ``t`` when the query is generated token ``t``'s successor input.
        layout: the :class:`TokenLayout` of the batch (``None`` when the model is called outside
            :meth:`LVLM.use_layout`). At the vision site, ``layout.vision_rows`` maps the rows of the vision
            batch to samples (CLIP towers) and ``layout.image_samples`` the images to samples.
        image_free: True during the image-free forward (:meth:`LVLM.image_free_forward`).
        module: the attention module (``q_proj`` ... ``o_proj`` live here).
        heads: the query heads the tensors handed to the pass cover (set per pass; ``None`` = all heads).
        scaling: the softmax scale.
    """

    site: str
    layer: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    batch_size: int
    q_length: int
    kv_length: int
    is_prefill: bool
    step: int
    layout: TokenLayout | None
    image_free: bool
    module: torch.nn.Module
    scaling: float
    causal: bool
    device: torch.device
    base_mask: torch.Tensor | None = None
    heads: torch.Tensor | None = None

    @cached_property
    def query_positions(self) -> torch.Tensor:
        return torch.arange(self.kv_length - self.q_length, self.kv_length, device=self.device)

    @cached_property
    def mask(self) -> torch.Tensor:
        """``(B, 1, q, kv)`` bool, True where a query may attend to a key (causal + padding), before edits."""
        m = self.base_mask
        if m is not None and m.dtype != torch.bool:
            m = m > torch.finfo(m.dtype).min / 2  # additive float mask (0 / dtype min) -> keep-mask
        if m is None:
            if self.causal:
                m = self.query_positions[:, None] >= torch.arange(self.kv_length, device=self.device)[None, :]
            else:
                m = torch.ones(self.q_length, self.kv_length, dtype=torch.bool, device=self.device)
            m = m[None, None]
        return m.expand(self.batch_size, -1, -1, -1)

    def with_heads(self, heads: torch.Tensor | None) -> AttentionContext:
        """A copy whose ``heads`` names the query heads of the tensors handed to a pass (``self`` when unchanged)."""
        if heads is None and self.heads is None:
            return self
        c = copy.copy(self)  # shallow: shares the cached mask
        c.heads = heads
        return c


class AttentionPass:
    """Base class of everything that changes an LVLM's attention; override what you need.

    ``site`` selects the decoder ("text") or the vision tower ("vision"). ``plan(ctx)`` decides per call
    whether and how the pass acts; the default plan runs every overridden ``edit_*`` hook on all heads of
    every layer at the pass's site. Override ``plan`` to touch only some layers/heads/steps (everything
    else stays on SDPA). Attach with ``handle = lvlm.attach(pass_obj)`` (a context manager; ``remove()``
    detaches). Hooks must not change tensor shapes; they may edit in place or return new tensors.
    """

    site: str = "text"
    #: False: ``edit_residual`` acts only in forwards without cached keys (prefill, image-free forwards), so the
    #: wrapper installs the per-layer residual hooks only for those forwards and decoding runs without them.
    residual_at_decode: bool = True

    def may_act(self, site: str, layer: int, is_prefill: bool) -> bool:
        """Cheap pre-check, called before any :class:`AttentionContext` is built: False when :meth:`plan` would
        certainly return None (or a plan that does nothing) for an attention call at ``site`` / ``layer``
        (``is_prefill``: no cached keys before the call). The default, True, always asks :meth:`plan`. Override it
        with a set lookup or two (it runs once per pass per layer per decoded token); it must not read tensors."""
        return True

    def plan(self, ctx: AttentionContext) -> Plan | None:
        """The pass's plan for this call, or None to leave it alone."""
        if ctx.site != self.site:
            return None
        cls = type(self)
        base = AttentionPass
        return Plan(
            heads=None,
            mask=cls.edit_mask is not base.edit_mask,
            scores=cls.edit_scores is not base.edit_scores,
            weights=cls.edit_weights is not base.edit_weights,
            outputs=cls.edit_outputs is not base.edit_outputs,
            replace=cls.attend is not base.attend,
        )

    def edit_mask(self, ctx: AttentionContext, mask: torch.Tensor) -> torch.Tensor:
        """Return the keep-mask to use: bool ``(B, 1 or H, q, kv)``, True = attend."""
        return mask

    def edit_scores(self, ctx: AttentionContext, scores: torch.Tensor) -> torch.Tensor:
        """Return pre-softmax scores ``(B, h, q, kv)`` float32 for the heads ``ctx.heads`` (masked entries hold
        the float32 minimum; keep them there unless you mean to unmask)."""
        return scores

    def edit_weights(self, ctx: AttentionContext, weights: torch.Tensor) -> torch.Tensor:
        """Return post-softmax weights ``(B, h, q, kv)`` float32 for the heads ``ctx.heads``."""
        return weights

    def edit_outputs(self, ctx: AttentionContext, outputs: torch.Tensor) -> torch.Tensor:
        """Return per-head outputs ``(B, q, H, D)`` (all heads, before ``o_proj``), in the model dtype."""
        return outputs

    def attend(self, ctx: AttentionContext, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """Compute the attention yourself: q ``(B, H, q, D)``, k/v ``(B, Hkv, kv, D)`` (not repeated for GQA),
        mask bool ``(B, 1 or H, q, kv)``; return ``(B, H, q, D)`` in the input dtype."""
        raise NotImplementedError(f"{type(self).__name__} plans replace=True but does not define attend()")

    def key_groups(self, ctx: AttentionContext) -> tuple[torch.Tensor, int]:
        """For a ``Plan(key_groups=True)``: ``(group ids, G)`` with group ids ``(B, kv)`` integer in ``[0, G)``
        (negative = key removed) on ``ctx.device``."""
        raise NotImplementedError(f"{type(self).__name__} plans key_groups=True but does not define key_groups()")

    def combine_groups(self, ctx: AttentionContext, outputs: torch.Tensor, masses: torch.Tensor) -> torch.Tensor:
        """For a ``Plan(key_groups=True)``: per-group partial outputs ``(B, h, q, G, D)`` float32 and masses
        ``(B, h, q, G)`` float32 of the heads ``ctx.heads`` (``outputs.sum(-2)`` is the plain attention) ->
        the heads' outputs ``(B, h, q, D)`` (any float dtype; cast to the model dtype by the runtime)."""
        return outputs.sum(-2)

    def fused_key_groups(self, ctx: AttentionContext, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         mask: torch.Tensor | None) -> torch.Tensor | None:
        """For a ``Plan(key_groups=True)`` on all heads: the finished outputs ``(B, q, H, D)`` in the model dtype
        from one fused call, or None (default) to go through ``key_groups`` and ``combine_groups``. q
        ``(B, H, q, D)``, k/v ``(B, Hkv, kv, D)``; ``mask`` bool keep-mask ``(B, 1 or H, q, kv)`` or None for a
        plain causal call."""
        return None

    def edit_residual(self, ctx: AttentionContext, hidden: torch.Tensor) -> torch.Tensor | None:
        """Text site only: called with the residual stream ``(B, q, hidden)`` entering decoder layer
        ``ctx.layer`` (before its attention); return a replacement or None to keep it. ``ctx.kv_length`` is
        the length the keys will have after this step."""
        return None

    def on_layout(self, layout: TokenLayout | None) -> None:
        """Called when a batch's layout becomes active (start of a forward/generation) and when it ends
        (``None``): reset per-generation state here."""

    def on_attach(self, lvlm: Any) -> None:
        """Called by ``lvlm.attach``; validate against the model here (raise ValueError if inapplicable)."""

    def on_detach(self, lvlm: Any) -> None:
        """Called when the handle is removed."""


@dataclass
class _Site:
    """Tag set on each attention module by the LVLM wrapper."""

    runtime: Any  # the LVLM's _Runtime
    site: str
    layer: int
    num_layers: int


def eager_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                    causal: bool = True) -> torch.Tensor:
    """Plain attention as the models' eager code computes it; returns ``(B, q, H, D)``.

    q ``(B, H, q, D)``, k/v ``(B, Hkv, kv, D)``; ``mask`` bool keep-mask ``(B, 1|H, q, kv)``, additive float, or
    None (then causal, lower-right aligned, when ``causal``). Softmax in float32, cast back to the input dtype.
    """
    n_rep = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1) if n_rep > 1 else key
    value = value.repeat_interleave(n_rep, dim=1) if n_rep > 1 else value
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    q_len, kv_len = query.shape[2], key.shape[2]
    if mask is None and causal and q_len > 1:
        mask = (torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
                >= torch.arange(kv_len, device=query.device)[None, :])
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros((), dtype=w.dtype, device=w.device).masked_fill(~mask, torch.finfo(w.dtype).min)
        w = w + mask
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = torch.nn.functional.dropout(w, p=dropout, training=module.training)
    return torch.matmul(w, value).transpose(1, 2).contiguous()


def _default_attention(backend: str, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None,
                       dropout: float, kwargs: dict[str, Any]) -> tuple[torch.Tensor, None]:
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if backend == "eager":
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        return eager_attention(module, query, key, value, attention_mask, scaling, dropout, causal), None
    return _SDPA[0](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def attnzoo_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` function "attnzoo": q ``(B, H, q, D)``, k/v ``(B, Hkv, kv, D)`` -> ``(B, q, H, D)``.

    Routes to the attached passes of the module's LVLM (see the module docstring), else to SDPA/eager.
    """
    site: _Site | None = getattr(module, "_attnzoo_site", None)
    if site is None:
        return _default_attention("sdpa", module, query, key, value, attention_mask, scaling, dropout, kwargs)
    runtime = site.runtime
    if runtime.passes:
        # cheap pre-check before any context is built: during decoding most layers are left alone by every pass
        is_prefill = query.shape[2] == key.shape[2]
        for p in runtime.passes:
            if p.may_act(site.site, site.layer, is_prefill):
                return runtime.run_attention(site, module, query, key, value, attention_mask, scaling, dropout,
                                             kwargs)
    return _default_attention(runtime.backend, module, query, key, value, attention_mask, scaling, dropout, kwargs)


def _head_list(heads: Sequence[int] | torch.Tensor | None, num_heads: int) -> tuple[int, ...]:
    if heads is None:
        return tuple(range(num_heads))
    out = tuple(int(h) for h in (heads.flatten().tolist() if isinstance(heads, torch.Tensor) else heads))
    bad = [h for h in out if not 0 <= h < num_heads]
    if bad:
        raise ValueError(f"plan heads {bad} out of range [0, {num_heads})")
    return out


_INDEX_CACHE: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


def _index(heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A cached long tensor of ``heads`` on ``device`` (no host-to-device copy per call)."""
    key = (heads, device)
    idx = _INDEX_CACHE.get(key)
    if idx is None:
        if len(_INDEX_CACHE) > 4096:
            _INDEX_CACHE.clear()
        idx = _INDEX_CACHE[key] = torch.tensor(heads, dtype=torch.long, device=device)
    return idx


def _take(x: torch.Tensor, heads: tuple[int, ...]) -> torch.Tensor:
    """``x[:, heads]`` as a view when ``heads`` is a contiguous range (the common case)."""
    if heads == tuple(range(heads[0], heads[0] + len(heads))):
        return x[:, heads[0]:heads[0] + len(heads)]
    return x[:, _index(heads, x.device)]


def _put(x: torch.Tensor, heads: tuple[int, ...], value: torch.Tensor) -> None:
    if heads == tuple(range(heads[0], heads[0] + len(heads))):
        x[:, heads[0]:heads[0] + len(heads)] = value
    else:
        x[:, _index(heads, x.device)] = value


def run_passes(passes: Sequence[AttentionPass], ctx: AttentionContext, backend: str, module: torch.nn.Module,
               query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
               scaling: float, dropout: float, kwargs: dict[str, Any]) -> tuple[torch.Tensor, None]:
    """Run one attention call with ``passes`` (each asked for its plan here). See the module docstring.

    Host work matters: during decoding this runs once per edited layer per token, so the keep-mask tensor
    (``ctx.mask``) is built only when some branch reads it, and a plan that only edits outputs or takes over
    all heads with a fused key-group call goes straight to it."""
    plans = []
    takes_attention = False  # some plan edits the mask or takes over scores, weights or the whole computation
    for p in passes:
        pl = p.plan(ctx)
        if pl is None:
            continue
        if pl.mask or pl.scores or pl.weights or pl.replace or pl.key_groups:
            takes_attention = True
        elif not pl.outputs:
            continue
        plans.append((p, pl))
    if not plans:
        return _default_attention(backend, module, query, key, value, attention_mask, scaling, dropout, kwargs)
    if takes_attention:
        out = _changed_attention(plans, ctx, backend, module, query, key, value, attention_mask, scaling, dropout,
                                 kwargs)
    else:  # only per-head outputs change: the attention itself is the plain one
        out, _ = _default_attention(backend, module, query, key, value, attention_mask, scaling, dropout, kwargs)
    out = out.contiguous()
    for p, pl in plans:
        if pl.outputs:
            out = p.edit_outputs(ctx.with_heads(None), out)
    return out, None


def _changed_attention(plans: list[tuple[AttentionPass, Plan]], ctx: AttentionContext, backend: str,
                       module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float, dropout: float,
                       kwargs: dict[str, Any]) -> torch.Tensor:
    """The attention of a call in which some plan edits the mask or takes over weights; returns ``(B, q, H, D)``."""
    if len(plans) == 1 and ctx.base_mask is None:  # e.g. VAR while decoding: one fused call, nothing else to do
        p, pl = plans[0]
        if pl.key_groups and pl.heads is None and not (pl.mask or pl.scores or pl.weights or pl.replace):
            return _grouped_heads(p, None, ctx, module, query, key, value, None, scaling, dropout)
    num_heads, num_kv = query.shape[1], key.shape[1]
    n_rep = num_heads // num_kv
    edits_mask = any(pl.mask for _, pl in plans)
    grouped = [(p, pl) for p, pl in plans if pl.key_groups and (pl.heads is None or len(pl.heads) > 0)]
    replacers = [(p, pl) for p, pl in plans if pl.replace]
    explicit = [(p, pl) for p, pl in plans if pl.explicit and (pl.heads is None or len(pl.heads) > 0)]
    if not (grouped or replacers or explicit or edits_mask):  # plans on empty head sets: the plain attention
        return _default_attention(backend, module, query, key, value, attention_mask, scaling, dropout, kwargs)[0]

    # a plain causal call of a key-group plan needs no mask tensor: the kernel applies causality itself
    mask = None if grouped and ctx.base_mask is None and not edits_mask else ctx.mask
    for p, pl in plans:
        if pl.mask:
            mask = p.edit_mask(ctx, mask)
            if mask.dtype != torch.bool or mask.dim() != 4:
                raise ValueError(f"{type(p).__name__}.edit_mask must return a 4-D bool mask, got "
                                 f"{mask.dtype} of shape {tuple(mask.shape)}")

    if grouped:
        if len(grouped) > 1 or replacers or explicit:
            names = [type(p).__name__ for p, _ in grouped + replacers + explicit]
            raise ValueError(f"passes {names} both take over attention weights at {ctx.site} layer {ctx.layer}; "
                             "attach only one of them")
        p, pl = grouped[0]
        return _grouped_heads(p, None if pl.heads is None else _head_list(pl.heads, num_heads), ctx, module, query,
                              key, value, mask, scaling, dropout)
    if replacers:
        if len(replacers) > 1 or explicit:
            names = [type(p).__name__ for p, _ in replacers + explicit]
            raise ValueError(f"passes {names} both take over attention weights at {ctx.site} layer {ctx.layer}; "
                             "attach only one of them")
        p, _ = replacers[0]
        return p.attend(ctx, query, key, value, mask).transpose(1, 2)
    if not explicit:  # mask edits only
        return _sdpa_heads(query, key.repeat_interleave(n_rep, 1) if n_rep > 1 else key,
                           value.repeat_interleave(n_rep, 1) if n_rep > 1 else value,
                           mask, scaling, dropout, module).transpose(1, 2)

    heads_per_pass = [_head_list(pl.heads, num_heads) for _, pl in explicit]
    sel = tuple(sorted(set().union(*heads_per_pass)))  # heads computed explicitly
    slot = {h: i for i, h in enumerate(sel)}  # position of a head inside the explicit sub-tensor
    kv_sel = tuple(sorted({h // n_rep for h in sel}))
    kv_slot = {h: i for i, h in enumerate(kv_sel)}
    q_s = _take(query, sel)
    k_s, v_s = _take(key, kv_sel), _take(value, kv_sel)
    rep = tuple(kv_slot[h // n_rep] for h in sel)  # kv head of each selected query head
    if rep != tuple(range(len(rep))):
        k_s, v_s = _take(k_s, rep), _take(v_s, rep)
    m_s = mask if mask.shape[1] == 1 else _take(mask, sel)
    scores = torch.matmul(q_s, k_s.transpose(2, 3)).mul_(scaling).float()
    scores = scores.masked_fill(~m_s, torch.finfo(torch.float32).min)
    for (p, pl), heads in zip(explicit, heads_per_pass):
        if pl.scores:
            pos = tuple(slot[h] for h in heads)
            _put(scores, pos, p.edit_scores(ctx.with_heads(_index(heads, query.device)), _take(scores, pos)))
    weights = torch.softmax(scores, dim=-1)
    for (p, pl), heads in zip(explicit, heads_per_pass):
        if pl.weights:
            pos = tuple(slot[h] for h in heads)
            _put(weights, pos, p.edit_weights(ctx.with_heads(_index(heads, query.device)), _take(weights, pos)))
    weights = torch.nn.functional.dropout(weights.to(query.dtype), p=dropout, training=module.training)
    out_s = torch.matmul(weights, v_s)  # (B, h, q, D)
    if len(sel) == num_heads:
        return out_s.transpose(1, 2)
    rest = tuple(h for h in range(num_heads) if h not in slot)
    kv_rest = tuple(h // n_rep for h in rest)
    out_r = _sdpa_heads(_take(query, rest), _take(key, kv_rest), _take(value, kv_rest),
                        mask if mask.shape[1] == 1 else _take(mask, rest), scaling, dropout, module)
    out = query.new_empty(query.shape[0], num_heads, query.shape[2], value.shape[-1])
    _put(out, sel, out_s)
    _put(out, rest, out_r)
    return out.transpose(1, 2)


def _grouped_heads(pass_obj: AttentionPass, heads: tuple[int, ...] | None, ctx: AttentionContext,
                   module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   mask: torch.Tensor | None, scaling: float, dropout: float) -> torch.Tensor:
    """A ``key_groups`` plan: fused per-group attention of ``heads`` (None = all), combined by the pass; the other
    heads on SDPA. ``mask`` is the (edited) bool keep-mask, or None for a plain causal call. Returns
    ``(B, q, H, D)``."""
    if module.training and dropout > 0:
        raise ValueError(f"{type(pass_obj).__name__}: key_groups plans are inference-only (attention dropout "
                         f"{dropout} in training mode); call model.eval()")
    num_heads, num_kv = query.shape[1], key.shape[1]
    all_heads = heads is None or len(heads) == num_heads
    if all_heads:
        fused = pass_obj.fused_key_groups(ctx, query, key, value, mask)
        if fused is not None:
            return fused
        heads = tuple(range(num_heads))
    from ..kernels.grouped_attention import key_group_attention

    n_rep = num_heads // num_kv
    ids, groups = pass_obj.key_groups(ctx)
    if all_heads:
        q_s, k_s, v_s, m_s = query, key, value, mask
    else:  # one kv head per selected query head (no GQA sharing inside the subset)
        kv_of = tuple(h // n_rep for h in heads)
        q_s, k_s, v_s = _take(query, heads), _take(key, kv_of), _take(value, kv_of)
        m_s = mask if mask is None or mask.shape[1] == 1 else _take(mask, heads)
    outputs, masses = key_group_attention(q_s, k_s, v_s, ids.to(query.device), groups, scale=scaling,
                                          causal=ctx.causal, mask=m_s)
    out_s = pass_obj.combine_groups(ctx.with_heads(_index(heads, query.device)), outputs, masses).to(query.dtype)
    if all_heads:
        return out_s.transpose(1, 2)
    rest = tuple(h for h in range(num_heads) if h not in set(heads))
    full = query.new_empty(query.shape[0], num_heads, query.shape[2], value.shape[-1])
    _put(full, heads, out_s)
    if rest:
        kv_rest = tuple(h // n_rep for h in rest)
        rest_mask = ctx.mask if mask is None else mask
        _put(full, rest, _sdpa_heads(_take(query, rest), _take(key, kv_rest), _take(value, kv_rest),
                                     rest_mask if rest_mask.shape[1] == 1 else _take(rest_mask, rest), scaling,
                                     dropout, module))
    return full.transpose(1, 2)


def _sdpa_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float,
                dropout: float, module: torch.nn.Module) -> torch.Tensor:
    """SDPA on already head-aligned q/k/v ``(B, h, *, D)`` with a bool keep-mask; returns ``(B, h, q, D)``.

    Query rows whose keys are all masked (left-padding positions) would be NaN in SDPA; they are given a
    uniform row instead, as the models' eager code does (their outputs are never attended to)."""
    mask = mask | ~mask.any(-1, keepdim=True)  # no host sync: rows with no key left attend uniformly
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout if module.training else 0.0, scale=scaling)


_registered = False
_SDPA: list = []  # transformers' sdpa_attention_forward, looked up once by register()


def register() -> None:
    """Register "attnzoo" with transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent).

    The mask function is transformers' SDPA mask builder (bool keep-mask, or None for a plain causal /
    unpadded call), so the no-pass path hands SDPA exactly what the "sdpa" implementation would.
    """
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    _SDPA.append(sdpa_attention_forward)
    AttentionInterface.register(ATTN_NAME, attnzoo_attention)
    AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    _registered = True

