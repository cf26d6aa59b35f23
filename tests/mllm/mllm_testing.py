"""Shared pieces of the attnzoo.mllm tests: images, prompts of different lengths, and model pairs
(the same seeded tiny model twice: one wrapped by attnzoo, one left plain as the reference)."""

from __future__ import annotations

import numpy as np
from PIL import Image

FAMILIES = ("llava", "llava_next", "qwen2_vl")
# Qwen2.5-VL shares Qwen2-VL's code path; it joins the tests where its windowed vision attention could differ.
ALL_FAMILIES = (*FAMILIES, "qwen2_5_vl")

# Different lengths on purpose: the batch gets left padding.
PROMPTS = ["Is there a dog?", "Please describe this image in detail. Is there a person on the street?"]


def images(seed: int = 0) -> list[Image.Image]:
    """Two random RGB images of different aspect ratios (LLaVA-NeXT / Qwen2-VL give them different grids)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random(shape) * 255).astype("uint8")) for shape in ((24, 40, 3), (40, 20, 3))]


def plain_model(family: str, attn: str = "sdpa"):
    """A fresh, unwrapped copy of the seeded tiny model with attention implementation ``attn``."""
    from attnzoo.mllm import build_tiny

    model, processor = build_tiny(family, seed=0)
    model.set_attn_implementation(attn)
    return model, processor


def wrapped(family: str, attn_backend: str = "sdpa"):
    """A fresh tiny model of ``family`` wrapped by attnzoo."""
    from attnzoo.mllm import build_tiny, wrap

    model, processor = build_tiny(family, seed=0)
    return wrap(model, processor, attn_backend=attn_backend)

