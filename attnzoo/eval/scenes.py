"""Synthetic COCO-format scenes with known object co-occurrence: the data of the offline hallucination testbed.

Each scene is a small RGB image holding a few objects of :data:`CATEGORIES` (24 COCO categories, real COCO
names and category ids), each drawn with PIL as one shape + one colour + one texture unique to its category
(:data:`APPEARANCE`), at a random size and position; later objects may partly cover earlier ones. The scene
goes through albumentations (flip, small affine, brightness/contrast, small hue/saturation shift, blur or
noise) with its boxes, and is written as COCO: ``annotations/instances_<split>.json``,
``annotations/captions_<split>.json`` (two template captions naming the objects) and ``<split>/*.png``, which
:class:`attnzoo.eval.CocoDataset`, pycocotools, POPE and CHAIR read unchanged.

The co-occurrence prior (what a model trained on the scenes learns, and what POPE-adversarial probes):

- The categories form *groups*: 8 companion pairs (:data:`PAIRS`: fork+knife, cup+dining table,
  mouse+keyboard, tennis racket+sports ball, toothbrush+sink, baseball bat+baseball glove, remote+tv,
  spoon+bowl) and 8 single categories (:data:`SINGLES`).
- A scene draws ``groups_per_scene`` distinct groups uniformly (2 or 3 by default). A drawn pair shows both
  members with probability ``cooccurrence`` and otherwise exactly one of them, each with probability 1/2.
  No category can enter a scene any other way, so among scenes holding a member of a pair, the fraction
  holding both is exactly ``cooccurrence`` in expectation, and ``P(companion | object) = 2c / (1 + c)``.
- Training scenes use a strong prior (``cooccurrence=0.9``: the companion is present 95% of the times its
  partner is); the evaluation split uses held-out statistics (``cooccurrence=0.25``: companions are absent
  most of the time), so a model that answers from the prior says "yes" to absent companions.

Everything (layout, colours, augmentation) is drawn from generators seeded by ``seed``: the same arguments
write the same files, byte for byte. PIL, numpy and albumentations are imported by the functions.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnzoo._logging import get_logger

logger = get_logger("eval.scenes")

# COCO 2014/2017 category ids of the names used.
CATEGORIES: dict[str, int] = {
    "fork": 48, "knife": 49, "cup": 47, "dining table": 67, "mouse": 74, "keyboard": 76, "tennis racket": 43,
    "sports ball": 37, "toothbrush": 90, "sink": 81, "baseball bat": 39, "baseball glove": 40, "remote": 75,
    "tv": 72, "spoon": 50, "bowl": 51, "apple": 53, "banana": 52, "clock": 85, "book": 84, "umbrella": 28,
    "kite": 38, "vase": 86, "teddy bear": 88,
}
PAIRS: tuple[tuple[str, str], ...] = (
    ("fork", "knife"), ("cup", "dining table"), ("mouse", "keyboard"), ("tennis racket", "sports ball"),
    ("toothbrush", "sink"), ("baseball bat", "baseball glove"), ("remote", "tv"), ("spoon", "bowl"),
)
SINGLES: tuple[str, ...] = ("apple", "banana", "clock", "book", "umbrella", "kite", "vase", "teddy bear")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30),
    "orange": (245, 130, 20), "purple": (130, 40, 180), "cyan": (30, 210, 220), "magenta": (230, 40, 200),
    "brown": (120, 70, 30), "black": (15, 15, 15), "white": (245, 245, 245), "pink": (250, 160, 190),
}
# category -> (shape, colour, texture): every triple is unique; the two members of a pair differ in all three.
APPEARANCE: dict[str, tuple[str, str, str]] = {
    "fork": ("vbar", "white", "solid"), "knife": ("triangle", "blue", "stripes"),
    "cup": ("square", "red", "solid"), "dining table": ("hbar", "brown", "checker"),
    "mouse": ("ellipse", "black", "solid"), "keyboard": ("square", "white", "checker"),
    "tennis racket": ("ring", "green", "solid"), "sports ball": ("circle", "orange", "dots"),
    "toothbrush": ("cross", "cyan", "solid"), "sink": ("semicircle", "white", "stripes"),
    "baseball bat": ("diamond", "brown", "solid"), "baseball glove": ("hexagon", "purple", "dots"),
    "remote": ("star", "magenta", "solid"), "tv": ("square", "black", "stripes"),
    "spoon": ("semicircle", "yellow", "solid"), "bowl": ("ellipse", "pink", "stripes"),
    "apple": ("circle", "red", "solid"), "banana": ("ellipse", "yellow", "stripes"),
    "clock": ("ring", "white", "dots"), "book": ("hbar", "green", "stripes"),
    "umbrella": ("triangle", "purple", "solid"), "kite": ("diamond", "cyan", "checker"),
    "vase": ("hexagon", "blue", "solid"), "teddy bear": ("circle", "brown", "checker"),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "hexagon", "cross", "ring", "hbar",
                           "vbar", "semicircle", "ellipse")
TEXTURES: tuple[str, ...] = ("solid", "stripes", "dots", "checker")
CAPTION_TEMPLATES: tuple[str, ...] = ("A picture of {}.", "There is {} in the image.")
TRAIN_COOCCURRENCE = 0.9
EVAL_COOCCURRENCE = 0.25


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: its category name and COCO box ``(x, y, w, h)`` in pixels (after augmentation)."""

    name: str
    bbox: tuple[float, float, float, float]


