"""CCA: Concentric Causal Attention (Xing et al., "Mitigating Object Hallucination via Concentric Causal
Attention", NeurIPS 2024; official code xing0047/cca-llava).

Two changes to a 1-D RoPE decoder, both computed from the image's token grid:

- Positions: the image tokens of an ``H x W`` grid get position ids by concentric ring, ``start + ring`` with
  ``ring = min(i, j, H-1-i, W-1-j)`` (the outermost ring 0, the centre ``ceil(min(H, W) / 2) - 1``: 0..11 for
  LLaVA-1.5's 24 x 24 grid), and every token after the image continues from ``start + number of rings``,
  so the instruction sits ``n_rings`` positions after the image start instead of ``H * W``.
- Mask: during prefill, inside the image block a query on ring ``r`` attends to the image keys on rings
  ``<= r`` (all of them, in any raster order); the normal causal mask holds everywhere else.

In the paper the model is trained with this scheme (checkpoint ``xing0047/cca-llava-1.5-7b``); this pass is
what that checkpoint needs at inference. Applying it to a stock LLaVA-1.5 is a training-free experiment, not
the paper's method. Only LLaVA-1.5-style models (one square-ish grid per image, 1-D RoPE) are supported:
Qwen2-VL's multimodal RoPE and LLaVA-NeXT's tiled grids are refused with a ValueError.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from ..mllm.attention import AttentionContext, Plan
from .base import Pass, register_pass


def concentric_rings(rows: int, cols: int) -> torch.Tensor:
    """``(rows, cols)`` long: ring index of each grid cell, 0 on the border, increasing towards the centre."""
    i = torch.arange(rows)[:, None]
    j = torch.arange(cols)[None, :]
    return torch.minimum(torch.minimum(i, j), torch.minimum(rows - 1 - i, cols - 1 - j))


@register_pass
@dataclasses.dataclass
class CCA(Pass):
    """Concentric Causal Attention: concentric position ids and the concentric causal mask for image tokens.

    Attributes:
        positions: re-assign the image and text position ids by ring (True, as the paper).
        mask: use the concentric causal mask inside the image block at prefill (True, as the paper).
    """

    name: ClassVar[str] = "cca"
    summary: ClassVar[str] = "concentric position ids and causal mask for image tokens (trained-for in the paper)"

    positions: bool = True
    mask: bool = True

    def __post_init__(self) -> None:
        self._hook: Any = None
        self._offsets: torch.Tensor | None = None  # (B, L) position delta of each prompt token
        self._decode_shift: torch.Tensor | None = None  # (B,) delta of every generated token
        self._rings: torch.Tensor | None = None  # (B, L) ring of each image token, -1 elsewhere
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # (offsets, shift[:, None])
        super().__post_init__()

    def validate(self) -> None:
        if not (self.positions or self.mask):
            raise ValueError("CCA with positions=False and mask=False does nothing; enable at least one")

    # ------------------------------------------------------------------ attach

    def on_attach(self, lvlm: Any) -> None:
        if lvlm.family.startswith("qwen"):
            raise ValueError(f"CCA rewrites 1-D RoPE position ids; {lvlm.family} uses multimodal (M-RoPE) positions, "
                             "to which the concentric scheme does not apply")
        if lvlm.family != "llava":
            raise ValueError(f"CCA is defined for one square grid of image tokens per image (LLaVA-1.5); "
                             f"{lvlm.family} splits images into tiles with newline tokens")
        if self.positions:
            self._hook = lvlm.language_model.register_forward_pre_hook(self._rewrite_positions, with_kwargs=True)

    def on_detach(self, lvlm: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_layout(self, layout: Any) -> None:
        self._offsets = self._decode_shift = self._rings = None
        self._on_device = {}
        if layout is None:
            return
        batch, length = layout.batch_size, layout.prompt_length
        offsets = torch.zeros(batch, length, dtype=torch.long)
        rings = torch.full((batch, length), -1, dtype=torch.long)
        shift = torch.zeros(batch, dtype=torch.long)
        for b, spans in enumerate(layout.images):
            if len(spans) > 1:
                raise ValueError(f"CCA supports one image per prompt; sample {b} has {len(spans)}")
            for span in spans:
                if span.grid is None or span.grid[0] * span.grid[1] != span.num_tokens:
                    raise ValueError(f"CCA needs the image token grid; sample {b} has {span.num_tokens} image tokens "
                                     f"with grid {span.grid}")
                ring = concentric_rings(*span.grid).flatten()
                n_rings = int(ring.max()) + 1
                offsets[b, span.start:span.end] = ring - torch.arange(span.num_tokens)
                offsets[b, span.end:] = n_rings - span.num_tokens
                rings[b, span.start:span.end] = ring
                shift[b] = n_rings - span.num_tokens
        self._offsets, self._decode_shift, self._rings = offsets, shift, rings

    # ------------------------------------------------------------------ positions

    def _rewrite_positions(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._offsets is None:
            return None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or embeds.shape[0] != self._offsets.shape[0]:
            return None  # not the batch whose layout is active (e.g. an image-free forward)
        batch, q_len = embeds.shape[:2]
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        device = embeds.device
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = (torch.arange(q_len, device=device) + past)[None].expand(batch, -1)
        cached = self._on_device.get(device)
        if cached is None:  # once per batch and device: no host-to-device copy per decode step
            cached = self._on_device[device] = (self._offsets.to(device), self._decode_shift.to(device)[:, None])
        offsets, shift = cached
        length = offsets.shape[1]
        if past >= length:  # decoding: every query is a generated token
            delta = shift
        elif past == 0 and q_len == length:  # the prompt
            delta = offsets
        else:  # a chunk across the prompt's end
            padded = torch.arange(past, past + q_len, device=device)  # padded index (= KV-cache slot) of each query
            delta = torch.where(padded[None, :] < length, offsets[:, padded.clamp_max(length - 1)], shift)
        kwargs["position_ids"] = position_ids + delta
        if kwargs.get("attention_mask") is None:
            # with no 2-D mask transformers would read non-monotonic position ids as packed sequences
            kwargs["attention_mask"] = torch.ones(batch, past + q_len, dtype=torch.long, device=device)
        return args, kwargs

    # ------------------------------------------------------------------ mask

    def may_act(self, site: str, layer: int, is_prefill: bool) -> bool:
        return self.mask and site == "text" and is_prefill

    def plan(self, ctx: AttentionContext) -> Plan | None:
        if not self.mask or ctx.site != "text" or not ctx.is_prefill or ctx.layout is None or ctx.image_free:
            return None
        if self._rings is None or ctx.kv_length != self._rings.shape[1]:
            return None
        return Plan(mask=True)

    def edit_mask(self, ctx: AttentionContext, mask: torch.Tensor) -> torch.Tensor:
        rings = self._rings.to(mask.device)  # (B, L), -1 off the image
        q_ring = rings[:, -ctx.q_length:]
        image_q = (q_ring >= 0)[:, :, None]
        image_k = (rings >= 0)[:, None, :]
        inside = image_q & image_k  # (B, q, kv): query and key both image tokens of the sample
        concentric = rings[:, None, :] <= q_ring[:, :, None]
        return torch.where(inside[:, None], concentric[:, None], mask)
