"""attnzoo: attention-centric vision backbones, fused Triton attention kernels, and training-free
hallucination mitigation for large vision-language models.

``import attnzoo`` registers the vision models with timm (``timm.create_model("nat_tiny")`` works
afterwards) and imports nothing heavier than torch and timm: transformers, triton and open_clip are
imported only by the parts that need them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import vision  # noqa: E402,F401  (registers the models with timm)

__all__ = ["__version__", "vision"]
