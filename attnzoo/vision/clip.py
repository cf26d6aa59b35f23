"""attnzoo backbones as open_clip vision towers.

open_clip builds a CLIP model around any timm model named in a model config (``vision_cfg.timm_model_name``).
The configs for our towers ship as JSON data in ``attnzoo/data/open_clip/`` (a ViT-B-32-sized text tower,
512-d embedding) and are registered on demand, not at ``import attnzoo``::

    import open_clip
    from attnzoo.vision.clip import register_open_clip_models

    register_open_clip_models()    # -> ['attnzoo-agent-swin-tiny-clip', 'attnzoo-biformer-tiny-clip', ...]
    model, _, preprocess = open_clip.create_model_and_transforms("attnzoo-nat-tiny-clip", pretrained=None)

The models then train with open_clip's own training code (``python -m open_clip_train.main --model
attnzoo-nat-tiny-clip ...`` after calling ``register_open_clip_models()`` in the launcher), see docs/vision.md.
"""

from __future__ import annotations

from pathlib import Path

from .._logging import get_logger

logger = get_logger("attnzoo.vision")

CONFIG_DIR = Path(__file__).resolve().parents[1] / "data" / "open_clip"


def open_clip_model_names() -> list[str]:
    """Names of the open_clip model configs attnzoo ships (registered or not)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def register_open_clip_models() -> list[str]:
    """Register attnzoo's open_clip model configs with open_clip (idempotent); returns their names.

    Imports open_clip (and registers attnzoo's timm models, which the configs name). Raises ImportError with
    the install command when open_clip is missing.
    """
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - open-clip-torch is a dependency
        raise ImportError("open_clip is not installed: pip install open-clip-torch") from exc
    from . import list_models  # noqa: F401  (the towers must be registered with timm)

    names = open_clip_model_names()
    if not set(names) <= set(open_clip.list_models()):
        open_clip.add_model_config(CONFIG_DIR)
        logger.info("registered open_clip configs: %s", ", ".join(names))
    return names
