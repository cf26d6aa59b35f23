"""CLIPScore-style image-caption agreement beside CHAIR, with an open_clip model the user names.

CHAIR counts hallucinated objects; a pass can lower it by writing shorter or emptier captions. The CLIP
score shows that: ``2.5 * max(cos(image embedding, caption embedding), 0)`` per pair (Hessel et al., 2021),
averaged over the captions. Weights come from open_clip: a pretrained tag (``ViT-B-32`` + ``openai``) for
users with network, or a local checkpoint file. Offline (``HF_HUB_OFFLINE=1``) with weights not yet on the
machine, :class:`CLIPScorer` refuses with a message naming what to download, instead of hanging on retries.

    scorer = CLIPScorer("ViT-B-32", "openai")                 # or pretrained="/path/open_clip_model.safetensors"
    scores = scorer.score(images, captions)                  # (N,) float32 in [0, 2.5]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._logging import get_logger

logger = get_logger("attnzoo.eval")

CLIP_SCORE_WEIGHT = 2.5


def clip_score_from_embeddings(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                               weight: float = CLIP_SCORE_WEIGHT) -> torch.Tensor:
    """``weight * max(cos(image_i, text_i), 0)`` for paired rows: ``(N, D)``, ``(N, D)`` -> ``(N,)`` float32."""
    if image_embeddings.shape != text_embeddings.shape:
        raise ValueError(f"image embeddings {tuple(image_embeddings.shape)} and text embeddings "
                         f"{tuple(text_embeddings.shape)} must pair row by row")
    cos = torch.nn.functional.cosine_similarity(image_embeddings.float(), text_embeddings.float(), dim=-1)
    return weight * cos.clamp_min(0)


def _offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in flags)


def _cached_weights(model_name: str, tag: str) -> str | None:
    """Path of the already-downloaded weights for an open_clip (model, tag), or None."""
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name, tag)
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])
        for name in ([filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]):
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str):
                return hit
    if cfg.get("url"):
        local = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        if local.is_file():
            return str(local)
    return None


class CLIPScorer:
    """An open_clip model that scores (image, caption) pairs.

    Args:
        model_name: an open_clip architecture (``open_clip.list_models()``), e.g. "ViT-B-32".
        pretrained: a pretrained tag of that architecture (e.g. "openai"; needs network the first time) or the
            path of a local checkpoint file.
        device: where to run (default: cuda when available).
        batch_size: pairs per forward.

    Raises:
        ValueError: unknown architecture or tag (lists the valid ones).
        RuntimeError: offline and the weights are not on this machine (names what to download).
    """

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str = "openai", device: str | None = None,
                 batch_size: int = 64) -> None:
        import open_clip

        if model_name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
        weights: str = pretrained
        if not Path(pretrained).expanduser().is_file():
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if pretrained not in tags:
                raise ValueError(f"{pretrained!r} is neither a local checkpoint file nor a pretrained tag of "
                                 f"{model_name}; tags: {', '.join(tags) or '(none)'}")
            cached = _cached_weights(model_name, pretrained)
            if cached is None and _offline():
                raise RuntimeError(
                    f"CLIP weights {model_name}/{pretrained} are not on this machine and downloads are off "
                    "(HF_HUB_OFFLINE=1). Download them once with network: python -c \"import open_clip; "
                    f"open_clip.create_model_and_transforms('{model_name}', pretrained='{pretrained}')\", or pass "
                    "the path of a local open_clip checkpoint as the pretrained argument (--clip-pretrained PATH)")
            weights = cached or pretrained
        else:
            weights = str(Path(pretrained).expanduser())
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights)
        self.model = self.model.to(self.device).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.batch_size = batch_size
        self.name = f"{model_name}/{pretrained}"
        logger.info("CLIP score model %s on %s", self.name, self.device)

    @classmethod
    def from_model(cls, model: torch.nn.Module, preprocess: Any, tokenizer: Any, name: str = "custom",
                   batch_size: int = 64) -> CLIPScorer:
        """A scorer around an already-built open_clip model (e.g. one trained with attnzoo towers)."""
        self = cls.__new__(cls)
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, tokenizer
        self.device = next(model.parameters()).device
        self.batch_size, self.name = batch_size, name
        return self

    @torch.no_grad()
    def embed(self, images: Sequence[Any], captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised embeddings ``(N, D)`` of PIL images and of captions, float32 on the CPU."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions; they must pair one to one")
        img, txt = [], []
        for i in range(0, len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(im) for im in images[i:i + self.batch_size]]).to(self.device)
            tokens = self.tokenizer(list(captions[i:i + self.batch_size])).to(self.device)
            img.append(torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1).cpu())
            txt.append(torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(img), torch.cat(txt)

    def score(self, images: Sequence[Any], captions: Sequence[str]) -> torch.Tensor:
        """CLIP score per (image, caption) pair: ``(N,)`` float32 in ``[0, 2.5]``."""
        image_embeddings, text_embeddings = self.embed(images, captions)
        return clip_score_from_embeddings(image_embeddings, text_embeddings)


def mean_clip_score(scorer: CLIPScorer, pairs: Sequence[tuple[str | Path, str]]) -> float:
    """Mean CLIP score of ``(image path, caption)`` pairs (images opened with PIL, converted to RGB)."""
    from PIL import Image

    if not pairs:
        raise ValueError("no (image, caption) pairs to score")
    images = [Image.open(path).convert("RGB") for path, _ in pairs]
    return float(scorer.score(images, [caption for _, caption in pairs]).mean())
