"""``load()`` and the ``LVLM`` wrapper: a transformers vision-language model, its processor, token layouts,
and the attention routing that passes plug into."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._logging import get_logger, log_once
from .attention import (
    ATTN_NAME,
    AttentionContext,
    AttentionPass,
    _default_attention,
    _Site,
    register,
    run_passes,
)
from .layout import ImageSpan, TokenLayout, runs
from .templates import CHAT_TEMPLATES

logger = get_logger("attnzoo.mllm")

# architecture name (config.architectures[0]) -> family
ARCHITECTURES: dict[str, str] = {
    "LlavaForConditionalGeneration": "llava",
    "LlavaNextForConditionalGeneration": "llava_next",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
}
_MODEL_TYPES = {"llava": "llava", "llava_next": "llava_next", "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl"}
BACKENDS = ("sdpa", "eager")


def _family_of(config: Any) -> str:
    archs = list(getattr(config, "architectures", None) or [])
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    mt = getattr(config, "model_type", None)
    if not archs and mt in _MODEL_TYPES:
        return _MODEL_TYPES[mt]
    raise ValueError(
        f"unsupported architecture {archs or mt!r}; attnzoo.mllm supports {sorted(ARCHITECTURES)} "
        f"(model types {sorted(_MODEL_TYPES)})"
    )


def _model_class(family: str) -> type:
    import transformers

    name = {v: k for k, v in ARCHITECTURES.items()}[family]
    return getattr(transformers, name)


class _Runtime:
    """Mutable state the attention function reads: attached passes, active layout, backend."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.passes: list[AttentionPass] = []
        self.layout: TokenLayout | None = None
        self.image_free = False

    def context(self, site: _Site, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                attention_mask: torch.Tensor | None, scaling: float, kwargs: dict[str, Any]) -> AttentionContext:
        batch, heads, q_len, head_dim = query.shape
        kv_heads, kv_len = key.shape[1], key.shape[2]
        causal = kwargs.get("is_causal")
        causal = bool(getattr(module, "is_causal", site.site == "text")) if causal is None else bool(causal)
        layout = self.layout
        if layout is not None and site.site == "text" and layout.input_ids.shape[0] != batch:
            log_once(logger, f"layout batch {layout.batch_size} != attention batch {batch}: passes get "
                             "layout=None for this call (use lvlm.use_layout with the batch's layout)",
                     level=30)
            layout = None
        step = kv_len - (layout.input_ids.shape[1] if layout is not None else q_len)  # the prompt length
        return AttentionContext(
            site=site.site, layer=site.layer, num_layers=site.num_layers, num_heads=heads, num_kv_heads=kv_heads,
            head_dim=head_dim, batch_size=batch, q_length=q_len, kv_length=kv_len, is_prefill=kv_len == q_len,
            step=step if step > 0 else 0, layout=layout, image_free=self.image_free, module=module, scaling=scaling,
            causal=causal, device=query.device, base_mask=attention_mask,
        )

    def run_attention(self, site: _Site, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None,
                      dropout: float, kwargs: dict[str, Any]) -> tuple[torch.Tensor, None]:
        """One attention call with passes attached: the passes that may act (``may_act``) get a context and are
        asked for their plans (:func:`attnzoo.mllm.attention.run_passes`)."""
        is_prefill = query.shape[2] == key.shape[2]
        passes = [p for p in self.passes if p.may_act(site.site, site.layer, is_prefill)]
        if not passes:
            return _default_attention(self.backend, module, query, key, value, attention_mask, scaling, dropout,
                                      kwargs)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        ctx = self.context(site, module, query, key, attention_mask, scaling, kwargs)
        return run_passes(passes, ctx, self.backend, module, query, key, value, attention_mask, scaling, dropout,
                          kwargs)


@dataclass
class PassHandle:
    """Returned by :meth:`LVLM.attach`; detaches the pass on ``remove()`` or at the end of a ``with`` block."""

    lvlm: LVLM
    pass_obj: AttentionPass
    hooks: list[Any] = field(default_factory=list)
    removed: bool = False

    def remove(self) -> None:
        """Detach the pass and its hooks (idempotent)."""
        if self.removed:
            return
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        rt = self.lvlm._runtime
        rt.passes = [p for p in rt.passes if p is not self.pass_obj]
        self.lvlm._handles = [h for h in self.lvlm._handles if h is not self]
        self.lvlm._update_residual_hooks()
        self.pass_obj.on_detach(self.lvlm)
        self.removed = True

    def __enter__(self) -> PassHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@dataclass
