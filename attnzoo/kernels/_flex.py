"""The FlexAttention callable shared by the ``flex`` backends (NA, routed, halo).

On CUDA ``flex_attention`` runs compiled (its fused Triton kernel), compiled once per process. It specialises
on every shape, block mask, score_mod and grad mode, so a model's stages in training and evaluation need
more than dynamo's default 8 compiled variants; past that limit it silently runs eagerly and materialises
the full score matrix (NAT ran out of memory at batch 128). Our compiled call therefore gets its own limit.
Elsewhere (the CPU) ``flex_attention`` runs eagerly: unfused and forward-only, for tests.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

FLEX_RECOMPILE_LIMIT = 64


@functools.cache
def _compiled_flex() -> Callable[..., object]:
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def call(*args, **kwargs):
        with torch._dynamo.config.patch(recompile_limit=FLEX_RECOMPILE_LIMIT):
            return compiled(*args, **kwargs)
    return call


def flex_attention_fn(device: torch.device | str) -> Callable[..., object]:
    """``flex_attention`` for tensors on ``device``: compiled (with its own recompile limit) on CUDA, eager
    elsewhere. Same signature as ``torch.nn.attention.flex_attention.flex_attention``."""
    if torch.device(device).type != "cuda":
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention
    return _compiled_flex()
