"""Shared pieces of the contrastive-decoding tests: one tiny LLaVA (wrapped) and an independent reference copy,
and a plain re-computation of each branch's next-token logits by full forwards without a KV cache."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
from mitigation_testing import PROMPTS, TINY, images

# reference attention edit for the current forward: fn(probs (B, H, q, kv) float32, keep bool (B, 1, q, kv))
EDIT: dict[str, Callable | None] = {"fn": None}
NEW_TOKENS = 3


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention (float32 softmax) with EDIT["fn"] applied to the decoder's weights."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    keep = None
    if attention_mask is not None:
        scores = scores + attention_mask
        keep = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if EDIT["fn"] is not None and getattr(module, "layer_idx", None) is not None:
        probs = EDIT["fn"](probs, keep)
    return torch.matmul(probs.to(query.dtype), value).transpose(1, 2).contiguous(), None


@lru_cache(maxsize=1)
def models():
    """(wrapped LVLM, reference model with the reference attention), built once per test session."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    from attnzoo.mllm import build_tiny_llava, wrap

    AttentionInterface.register("contrastive_ref", _reference_attention)
    AttentionMaskInterface.register("contrastive_ref", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    lvlm = wrap(*build_tiny_llava(**TINY))
    ref, _ = build_tiny_llava(**TINY)
    ref.set_attn_implementation("contrastive_ref")
    return lvlm, ref


def batch(prompts=PROMPTS):
    lvlm, _ = models()
    return lvlm.prepare(images(), list(prompts))


def extend(inputs, generated: torch.Tensor):
    """input_ids, attention_mask and position ids (count of real tokens before, as generate) of prompt + tokens."""
    ids = torch.cat([inputs["input_ids"], generated], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(generated)], dim=1)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return ids, mask, pos


@torch.no_grad()
def reference_logits(inputs, generated: torch.Tensor, embeds: Callable | None = None,
                     edit: Callable | None = None) -> torch.Tensor:
    """Next-token logits ``(B, V)`` float32 of the reference model on prompt + ``generated`` (one full forward).

    ``embeds(ids) -> inputs_embeds`` replaces the model's own image embedding; ``edit`` is applied to every decoder
    attention (see EDIT)."""
    _, ref = models()
    ids, mask, pos = extend(inputs, generated)
    EDIT["fn"] = edit
    try:
        if embeds is None:
            out = ref(input_ids=ids, pixel_values=inputs["pixel_values"], attention_mask=mask, position_ids=pos)
        else:
            out = ref(inputs_embeds=embeds(ids), attention_mask=mask, position_ids=pos)
    finally:
        EDIT["fn"] = None
    return out.logits[:, -1].float()


def live_steps(tokens: torch.Tensor, eos: int | None) -> int:
    """Number of leading steps at which no sample has finished yet (later steps hold padding)."""
    for t in range(tokens.shape[1]):
        if eos is not None and bool((tokens[:, :t] == eos).any()):
            return t
    return tokens.shape[1]


def assert_same_contrast(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Contrasted logits agree: the same tokens cut off, the kept ones equal (float32 rounding), same argmax."""
    from helpers import assert_close

    kept = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(ours), kept)
    assert_close(ours[kept], ref[kept])
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
