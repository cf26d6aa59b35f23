"""Where things are in a batch of LVLM prompts: image tokens, instruction, template, padding, generation.

All positions are indices into the batch's padded token sequence (the same index space as the KV cache:
with left padding, generated token ``t`` of every sample sits at ``prompt_length + t``), so a pass can use
them directly as key indices during prefill and every decode step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ImageSpan:
    """One image's tokens in one sample, ``[start, end)`` in padded coordinates.

    Attributes:
        start, end: the contiguous run of image-feature tokens (placeholder tokens the model fills with
            projected vision features; LLaVA-NeXT newline tokens included).
        grid: ``(rows, cols)`` of the base feature grid, stored row-major from ``start`` (LLaVA-1.5: 24x24 for
            336 px; LLaVA-NeXT: the downscaled whole-image tile; Qwen2-VL: the merged patch grid), or ``None``
            when the token count does not factor into the known geometry.
        highres_grid: LLaVA-NeXT only: ``(rows, cols)`` of the unpadded high-resolution grid that follows the
            base tile; each of its rows is followed by one newline token, so row ``r`` occupies
            ``[hr_start + r * (cols + 1), hr_start + r * (cols + 1) + cols)`` and its newline the next index.
    """

    start: int
    end: int
    grid: tuple[int, int] | None = None
    highres_grid: tuple[int, int] | None = None

    @property
    def num_tokens(self) -> int:
        """Number of image tokens, newline tokens included."""
        return self.end - self.start

    def base_positions(self) -> torch.Tensor:
        """``(rows, cols)`` long tensor of the base grid's token positions (raises if the grid is unknown)."""
        if self.grid is None:
            raise ValueError(f"image span [{self.start}, {self.end}) has no known grid geometry")
        rows, cols = self.grid
        return torch.arange(self.start, self.start + rows * cols).view(rows, cols)

    def highres_positions(self) -> torch.Tensor | None:
        """LLaVA-NeXT: ``(rows, cols)`` positions of the high-resolution grid (newlines excluded), else None."""
        if self.highres_grid is None or self.grid is None:
            return None
        rows, cols = self.highres_grid
        hr_start = self.start + self.grid[0] * self.grid[1]
        return hr_start + torch.arange(rows)[:, None] * (cols + 1) + torch.arange(cols)[None, :]

    def newline_positions(self) -> torch.Tensor:
        """Positions of LLaVA-NeXT's image-newline tokens (empty for other families)."""
        if self.highres_grid is None or self.grid is None:
            return torch.empty(0, dtype=torch.long)
        rows, cols = self.highres_grid
        hr_start = self.start + self.grid[0] * self.grid[1]
        return hr_start + torch.arange(rows) * (cols + 1) + cols