class Batch:
    """Model inputs for a batch of (image, prompt) pairs and their :class:`TokenLayout`.

    ``inputs`` is the processor's ``BatchFeature`` (``input_ids``, ``attention_mask``, ``pixel_values`` ...)
    already on the model's device and dtype; call ``lvlm.model(**batch.inputs)`` inside
    ``lvlm.use_layout(batch.layout)``, or use :meth:`LVLM.forward`.
    """

    inputs: Any
    layout: TokenLayout
    # what :meth:`LVLM.prepare` was given, kept so that decoding passes can re-render the batch (e.g. with a
    # counterfactual prompt) in one larger batch
    images: tuple[Any, ...] | None = None
    system: str | None = None


class LVLM:
    """A loaded vision-language model with its processor, token layouts and attention routing.

    Attributes:
        model: the transformers ``...ForConditionalGeneration`` model (attention implementation "attnzoo").
        processor: its processor (tokenizer + image processor + chat template).
        family: "llava", "llava_next", "qwen2_vl" or "qwen2_5_vl".
        decoder_layers: the language model's decoder layers (``nn.ModuleList``).
        vision_layers: the vision tower's encoder layers.
        num_layers, num_heads, num_kv_heads, head_dim, hidden_size: the language model's attention shape.
    """

    def __init__(self, model: Any, processor: Any, family: str, attn_backend: str = "sdpa") -> None:
        if attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend {attn_backend!r} not supported; choose one of {BACKENDS}")
        register()
        self.model = model
        self.processor = processor
        self.family = family
        self._runtime = _Runtime(attn_backend)
        self._handles: list[PassHandle] = []
        self._stack_hook: Any = None  # pre-hook on the decoder stack managing the per-layer residual hooks
        self._layer_hooks: list[Any] = []  # the per-layer residual hooks, while installed
        if getattr(processor, "tokenizer", None) is not None:
            processor.tokenizer.padding_side = "left"
        text_cfg = model.config.get_text_config()
        self.num_layers: int = text_cfg.num_hidden_layers
        self.num_heads: int = text_cfg.num_attention_heads
        self.num_kv_heads: int = getattr(text_cfg, "num_key_value_heads", None) or self.num_heads
        self.hidden_size: int = text_cfg.hidden_size
        self.head_dim: int = getattr(text_cfg, "head_dim", None) or self.hidden_size // self.num_heads
        self.decoder_layers = self.language_model.layers
        self.vision_layers = self._find_vision_layers()
        for i, layer in enumerate(self.decoder_layers):
            layer.self_attn._attnzoo_site = _Site(self._runtime, "text", i, self.num_layers)
        for i, layer in enumerate(self.vision_layers):
            attn = getattr(layer, "self_attn", None) or layer.attn
            attn._attnzoo_site = _Site(self._runtime, "vision", i, len(self.vision_layers))
        model.set_attn_implementation(ATTN_NAME)

    # ------------------------------------------------------------------ structure

    @property
    def attn_backend(self) -> str:
        """The attention used where no pass acts: "sdpa" or "eager"."""
        return self._runtime.backend

    @attn_backend.setter
    def attn_backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"attn_backend {value!r} not supported; choose one of {BACKENDS}")
        self._runtime.backend = value

    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder stack (embeddings, layers, final norm; no LM head)."""
        return self.model.model.language_model

    @property
    def vision_tower(self) -> torch.nn.Module:
        inner = self.model.model
        return inner.visual if self.family.startswith("qwen") else inner.vision_tower

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.lm_head

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def vision_feature_layer(self) -> int | None:
        """Index (non-negative) of the vision layer whose output feeds the projector (LLaVA: -2), else None."""
        layer = getattr(self.model.config, "vision_feature_layer", None)
        if not isinstance(layer, int):
            return None
        # hidden_states[0] is the embedding output, so hidden_states[k] is the output of layer k - 1
        n = len(self.vision_layers)
        return (layer % (n + 1)) - 1

    def _find_vision_layers(self) -> torch.nn.ModuleList:
        vt = self.vision_tower
        if self.family.startswith("qwen"):
            return vt.blocks
        vision_model = getattr(vt, "vision_model", vt)
        return vision_model.encoder.layers

    def __repr__(self) -> str:
        return (f"LVLM(family={self.family!r}, layers={self.num_layers}, heads={self.num_heads}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, backend={self.attn_backend!r}, "
                f"passes={[type(p).__name__ for p in self._runtime.passes]})")

    # ------------------------------------------------------------------ passes

    @property
    def passes(self) -> tuple[AttentionPass, ...]:
        """The attached passes, in the order they act."""
        return tuple(self._runtime.passes)

    def attach(self, pass_obj: AttentionPass) -> PassHandle:
        """Attach ``pass_obj`` (an :class:`AttentionPass`); returns a handle that is a context manager.

        Passes act in attach order. While a pass overriding ``edit_residual`` is attached, the decoder layers
        carry forward pre-hooks that call it (all such passes, in attach order); when every such pass has
        ``residual_at_decode = False`` the hooks are taken off for forwards with cached keys (decode steps).
        """
        if not isinstance(pass_obj, AttentionPass):
            raise TypeError(f"attach expects an attnzoo.mllm.AttentionPass, got {type(pass_obj).__name__}")
        if any(p is pass_obj for p in self._runtime.passes):
            raise ValueError(f"{type(pass_obj).__name__} is already attached to this model")
        pass_obj.on_attach(self)
        handle = PassHandle(self, pass_obj)
        self._runtime.passes.append(pass_obj)
        self._handles.append(handle)
        self._update_residual_hooks()
        if self._runtime.layout is not None:
            pass_obj.on_layout(self._runtime.layout)
        return handle

    def detach_all(self) -> None:
        """Detach every pass (their hooks included)."""
        for handle in list(self._handles):
            handle.remove()

    def _residual_passes(self) -> list[AttentionPass]:
        return [p for p in self._runtime.passes if type(p).edit_residual is not AttentionPass.edit_residual]

    def _update_residual_hooks(self) -> None:
        """After an attach or a detach: the decoder-stack pre-hook (and the per-layer hooks) exist exactly while
        some attached pass overrides ``edit_residual``; right after an attach the per-layer hooks are on."""
        if self._residual_passes():
            if self._stack_hook is None:
                self._stack_hook = self.language_model.register_forward_pre_hook(self._on_decoder_forward,
                                                                                 with_kwargs=True)
            self._set_layer_hooks(True)
        else:
            if self._stack_hook is not None:
                self._stack_hook.remove()
                self._stack_hook = None
            self._set_layer_hooks(False)

    def _set_layer_hooks(self, on: bool) -> None:
        if on and not self._layer_hooks:
            self._layer_hooks = [layer.register_forward_pre_hook(self._residual_hook(i), with_kwargs=True)
                                 for i, layer in enumerate(self.decoder_layers)]
        elif not on and self._layer_hooks:
            for h in self._layer_hooks:
                h.remove()
            self._layer_hooks = []

    def _on_decoder_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Decoder-stack pre-hook: per-layer residual hooks only for forwards that some residual pass acts in
        (a module with hooks takes torch's slower call path, and decoding calls every layer once per token)."""
        cache = kwargs.get("past_key_values")
        cached = cache is not None and cache.get_seq_length() > 0
        self._set_layer_hooks(not cached or any(p.residual_at_decode for p in self._residual_passes()))

    def _residual_hook(self, index: int) -> Any:
        attn = self.decoder_layers[index].self_attn

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            cache = kwargs.get("past_key_values")
            past = cache.get_seq_length(index) if cache is not None else 0
            passes = [p for p in self._residual_passes() if past == 0 or p.residual_at_decode]
            if not passes:
                return None
            q_len = hidden.shape[1]
            layout = self._runtime.layout
            if layout is not None and layout.batch_size != hidden.shape[0]:
                layout = None
            step = past + q_len - layout.prompt_length if layout is not None else past
            ctx = AttentionContext(
                site="text", layer=index, num_layers=self.num_layers, num_heads=self.num_heads,
                num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, batch_size=hidden.shape[0], q_length=q_len,
                kv_length=past + q_len, is_prefill=past == 0, step=max(step, 0), layout=layout,
                image_free=self._runtime.image_free, module=attn, scaling=self.head_dim ** -0.5, causal=True,
                device=hidden.device,
            )
            changed = False
            for pass_obj in passes:
                new = pass_obj.edit_residual(ctx, hidden)
                if new is not None:
                    hidden, changed = new, True
            if not changed:
                return None
            if args:
                return (hidden, *args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    @contextlib.contextmanager
    def use_layout(self, layout: TokenLayout | None, image_free: bool = False) -> Iterator[TokenLayout | None]:
        """Make ``layout`` the active layout for forwards inside the block (passes see it as ``ctx.layout``)."""
        rt = self._runtime
        previous, previous_free = rt.layout, rt.image_free
        rt.layout, rt.image_free = layout, image_free
        for p in rt.passes:
            p.on_layout(layout)
        try:
            yield layout
        finally:
            rt.layout, rt.image_free = previous, previous_free
            for p in rt.passes:
                p.on_layout(previous)

    @contextlib.contextmanager
    def capture_vision_attention(self, layers: Sequence[int] | None = None
                                 ) -> Iterator[dict[int, list[torch.Tensor]]]:
        """Record the vision tower's post-softmax attention maps while the block runs.

        Yields a dict filled as the model runs: vision layer index -> list of float32 weights, one per
        attention call: CLIP towers (LLaVA, LLaVA-NeXT) make one call per forward, ``(N, H, P, P)`` with N
        images or tiles; Qwen2-VL makes one call per image, ``(1, H, P_i, P_i)``. ``layers`` defaults to the
        feature layer the projector reads (:attr:`vision_feature_layer`), or all layers. To *change* these
        maps (CausalMM), attach an :class:`AttentionPass` with ``site = "vision"`` instead.
        """
        if layers is None:
            fl = self.vision_feature_layer
            layers = [fl] if fl is not None else list(range(len(self.vision_layers)))
        store: dict[int, list[torch.Tensor]] = {}
        with self.attach(_VisionRecorder(set(layers), store)):
            yield store

    # ------------------------------------------------------------------ inputs

    @property
    def chat_template(self) -> str:
        """The processor's chat template, or the family default (:mod:`attnzoo.mllm.templates`)."""
        tmpl = getattr(self.processor, "chat_template", None)
        return tmpl or CHAT_TEMPLATES["qwen2_vl" if self.family.startswith("qwen") else self.family]

    def render(self, prompt: str, with_image: bool = True, system: str | None = None) -> str:
        """The chat-templated text for one user turn (image placeholder before the text, generation prompt
        appended), as the family's official template writes it."""
        content: list[dict[str, str]] = [{"type": "image"}] if with_image else []
        content.append({"type": "text", "text": prompt})
        messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        return self.processor.apply_chat_template(messages, chat_template=self.chat_template,
                                                  add_generation_prompt=True, tokenize=False)

    def prepare(self, images: Sequence[Any | None] | None, prompts: Sequence[str],
                system: str | None = None) -> Batch:
        """Processor inputs and :class:`TokenLayout` for a batch.

        Args:
            images: one PIL image (or array) per prompt, or None for an image-free sample; None = no images.
            prompts: the user texts (the chat template is applied here).
            system: optional system prompt.

        Returns:
            :class:`Batch` with left-padded inputs on the model's device (pixel values in the model dtype).
        """
        prompts = list(prompts)
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a sequence of str (one per sample)")
        images = [None] * len(prompts) if images is None else list(images)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; pass one (or None) per prompt")
        texts = [self.render(p, img is not None, system) for p, img in zip(prompts, images)]
        present = [img for img in images if img is not None]
        kwargs: dict[str, Any] = dict(text=texts, return_tensors="pt", padding=True)
        if present:
            kwargs["images"] = present
        self.processor.tokenizer.padding_side = "left"
        inputs = self.processor(**kwargs)
        layout = self._layout(inputs, texts, prompts, [img is not None for img in images])
        inputs = inputs.to(self.device)
        for k in ("pixel_values", "pixel_values_videos"):
            if k in inputs and inputs[k].is_floating_point():
                inputs[k] = inputs[k].to(self.dtype)
        return Batch(inputs=inputs, layout=layout.to(self.device), images=tuple(images), system=system)

    def _image_geometry(self, inputs: Any, has_image: list[bool]) -> list[tuple[tuple[int, int] | None,
                                                                              tuple[int, int] | None, int, int]]:
        """Per image (flattened in batch order): (base grid, high-res grid, expected token count or -1,
        rows in the vision tower's batch or 0 when the tower is called per image)."""
        n_images = sum(has_image)
        out: list[tuple[tuple[int, int] | None, tuple[int, int] | None, int, int]] = []
        cfg = self.model.config
        if self.family.startswith("qwen"):
            merge = cfg.vision_config.spatial_merge_size
            for t, h, w in inputs["image_grid_thw"].tolist():
                out.append(((h // merge, w // merge), None, t * h * w // merge ** 2, 0))
            return out
        vc = cfg.vision_config
        side = vc.image_size // vc.patch_size
        base = (side, side) if getattr(cfg, "vision_feature_select_strategy", "default") == "default" else None
        if self.family == "llava":
            return [(base, None, -1, 1)] * n_images
        # llava_next: reproduce the processor's any-resolution geometry
        from transformers.image_processing_utils import select_best_resolution

        pinpoints = cfg.image_grid_pinpoints
        for orig_h, orig_w in inputs["image_sizes"].tolist():
            best_h, best_w = select_best_resolution([orig_h, orig_w], pinpoints)
            cur_h, cur_w = side * (best_h // vc.image_size), side * (best_w // vc.image_size)
            if orig_w / orig_h > cur_w / cur_h:
                new_h = int(round(orig_h * (cur_w / orig_w), 7))
                cur_h -= 2 * ((cur_h - new_h) // 2)
            else:
                new_w = int(round(orig_w * (cur_h / orig_h), 7))
                cur_w -= 2 * ((cur_w - new_w) // 2)
            count = side * side + cur_h * (cur_w + 1) if base is not None else -1
            tiles = -(-best_h // vc.image_size) * -(-best_w // vc.image_size) + 1  # + the downscaled base tile
            out.append((base, (cur_h, cur_w), count, tiles))
        return out

    def _layout(self, inputs: Any, texts: list[str], prompts: list[str], has_image: list[bool]) -> TokenLayout:
        ids = inputs["input_ids"]
        attn = inputs["attention_mask"]
        B, L = ids.shape
        image_mask = ids == self.image_token_id
        newline_mask = torch.zeros_like(image_mask)
        geometry = self._image_geometry(inputs, has_image) if any(has_image) else []
        spans: list[tuple[ImageSpan, ...]] = []
        g = 0
        for b in range(B):
            sample: list[ImageSpan] = []
            for start, end in runs(image_mask[b]):
                base, hr, count, _ = geometry[g] if g < len(geometry) else (None, None, -1, 0)
                g += 1
                n = end - start
                if self.family == "llava" and base is not None and base[0] * base[1] != n:
                    base = (1, n) if math.isqrt(n) ** 2 != n else (math.isqrt(n),) * 2
                if count >= 0 and count != n:
                    log_once(logger, f"{self.family}: image with {n} tokens does not match the expected geometry "
                                     f"({count} tokens); grid information dropped", level=30)
                    base, hr = None, None
                span = ImageSpan(start, end, base, hr)
                newline_mask[b, span.newline_positions()] = True
                sample.append(span)
            spans.append(tuple(sample))
        instruction = self._instruction_mask(ids, attn, texts, prompts)
        vision_rows = None
        if geometry and not self.family.startswith("qwen"):
            samples = [b for b, sample in enumerate(spans) for _ in sample]
            vision_rows = torch.tensor([b for b, geo in zip(samples, geometry) for _ in range(geo[3])],
                                       dtype=torch.long)
        return TokenLayout(family=self.family, input_ids=ids, attention_mask=attn, image_mask=image_mask,
                           newline_mask=newline_mask, instruction_mask=instruction, images=tuple(spans),
                           prompts=tuple(prompts), padding_side="left", has_image=tuple(has_image),
                           vision_rows=vision_rows)

    def _instruction_mask(self, ids: torch.Tensor, attn: torch.Tensor, texts: list[str],
                          prompts: list[str]) -> torch.Tensor:
        """Mark the tokens of the user text: tokenize each rendered (unexpanded) prompt with offsets, take the
        tokens overlapping the text's characters, and map them past the expanded image runs."""
        mask = torch.zeros_like(ids, dtype=torch.bool)
        tok = self.processor.tokenizer
        image_id = self.image_token_id
        for b, (text, prompt) in enumerate(zip(texts, prompts)):
            c0 = text.rfind(prompt) if prompt else -1
            if c0 < 0:
                log_once(logger, "instruction text not found verbatim in the rendered prompt; instruction_mask "
                                 "left empty for such samples", level=30)
                continue
            c1 = c0 + len(prompt)
            try:
                enc = tok(text, return_offsets_mapping=True)
            except (NotImplementedError, ValueError, TypeError):
                log_once(logger, f"{type(tok).__name__} gives no character offsets; instruction_mask left empty",
                         level=30)
                break
            small_ids, offsets = enc["input_ids"], enc["offset_mapping"]
            real = attn[b].nonzero().flatten()
            row = ids[b, real].tolist()
            # map unexpanded token j -> expanded index (image placeholder runs collapse to one token)
            pos, j_to_i = 0, []
            for t in small_ids:
                j_to_i.append(pos)
                if t == image_id:
                    while pos < len(row) and row[pos] == image_id:
                        pos += 1
                else:
                    if pos >= len(row) or row[pos] != t:
                        pos = -1
                        break
                    pos += 1
            if pos != len(row):
                log_once(logger, "could not align the prompt tokenization with the processor's input_ids; "
                                 "instruction_mask left empty for such samples", level=30)
                continue
            for j, (s, e) in enumerate(offsets):
                if e > s and e > c0 and s < c1 and small_ids[j] != image_id:
                    mask[b, real[j_to_i[j]]] = True
        return mask

    def image_free(self, layout: TokenLayout, system: str | None = None) -> Batch:
        """The same prompts without their images (chat template rendered with no image placeholder)."""
        if not layout.prompts:
            raise ValueError("layout has no prompts recorded; build it with lvlm.prepare")
        return self.prepare(None, list(layout.prompts), system=system)

    # ------------------------------------------------------------------ running

    def forward(self, batch: Batch, image_free: bool = False, **kwargs: Any) -> Any:
        """``model(**batch.inputs, **kwargs)`` with ``batch.layout`` active; returns the model output."""
        with self.use_layout(batch.layout, image_free=image_free):
            return self.model(**batch.inputs, **kwargs)

    def image_free_forward(self, batch: Batch, **kwargs: Any) -> tuple[Any, Batch]:
        """Forward of the same prompts without images (``ctx.image_free`` is True for passes).

        Returns ``(model output, image-free Batch)``; the image-free layout's positions differ from the
        image batch's (no image tokens), so align by ``layout.instruction_mask`` or from the end.
        """
        free = self.image_free(batch.layout)
        with torch.no_grad():
            out = self.forward(free, image_free=True, **kwargs)
        return out, free

    @torch.no_grad()
    def generate_ids(self, batch: Batch, **gen_kwargs: Any) -> torch.Tensor:
        """Generate for a prepared batch; returns the new tokens ``(B, T)`` (prompt stripped, pad after EOS).

        Extension point for decoding passes: an attached pass with a ``generate_ids(lvlm, batch, **gen_kwargs)``
        method (e.g. :class:`attnzoo.mitigation.CausalMM`, :class:`attnzoo.mitigation.LQCD`) owns the generation
        loop while attached, so ``generate`` and the eval runner go through it; at most one such pass at a time.
        """
        gen_kwargs.setdefault("max_new_tokens", 32)
        gen_kwargs.setdefault("do_sample", False)
        gen_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        decoders = [p for p in self._runtime.passes if callable(getattr(p, "generate_ids", None))]
        if len(decoders) > 1:
            raise ValueError(f"passes {[type(p).__name__ for p in decoders]} each own the decoding loop; "
                             "attach only one decoding pass at a time")
        if decoders:
            return decoders[0].generate_ids(self, batch, **gen_kwargs)
        with self.use_layout(batch.layout):
            out = self.model.generate(**batch.inputs, **gen_kwargs)
        sequences = out.sequences if hasattr(out, "sequences") else out
        return sequences[:, batch.layout.prompt_length:]

    def decode(self, new_tokens: torch.Tensor) -> list[str]:
        """Token ids ``(B, T)`` -> stripped strings (special tokens removed)."""
        return [s.strip() for s in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def generate(self, images: Sequence[Any | None] | Any | None, prompts: Sequence[str] | str,
                 system: str | None = None, **gen_kwargs: Any) -> list[str]:
        """Answer ``prompts`` about ``images`` (one image or None per prompt) in one left-padded batch.

        ``gen_kwargs`` go to ``model.generate`` (defaults: greedy, ``max_new_tokens=32``). Returns one
        string per prompt. A single prompt/image may be passed without a list.
        """
        if isinstance(prompts, str):
            prompts, images = [prompts], [images]
        batch = self.prepare(images, prompts, system=system)
        return self.decode(self.generate_ids(batch, **gen_kwargs))


class _VisionRecorder(AttentionPass):
    """Records vision attention weights (used by :meth:`LVLM.capture_vision_attention`)."""

    site = "vision"

    def __init__(self, layers: set[int], store: dict[int, list[torch.Tensor]]) -> None:
        self.layers, self.store = layers, store

    def may_act(self, site: str, layer: int, is_prefill: bool) -> bool:
        return site == "vision" and layer in self.layers

    def plan(self, ctx: AttentionContext) -> Any:
        from .attention import Plan

        return Plan(weights=True) if ctx.site == "vision" and ctx.layer in self.layers else None

    def edit_weights(self, ctx: AttentionContext, weights: torch.Tensor) -> torch.Tensor:
        self.store.setdefault(ctx.layer, []).append(weights.detach().clone())
        return weights


# Models shipped inside the package, loadable offline by name.
BUNDLED_MODELS: dict[str, Path] = {
    "attnzoo/testbed-llava": Path(__file__).resolve().parent.parent / "data" / "testbed-llava",
}


def load(name_or_path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
         attn_backend: str = "sdpa", **from_pretrained_kwargs: Any) -> LVLM:
    """Load an LVLM and its processor, routed through the "attnzoo" attention function.

    Args:
        name_or_path: a hub id (needs network), a local folder written by ``save_pretrained`` (model and
            processor), or a bundled name of :data:`BUNDLED_MODELS` (``"attnzoo/testbed-llava"``: the offline
            testbed's tiny LLaVA, see docs/testbed.md).
        dtype: weight dtype (``torch.bfloat16``, "float16", ...); default: the checkpoint's / float32.
        device: where to put the model ("cuda", "cpu", ...); default CPU.
        attn_backend: attention used wherever no pass acts: "sdpa" (default) or "eager".
        from_pretrained_kwargs: passed to ``from_pretrained`` (``revision``, ``trust_remote_code``, ...).

    Returns:
        :class:`LVLM`. Raises ValueError naming the supported architectures for any other model.
    """
    from transformers import AutoConfig, AutoProcessor

    if attn_backend not in BACKENDS:
        raise ValueError(f"attn_backend {attn_backend!r} not supported; choose one of {BACKENDS}")
    register()
    if str(name_or_path) in BUNDLED_MODELS:
        name_or_path = BUNDLED_MODELS[str(name_or_path)]
        if not (name_or_path / "config.json").is_file():
            raise FileNotFoundError(f"bundled model folder {name_or_path} is missing; reinstall attnzoo")
    config = AutoConfig.from_pretrained(name_or_path)
    family = _family_of(config)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    cls = _model_class(family)
    kwargs = dict(from_pretrained_kwargs)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device is not None and torch.device(device).type != "cpu":
        kwargs.setdefault("device_map", str(device))
    model = cls.from_pretrained(name_or_path, attn_implementation=ATTN_NAME, **kwargs)
    model.eval()
    processor = AutoProcessor.from_pretrained(name_or_path)
    return LVLM(model, processor, family, attn_backend=attn_backend)


def wrap(model: Any, processor: Any, attn_backend: str = "sdpa") -> LVLM:
    """Wrap an already-built model and processor (e.g. from :mod:`attnzoo.mllm.tiny`) without saving them."""
    return LVLM(model, processor, _family_of(model.config), attn_backend=attn_backend)