def groups() -> list[tuple[str, ...]]:
    """The sampling groups: each pair of :data:`PAIRS`, then each of :data:`SINGLES` alone."""
    return [tuple(p) for p in PAIRS] + [(s,) for s in SINGLES]


def companion(name: str) -> str | None:
    """The prior companion of a category (``"knife"`` for ``"fork"``), or None for a single category."""
    for a, b in PAIRS:
        if name == a:
            return b
        if name == b:
            return a
    return None


def with_article(name: str) -> str:
    """``"a fork"`` / ``"an apple"``: the article POPE's question template uses."""
    return ("an " if name[0] in "aeiou" else "a ") + name


def caption_for(names: Sequence[str], template: str = CAPTION_TEMPLATES[0]) -> str:
    """A template caption naming every object once: ``"A picture of a fork, a knife and an apple."``"""
    items = [with_article(n) for n in names]
    listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return template.format(listed)


def sample_scene_objects(rng: random.Random, cooccurrence: float, groups_per_scene: tuple[int, int]) -> list[str]:
    """The category names of one scene (distinct, shuffled), drawn with the group prior of the module docstring."""
    all_groups = groups()
    k = rng.randint(*groups_per_scene)
    names: list[str] = []
    for group in rng.sample(all_groups, k):
        if len(group) == 1:
            names.extend(group)
        elif rng.random() < cooccurrence:
            names.extend(group)
        else:
            names.append(group[rng.randrange(2)])
    rng.shuffle(names)
    return names


def _polygon(shape: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]] | None:
    import math

    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "hexagon":
        return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in (k * math.pi / 3 for k in range(6))]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * rx * math.cos(a), cy + r * ry * math.sin(a)))
        return pts
    if shape == "cross":
        tx, ty = rx / 3, ry / 3
        return [(cx - tx, y0), (cx + tx, y0), (cx + tx, cy - ty), (x1, cy - ty), (x1, cy + ty), (cx + tx, cy + ty),
                (cx + tx, y1), (cx - tx, y1), (cx - tx, cy + ty), (x0, cy + ty), (x0, cy - ty), (cx - tx, cy - ty)]
    return None


