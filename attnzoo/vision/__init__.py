"""timm-registered vision backbones. Importing this package registers every model with timm.

Each architecture family lives in its own module (timm's layout: blocks, stages, model, default cfgs,
``checkpoint_filter_fn``, ``@register_model`` functions at the bottom).
"""

from __future__ import annotations

from ._registry import list_models, register_model

__all__ = ["list_models", "register_model"]

# Model families (each import registers its models with timm):
# --- nat.py (NAT, DiNAT) ---
from . import nat  # noqa: E402,F401,I001
# --- biformer.py ---
from . import biformer  # noqa: E402,F401
# --- agent attention, ela, pyramid tnt, halonet ---
from . import agent_deit, agent_pvt, agent_swin  # noqa: E402,F401
from . import ela, halonet, pyramid_tnt  # noqa: E402,F401
from .halonet import use_fused_attention  # noqa: E402

__all__ += ["use_fused_attention"]
