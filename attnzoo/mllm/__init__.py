"""attnzoo.mllm: wrappers around Hugging Face vision-language models (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL,
Qwen2.5-VL) that know where the image tokens are and route every attention call through one function.

    lvlm = attnzoo.mllm.load("llava-hf/llava-1.5-7b-hf", dtype=torch.float16, device="cuda")
    lvlm.generate([image], ["Is there a dog in the image?"])          # -> ["Yes"]
    batch = lvlm.prepare([image], ["Describe the image."])            # inputs + TokenLayout
    with lvlm.attach(MyPass()):                                       # an AttentionPass
        lvlm.generate([image], ["Describe the image."])

Pieces: :func:`load` / :func:`wrap` -> :class:`LVLM`; :class:`TokenLayout` and :class:`ImageSpan` (positions
of image tokens, instruction, padding, generation start); :class:`AttentionPass`, :class:`Plan` and
:class:`AttentionContext` (the protocol mitigation passes implement); :mod:`attnzoo.mllm.tiny` (offline tiny
models for tests). See docs/mllm.md. transformers is imported lazily: importing this package is cheap.
"""

from __future__ import annotations

from .attention import AttentionContext, AttentionPass, Plan, attnzoo_attention, register
from .layout import ImageSpan, TokenLayout
from .lvlm import ARCHITECTURES, LVLM, Batch, PassHandle, load, wrap
from .tiny import (
    build_random_llava,
    build_tiny,
    build_tiny_llava,
    build_tiny_llava_next,
    build_tiny_qwen2_5_vl,
    build_tiny_qwen2_vl,
)

__all__ = [
    "ARCHITECTURES", "LVLM", "AttentionContext", "AttentionPass", "Batch", "ImageSpan", "PassHandle", "Plan",
    "TokenLayout", "attnzoo_attention", "build_random_llava", "build_tiny", "build_tiny_llava", "build_tiny_llava_next",
    "build_tiny_qwen2_5_vl", "build_tiny_qwen2_vl", "load", "register", "wrap",
]
