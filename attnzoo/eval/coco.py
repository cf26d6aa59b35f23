"""COCO access through pycocotools: instance and caption annotations, image files from a local folder.

Expected layout (the one COCO downloads unpack to)::

    COCO_ROOT/
      annotations/instances_val2014.json   object annotations (POPE ground truth, CHAIR ground truth)
      annotations/captions_val2014.json    reference captions (CHAIR ground truth, optional for POPE)
      val2014/COCO_val2014_000000000042.jpg ...

``split`` names the annotation files and the image folder (``val2014``, ``train2014``, ``val2017``...).
pycocotools is imported when a :class:`CocoDataset` is created, not with this module.
"""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path

from attnzoo._logging import get_logger

logger = get_logger("eval.coco")


class CocoDataset:
    """The instance (and optionally caption) annotations of one COCO split, and where its images are.

    Args:
        root: the COCO folder (see the module docstring for the layout).
        split: annotation/image split name, e.g. ``"val2014"``.
        captions: also load ``captions_<split>.json`` (needed for CHAIR).

    Raises:
        FileNotFoundError: naming the missing folder or file and what was expected there.
    """

    def __init__(self, root: str | Path, split: str = "val2014", captions: bool = False) -> None:
        self.root = Path(root)
        self.split = split
        check_coco_root(self.root, split, captions=captions)
        from pycocotools.coco import COCO

        # pycocotools prints progress to stdout; route it to the debug log instead.
        with contextlib.redirect_stdout(io.StringIO()) as out:
            self.instances = COCO(str(self.instances_path))
            self.captions = COCO(str(self.captions_path)) if captions else None
        logger.debug(out.getvalue().strip())
        self.category_names: dict[int, str] = {c["id"]: c["name"] for c in self.instances.loadCats(
            self.instances.getCatIds())}

    @property
    def instances_path(self) -> Path:
        """``<root>/annotations/instances_<split>.json``."""
        return self.root / "annotations" / f"instances_{self.split}.json"

    @property
    def captions_path(self) -> Path:
        """``<root>/annotations/captions_<split>.json``."""
        return self.root / "annotations" / f"captions_{self.split}.json"

    @property
    def image_dir(self) -> Path:
        """``<root>/<split>``: the folder of image files."""
        return self.root / self.split

    def image_ids(self) -> list[int]:
        """All image ids of the split, sorted."""
        return sorted(self.instances.getImgIds())

    def file_name(self, image_id: int) -> str:
        """The image's file name (``COCO_val2014_000000000042.jpg``)."""
        return self.instances.imgs[image_id]["file_name"]

    def image_path(self, image_id_or_file: int | str) -> Path:
        """Path of an image given its id or file name (the file need not exist yet)."""
        name = self.file_name(image_id_or_file) if isinstance(image_id_or_file, int) else image_id_or_file
        return self.image_dir / name

    def objects(self, image_id: int) -> list[str]:
        """Distinct category names annotated in the image, in annotation order (pycocotools keeps file order)."""
        names: list[str] = []
        for ann in self.instances.imgToAnns.get(image_id, []):
            name = self.category_names[ann["category_id"]]
            if name not in names:
                names.append(name)
        return names

    def image_objects(self) -> dict[str, list[str]]:
        """``{file_name: distinct object names}`` for every image with at least one object (POPE's input)."""
        out = {}
        for image_id in self.image_ids():
            objs = self.objects(image_id)
            if objs:
                out[self.file_name(image_id)] = objs
        return out

    def file_to_id(self) -> dict[str, int]:
        """``{file_name: image_id}`` for the split."""
        return {img["file_name"]: img_id for img_id, img in self.instances.imgs.items()}

    def reference_captions(self, image_id: int) -> list[str]:
        """The human captions of an image (requires ``captions=True``)."""
        if self.captions is None:
            raise RuntimeError("captions were not loaded; create the CocoDataset with captions=True")
        return [a["caption"] for a in self.captions.imgToAnns.get(image_id, [])]

    def sample_image_ids(self, num_images: int, seed: int = 0) -> list[int]:
        """``num_images`` image ids drawn without replacement (seeded) from the split, returned sorted."""
        ids = self.image_ids()
        if num_images > len(ids):
            raise ValueError(f"asked for {num_images} images but {self.instances_path} has {len(ids)}")
        return sorted(random.Random(seed).sample(ids, num_images))


def check_coco_root(root: str | Path, split: str = "val2014", captions: bool = False, images: bool = True) -> None:
    """Raise ``FileNotFoundError`` naming the first missing piece of the COCO layout, before anything loads."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"COCO folder {root} does not exist; expected a folder holding annotations/ and "
                                f"{split}/ (e.g. annotations/instances_{split}.json)")
    needed = [root / "annotations" / f"instances_{split}.json"]
    if captions:
        needed.append(root / "annotations" / f"captions_{split}.json")
    for path in needed:
        if not path.is_file():
            raise FileNotFoundError(f"COCO annotation file {path} not found; expected the {path.stem.split('_')[0]} "
                                    f"annotations of split {split} (from annotations_trainval{split[-4:]}.zip)")
    if images and not (root / split).is_dir():
        raise FileNotFoundError(f"COCO image folder {root / split} not found; expected the {split} images there")
