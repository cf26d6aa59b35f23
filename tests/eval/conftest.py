"""Fixtures of the eval tests: a small COCO-format dataset (instances, captions, image files) in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CATEGORIES = {1: "person", 3: "car", 8: "truck", 18: "dog", 34: "frisbee", 48: "fork", 49: "knife", 53: "apple",
              55: "orange", 67: "dining table"}
# image id -> category ids in annotation order (repeats are further instances of the same category)
OBJECTS = {
    1: [1, 18, 1, 34],         # person, dog, (person), frisbee
    2: [1, 3, 8],              # person, car, truck
    3: [53, 55, 49, 48],       # apple, orange, knife, fork
    4: [18],                   # dog only: too few objects for POPE
    5: [3, 1, 8, 67],          # car, person, truck, dining table
    6: [49, 48, 67],           # knife, fork, dining table
}
CAPTIONS = {
    1: ["A man throws a frisbee to his dog.", "Two people play with a puppy in a park."],
    2: ["A truck and a car parked on a street.", "A person walks past parked vehicles."],
    3: ["Apples and oranges next to a knife and a fork."],
    4: ["A dog sleeping on the grass."],
    5: ["Cars and a truck near a table outside a cafe."],
    6: ["A knife and fork on a wooden table beside a cup."],
}


def file_name(image_id: int, split: str = "val2014") -> str:
    """COCO's file naming."""
    return f"COCO_{split}_{image_id:012d}.jpg"


def write_coco(root: Path, split: str = "val2014", objects: dict[int, list[int]] | None = None,
               captions: dict[int, list[str]] | None = None, images: bool = True) -> Path:
    """Write a COCO-format dataset under ``root`` (annotations/ + ``split``/ image files)."""
    objects = OBJECTS if objects is None else objects
    captions = CAPTIONS if captions is None else captions
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    imgs = [{"id": i, "file_name": file_name(i, split), "width": 16, "height": 16} for i in sorted(objects)]
    anns, aid = [], 1
    for i, cats in objects.items():
        for c in cats:
            anns.append({"id": aid, "image_id": i, "category_id": c, "bbox": [0, 0, 4, 4], "area": 16.0,
                         "iscrowd": 0, "segmentation": [[0, 0, 4, 0, 4, 4]]})
            aid += 1
    cats = [{"id": k, "name": v, "supercategory": "x"} for k, v in CATEGORIES.items()]
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": imgs, "annotations": anns, "categories": cats}))
    caps = [{"id": 1000 + n, "image_id": i, "caption": c}
            for n, (i, c) in enumerate((i, c) for i, cs in captions.items() for c in cs)]
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": imgs, "annotations": caps}))
    if images:
        (root / split).mkdir(exist_ok=True)
        rng = np.random.default_rng(0)
        for i in objects:
            Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(root / split / file_name(i, split))
    return root


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    """A 6-image COCO val2014 layout with instances, captions and 16x16 images."""
    return write_coco(tmp_path / "coco")


@pytest.fixture
def one_thread():
    """One torch CPU thread for the test: the same reduction order in every run (recorded greedy answers stay
    exact) and fast on a busy shared CPU."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
