"""The synthetic co-occurrence scenes: determinism, the asked co-occurrence statistics, COCO/POPE compatibility."""

from __future__ import annotations

import math
import random

import pytest

from attnzoo.eval import CocoDataset, build_all_splits
from attnzoo.eval.scenes import (
    APPEARANCE,
    CATEGORIES,
    PAIRS,
    SINGLES,
    caption_for,
    companion,
    generate_scenes,
    pair_statistics,
    sample_scene_objects,
)


def _within(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    """Binomial count within ``sigmas`` standard deviations of ``n * p``."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


def test_appearance_table_is_distinct():
    assert set(APPEARANCE) == set(CATEGORIES) == {n for p in PAIRS for n in p} | set(SINGLES)
    assert len(set(APPEARANCE.values())) == len(APPEARANCE)
    assert len(set(CATEGORIES.values())) == len(CATEGORIES)
    for a, b in PAIRS:
        assert all(x != y for x, y in zip(APPEARANCE[a], APPEARANCE[b])), (a, b)
        assert companion(a) == b and companion(b) == a
    assert companion("apple") is None


@pytest.mark.parametrize("c", [0.9, 0.25])
def test_sampler_cooccurrence_matches_request(c):
    rng = random.Random(1)
    scenes = [sample_scene_objects(rng, c, (2, 3)) for _ in range(4000)]
    assert all(len(set(s)) == len(s) for s in scenes)
    stats = pair_statistics(scenes)
    for pair, (n, both) in stats.items():
        assert n > 300, pair
        assert _within(both, n, c), (pair, both, n, c)
    # P(companion | object) = 2c / (1 + c), checked on the fork side pooled over all pairs
    n_a = sum(1 for s in scenes for a, _ in PAIRS if a in s)
    n_ab = sum(1 for s in scenes for a, b in PAIRS if a in s and b in s)
    assert _within(n_ab, n_a, 2 * c / (1 + c))
    # a wrong rate is detected: the test can fail
    wrong = 0.9 if c < 0.5 else 0.25
    assert not all(_within(both, n, wrong) for n, both in stats.values())


def test_generator_is_deterministic_per_seed(tmp_path):
    kwargs = dict(split="val", num_images=6, image_size=32)
    a, b, c = (generate_scenes(tmp_path / name, seed=s, **kwargs) for name, s in (("a", 3), ("b", 3), ("c", 4)))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 2 + 6
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_output_reads_through_coco_and_builds_pope(tmp_path):
    root = generate_scenes(tmp_path, "eval", num_images=60, seed=0, cooccurrence=0.25, image_size=48)
    coco = CocoDataset(root, "eval", captions=True)
    assert coco.image_ids() == list(range(1, 61))
    objects = coco.image_objects()
    assert len(objects) == 60
    for image_id in coco.image_ids():
        names = coco.objects(image_id)
        assert coco.reference_captions(image_id)[0] == caption_for(names)
        assert coco.image_path(image_id).is_file()
        for ann in coco.instances.imgToAnns[image_id]:
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 48 + 1e-3 and y + h <= 48 + 1e-3
    # the annotations carry the asked statistic (pooled over pairs)
    n = sum(v[0] for v in pair_statistics(objects).values())
    both = sum(v[1] for v in pair_statistics(objects).values())
    assert _within(both, n, 0.25), (both, n)
    eligible = sum(1 for v in objects.values() if len(v) >= 3)
    sets = build_all_splits(objects, num_images=min(20, eligible), seed=0, image_ids=coco.file_to_id())
    adversarial = sets["adversarial"]
    assert len(adversarial) == 6 * min(20, eligible)
    # adversarial negatives are often the absent companion of the positive just asked
    hits = sum(1 for pos, neg in zip(adversarial[::2], adversarial[1::2]) if companion(pos.object) == neg.object)
    assert hits > 0
    assert all(q.label == ("yes" if q.object in objects[q.image] else "no") for q in adversarial)