def _shape_box(shape: str, size: int, x: int, y: int) -> tuple[int, int, int, int]:
    """Bounding box of a shape of nominal ``size`` whose top-left corner is at ``(x, y)``."""
    if shape == "hbar":
        return x, y, x + size, y + max(3, size // 2)
    if shape == "vbar":
        return x, y, x + max(3, size // 2), y + size
    if shape in ("ellipse", "semicircle"):
        return x, y, x + size, y + max(3, (2 * size) // 3)
    return x, y, x + size, y + size


def _draw_mask(shape: str, box: tuple[int, int, int, int], image_size: int) -> Any:
    from PIL import Image, ImageDraw

    mask = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    poly = _polygon(shape, box)
    if poly is not None:
        draw.polygon(poly, fill=255)
    elif shape in ("circle", "ellipse"):
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif shape == "ring":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=255)
        t = max(2, (x1 - x0) // 4)
        draw.ellipse((x0 + t, y0 + t, x1 - 1 - t, y1 - 1 - t), fill=0)
    elif shape == "semicircle":
        draw.pieslice((x0, y0, x1 - 1, y0 + 2 * (y1 - y0) - 1), 180, 360, fill=255)
    else:  # square, hbar, vbar
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
    return mask


def _texture(texture: str, colour: tuple[int, int, int], image_size: int) -> Any:
    """A full-image RGB fill of the colour with the texture (darker / lighter second tone), as a numpy array."""
    import numpy as np

    base = np.array(colour, dtype=np.float32)
    # the second tone: darker for light colours, lighter for dark ones, so the texture shows on every colour
    second = base * 0.45 if base.mean() > 90 else np.minimum(base + 120, 255)
    yy, xx = np.mgrid[:image_size, :image_size]
    if texture == "solid":
        pattern = np.zeros((image_size, image_size), bool)
    elif texture == "stripes":
        pattern = (yy // 2) % 2 == 1
    elif texture == "dots":
        pattern = (yy % 4 == 1) & (xx % 4 == 1)
    elif texture == "checker":
        pattern = ((yy // 3) + (xx // 3)) % 2 == 1
    else:
        raise ValueError(f"unknown texture {texture!r}; choose one of {TEXTURES}")
    return np.where(pattern[..., None], second, base).astype(np.uint8)


def _iou_max(box: tuple[int, int, int, int], others: Sequence[tuple[int, int, int, int]]) -> float:
    """Largest fraction of ``box`` (or of another box) covered by their intersection."""
    worst = 0.0
    for o in others:
        iw = max(0, min(box[2], o[2]) - max(box[0], o[0]))
        ih = max(0, min(box[3], o[3]) - max(box[1], o[1]))
        inter = iw * ih
        if inter:
            small = min((box[2] - box[0]) * (box[3] - box[1]), (o[2] - o[0]) * (o[3] - o[1]))
            worst = max(worst, inter / small)
    return worst


def render_scene(names: Sequence[str], rng: random.Random, image_size: int = 64,
                 max_overlap: float = 0.35) -> tuple[Any, list[tuple[int, int, int, int]]]:
    """Draw the objects ``names`` in order on a noisy tinted background.

    Sizes are drawn in ``[0.22, 0.38] * image_size``; positions by rejection so that no two boxes share more
    than ``max_overlap`` of the smaller one (partial occlusion, never full). Returns ``(uint8 array (S, S, 3),
    boxes as (x0, y0, x1, y1) pixels)`` in the order of ``names``.
    """
    import numpy as np
    from PIL import Image

    nrng = np.random.default_rng(rng.getrandbits(63))
    tint = np.array([rng.randint(90, 170) for _ in range(3)], dtype=np.float32)
    background = tint + nrng.normal(0.0, 10.0, (image_size, image_size, 3))
    canvas = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    boxes: list[tuple[int, int, int, int]] = []
    for name in names:
        shape, colour, texture = APPEARANCE[name]
        for attempt in range(50):
            size = rng.randint(int(0.22 * image_size), int(0.38 * image_size))
            box0 = _shape_box(shape, size, 0, 0)
            x = rng.randint(1, image_size - box0[2] - 1)
            y = rng.randint(1, image_size - box0[3] - 1)
            box = _shape_box(shape, size, x, y)
            if _iou_max(box, boxes) <= max_overlap or attempt == 49:
                break
        mask = _draw_mask(shape, box, image_size)
        canvas.paste(Image.fromarray(_texture(texture, COLOURS[colour], image_size)), (0, 0), mask)
        boxes.append(box)
    return np.asarray(canvas), boxes


def _augmenter(seed: int) -> Any:
    import albumentations as A

    # Photometric changes stay small in hue: colour is part of what tells the categories apart.
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Affine(scale=(0.9, 1.1), rotate=(-12, 12), translate_percent=(-0.04, 0.04), border_mode=1, p=0.7),
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.7),
            A.HueSaturationValue(hue_shift_limit=4, sat_shift_limit=15, val_shift_limit=10, p=0.5),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 3), p=1.0), A.GaussNoise(std_range=(0.02, 0.06), p=1.0)], p=0.4),
        ],
        bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True, min_visibility=0.0,
                                 min_area=0.0),
        seed=seed,
    )


def file_name(split: str, image_id: int) -> str:
    """COCO-style file name of a scene image: ``scenes_<split>_000000000001.png``."""
    return f"scenes_{split}_{image_id:012d}.png"


