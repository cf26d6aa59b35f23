"""Shared pieces of the mitigation tests: a tiny LLaVA pair (wrapped + plain reference), inputs, and a
reference attention function that the tests configure with a plain re-statement of each paper's formula."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

# Different lengths on purpose: the batch gets left padding and the image sits at different positions.
PROMPTS = ["Is there a dog?", "Please describe this image in detail. Is there a person on the street?"]
TINY = dict(num_layers=4, num_heads=4, num_kv_heads=2, seed=0)

# The current test's reference edit: fn(layer, probs (B, H, q, kv) float32, mask4d) -> probs, and an optional
# mask edit; set by each test.
REF: dict[str, Callable | None] = {"weights": None, "mask": None}


def images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")) for _ in range(2)]


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention (float32 softmax, as the models' eager code) with the edits in REF applied from scratch."""
    n_rep = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)
    value = value.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    layer = getattr(module, "layer_idx", None)  # None in the vision tower: no edits there
    if attention_mask is not None:
        if REF["mask"] is not None and layer is not None:
            attention_mask = REF["mask"](layer, attention_mask)
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if REF["weights"] is not None and layer is not None:
        probs = REF["weights"](layer, probs)
    out = torch.matmul(probs.to(query.dtype), value)
    return out.transpose(1, 2).contiguous(), None


def register_reference() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register("mitigation_ref", reference_attention)
    AttentionMaskInterface.register("mitigation_ref", ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def tiny_pair(**overrides):
    """(wrapped LVLM, plain reference model with the reference attention) of the same seeded tiny LLaVA."""
    from attnzoo.mllm import build_tiny_llava, wrap

    register_reference()
    kw = {**TINY, **overrides}
    model, processor = build_tiny_llava(**kw)
    lvlm = wrap(model, processor)
    ref_model, _ = build_tiny_llava(**kw)
    ref_model.set_attn_implementation("mitigation_ref")
    return lvlm, ref_model


def generation_kwargs(lvlm, new_tokens: int = 3) -> dict:
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=lvlm.tokenizer.pad_token_id)