@dataclass
class TokenLayout:
    """Per-batch token layout of a left-padded LVLM prompt batch.

    Attributes:
        family: "llava", "llava_next", "qwen2_vl" or "qwen2_5_vl".
        input_ids: ``(B, L)`` long, the processor's output (image placeholders already expanded).
        attention_mask: ``(B, L)`` long, 0 on padding.
        image_mask: ``(B, L)`` bool, True on every image-feature token (newlines included).
        newline_mask: ``(B, L)`` bool, True on LLaVA-NeXT image-newline tokens (subset of ``image_mask``).
        instruction_mask: ``(B, L)`` bool, True on the tokens of the user's text (the prompt given to
            :meth:`LVLM.generate`); the chat template's own tokens (system prompt, role tags) are
            ``template_mask``.
        images: per sample, a tuple of :class:`ImageSpan` in order of appearance.
        prompts: the user texts, one per sample (used to rebuild image-free inputs).
        padding_side: "left" (required for batched generation) or "right".
        prompt_length: ``L``; the first generated token has position ``L`` in every sample.
        vision_rows: ``(N,)`` long or None: the sample each row of the vision tower's batch belongs to
            (LLaVA: one row per image; LLaVA-NeXT: one row per tile, base tile first). None for Qwen2-VL,
            whose tower sees one image per attention call (in image order, see :attr:`image_samples`).
    """

    family: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_mask: torch.Tensor
    newline_mask: torch.Tensor
    instruction_mask: torch.Tensor
    images: tuple[tuple[ImageSpan, ...], ...]
    prompts: tuple[str, ...] = ()
    padding_side: str = "left"
    has_image: tuple[bool, ...] = field(default=())
    vision_rows: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not self.has_image:
            self.has_image = tuple(len(s) > 0 for s in self.images)

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def prompt_length(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @property
    def image_samples(self) -> tuple[int, ...]:
        """The sample index of every image, in the order the processor and the vision tower see them."""
        return tuple(b for b, spans in enumerate(self.images) for _ in spans)

    @property
    def padding_mask(self) -> torch.Tensor:
        """``(B, L)`` bool, True on padding tokens."""
        return self.attention_mask == 0

    @property
    def template_mask(self) -> torch.Tensor:
        """``(B, L)`` bool: real prompt tokens that are neither image nor instruction (system, role tags)."""
        return (self.attention_mask != 0) & ~self.image_mask & ~self.instruction_mask

    @property
    def num_pad(self) -> torch.Tensor:
        """``(B,)`` long, number of padding tokens per sample."""
        return (self.attention_mask == 0).sum(1)

    @property
    def num_image_tokens(self) -> torch.Tensor:
        """``(B,)`` long, image tokens per sample (0 for image-free samples)."""
        return self.image_mask.sum(1)

    def image_positions(self, sample: int) -> torch.Tensor:
        """1-D long tensor of the image-token positions of ``sample``."""
        return self.image_mask[sample].nonzero().flatten()

    def instruction_span(self, sample: int) -> tuple[int, int]:
        """``[start, end)`` of the instruction tokens of ``sample`` (``(0, 0)`` if it has none)."""
        idx = self.instruction_mask[sample].nonzero().flatten()
        if idx.numel() == 0:
            return (0, 0)
        return (int(idx[0]), int(idx[-1]) + 1)

    def keys(self, mask: torch.Tensor, kv_length: int) -> torch.Tensor:
        """Extend a ``(B, L)`` prompt mask to ``(B, kv_length)`` key positions (generated tokens False).

        Use it inside an attention pass: ``ctx.layout.keys(ctx.layout.image_mask, ctx.kv_length)``.
        """
        if kv_length < mask.shape[1]:
            raise ValueError(f"kv_length {kv_length} is shorter than the prompt ({mask.shape[1]} tokens)")
        extra = kv_length - mask.shape[1]
        if extra == 0:
            return mask
        return torch.nn.functional.pad(mask, (0, extra), value=False)

    def image_keys(self, kv_length: int) -> torch.Tensor:
        """``(B, kv_length)`` bool, True on image-token keys."""
        return self.keys(self.image_mask, kv_length)

    def to(self, device: torch.device | str) -> TokenLayout:
        """A copy with every tensor on ``device``."""
        kw = {k: getattr(self, k).to(device) for k in
              ("input_ids", "attention_mask", "image_mask", "newline_mask", "instruction_mask")}
        rows = None if self.vision_rows is None else self.vision_rows.to(device)
        return TokenLayout(family=self.family, images=self.images, prompts=self.prompts,
                           padding_side=self.padding_side, has_image=self.has_image, vision_rows=rows, **kw)

    def select(self, samples: list[int] | torch.Tensor) -> TokenLayout:
        """The layout of a sub-batch (padding is kept, so positions stay valid for the same KV cache).

        ``vision_rows`` is dropped (None): the sub-batch's vision batch is not known without re-processing."""
        idx = torch.as_tensor(samples, dtype=torch.long)
        kw = {k: getattr(self, k)[idx.to(self.device)] for k in
              ("input_ids", "attention_mask", "image_mask", "newline_mask", "instruction_mask")}
        il = idx.tolist()
        return TokenLayout(family=self.family, images=tuple(self.images[i] for i in il),
                           prompts=tuple(self.prompts[i] for i in il) if self.prompts else (),
                           padding_side=self.padding_side, has_image=tuple(self.has_image[i] for i in il), **kw)

    def __repr__(self) -> str:
        spans = [[(s.start, s.end) for s in imgs] for imgs in self.images]
        return (f"TokenLayout(family={self.family!r}, batch={self.batch_size}, prompt_length={self.prompt_length}, "
                f"pad={self.num_pad.tolist()}, images={spans}, "
                f"instruction={[self.instruction_span(b) for b in range(self.batch_size)]})")


def runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs of True in a 1-D bool tensor, as ``[start, end)`` pairs."""
    m = mask.to(torch.int8).cpu()
    d = torch.diff(torch.nn.functional.pad(m, (1, 1)))
    starts = (d == 1).nonzero().flatten().tolist()
    ends = (d == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends))