def generate_scenes(root: str | Path, split: str, num_images: int, seed: int = 0,
                    cooccurrence: float = TRAIN_COOCCURRENCE, image_size: int = 64,
                    groups_per_scene: tuple[int, int] = (2, 3), progress: bool = False) -> Path:
    """Write ``num_images`` synthetic scenes as a COCO split under ``root`` and return ``root``.

    Args:
        root: dataset folder; gets ``annotations/instances_<split>.json``, ``annotations/captions_<split>.json``
            and ``<split>/scenes_<split>_<id:012d>.png`` (RGB, ``image_size`` x ``image_size``, uint8).
        split: split name (annotation and image folder names), e.g. ``"train"`` or ``"eval"``.
        num_images: scenes to write; image ids are ``1..num_images``.
        seed: seeds layout, appearance jitter and augmentation; same arguments -> same bytes.
        cooccurrence: probability in [0, 1] that a drawn companion pair shows both members (else one member,
            uniformly); see the module docstring. 0.9 for training, 0.25 for the held-out evaluation split.
        image_size: side in pixels (>= 32).
        groups_per_scene: inclusive range of groups drawn per scene (each within 1..16).

    Each image has 2 captions (:data:`CAPTION_TEMPLATES`) naming its objects in annotation order; the
    instance file has one annotation per object (``bbox`` as COCO ``[x, y, w, h]`` after augmentation,
    ``area`` = box area, ``iscrowd`` 0) and the 24 categories of :data:`CATEGORIES`.
    """
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    if not 0.0 <= cooccurrence <= 1.0:
        raise ValueError(f"cooccurrence {cooccurrence} is not a probability; pass a value in [0, 1]")
    if image_size < 32:
        raise ValueError(f"image_size {image_size} is too small to draw the textures; use at least 32")
    lo, hi = groups_per_scene
    if not 1 <= lo <= hi <= len(groups()):
        raise ValueError(f"groups_per_scene {groups_per_scene} must satisfy 1 <= low <= high <= {len(groups())}")
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"scenes-{seed}-{split}")
    augment = _augmenter(seed)
    ids = {name: CATEGORIES[name] for name in CATEGORIES}
    images, instances, captions = [], [], []
    for image_id in tqdm(range(1, num_images + 1), desc=f"scenes {split}", disable=not progress):
        names = sample_scene_objects(rng, cooccurrence, groups_per_scene)
        pixels, boxes = render_scene(names, rng, image_size)
        out = augment(image=pixels, bboxes=np.array(boxes, dtype=np.float32), labels=list(range(len(names))))
        kept = {int(label): box for label, box in zip(out["labels"], out["bboxes"])}
        fname = file_name(split, image_id)
        Image.fromarray(out["image"]).save(root / split / fname)
        images.append({"id": image_id, "file_name": fname, "width": image_size, "height": image_size})
        for k, name in enumerate(names):
            # clip=True keeps every box inside the frame; an object pushed fully out keeps its pre-affine box
            x0, y0, x1, y1 = (float(v) for v in kept.get(k, boxes[k]))
            instances.append({"id": len(instances) + 1, "image_id": image_id, "category_id": ids[name],
                              "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                              "area": round((x1 - x0) * (y1 - y0), 2), "iscrowd": 0})
        for template in CAPTION_TEMPLATES:
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": caption_for(names, template)})
    categories = [{"id": cid, "name": name, "supercategory": "scene"} for name, cid in CATEGORIES.items()]
    info = {"description": "attnzoo synthetic co-occurrence scenes", "split": split, "seed": seed,
            "cooccurrence": cooccurrence, "image_size": image_size, "groups_per_scene": list(groups_per_scene)}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
        {"info": info, "images": images, "annotations": instances, "categories": categories}))
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(
        {"info": info, "images": images, "annotations": captions}))
    logger.info("wrote %d scenes (%d objects) to %s/%s (cooccurrence=%.2f)", num_images, len(instances), root, split,
                cooccurrence)
    return root


def pair_statistics(image_objects: dict[str, Sequence[str]] | Sequence[Sequence[str]]) -> dict[tuple[str, str],
                                                                                                 tuple[int, int]]:
    """Per companion pair: ``(scenes holding at least one member, scenes holding both)``.

    ``image_objects`` is ``CocoDataset.image_objects()`` or a list of per-scene name lists. The ratio
    estimates the ``cooccurrence`` a split was generated with.
    """
    scenes = list(image_objects.values()) if isinstance(image_objects, dict) else list(image_objects)
    out = {}
    for a, b in PAIRS:
        any_ = sum(1 for s in scenes if a in s or b in s)
        both = sum(1 for s in scenes if a in s and b in s)
        out[(a, b)] = (any_, both)
    return out
