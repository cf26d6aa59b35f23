"""CHAIR: object extraction (synonyms, plurals, two-word names, the official special cases) and metrics."""

from __future__ import annotations

import pytest

from attnzoo.eval import Chair, CocoDataset, chair_metrics, coco_ground_truth, load_synonyms


@pytest.fixture(scope="module")
def chair() -> Chair:
    return Chair()


def test_synonym_table_is_the_official_one():
    rows = load_synonyms()
    assert len(rows) == 80  # one row per COCO category
    assert rows[0][:4] == ["person", "girl", "boy", "man"]
    assert rows[-1] == ["toothbrush"]
    assert ["hair drier", "hairdryer"] in rows and ["dining table", "table", "desk"] in rows


@pytest.mark.parametrize("caption, expected", [
    ("Two dogs and three knives.", [("dog", "dog"), ("knife", "knife")]),                 # plurals
    ("People and children near the buses.", [("people", "person"), ("child", "person"), ("bus", "bus")]),
    ("A puppy on a sofa by the fridge.", [("puppy", "dog"), ("sofa", "couch"), ("fridge", "refrigerator")]),
    ("A man eats hot dogs.", [("man", "person"), ("hot dog", "hot dog")]),                # not a dog
    ("A child holds a teddy bear.", [("child", "person"), ("teddy bear", "teddy bear")]),  # not a bear
    ("A baby giraffe and an adult elephant.", [("giraffe", "giraffe"), ("elephant", "elephant")]),  # no person
    ("A passenger jet at the gate.", [("jet", "airplane")]),                             # no passenger
    ("The toilet seat is up.", [("toilet", "toilet")]),                                   # not a chair
    ("A toilet next to a seat.", [("toilet", "toilet")]),                                 # seat dropped
    ("Wine glasses and cell phones on a dining table.",
     [("wine glass", "wine glass"), ("cell phone", "cell phone"), ("table", "dining table")]),  # not a double word
    ("Two men ride motor bikes past a stop sign.",
     [("man", "person"), ("motor bike", "motorcycle"), ("stop sign", "stop sign")]),
    ("A man wearing a bow tie.", [("man", "person"), ("tie", "tie")]),
    ("A skier holds skis and a tennis racket.",
     [("skier", "person"), ("ski", "skis"), ("tennis racket", "tennis racket")]),
    ("A cat, a cat and a cat.", [("cat", "cat")] * 3),                                    # repeats kept
    ("An empty street at night.", []),
])
def test_caption_objects(chair, caption, expected):
    assert chair.caption_objects(caption) == expected


def test_metrics_hand_computed(chair):
    truth = {1: {"person", "dog", "frisbee"}, 6: {"knife", "fork", "dining table"}}
    captions = [(1, "A man and his puppy play with a frisbee."),              # 9 words, 3 mentions, none wrong
                (6, "A knife and a cup on a table next to a chair.")]       # 12 words, 4 mentions: cup, chair wrong
    metrics, per = chair.score(captions, truth)
    assert [len(p.hallucinated) for p in per] == [0, 2]
    assert per[1].hallucinated == [("cup", "cup"), ("chair", "chair")]
    assert metrics["chair_s"] == 0.5
    assert metrics["chair_i"] == pytest.approx(2 / 7)
    assert metrics["recall"] == pytest.approx(5 / 6)   # (3 + knife, table) of 3 + 3
    assert metrics["mean_length"] == pytest.approx(10.5)
    assert chair_metrics(per[:1])["chair_s"] == 0.0
    with pytest.raises(ValueError, match="no ground truth"):
        chair.score([(99, "A dog.")], truth)


def test_ground_truth_from_instances_and_captions(coco_root, chair):
    ds = CocoDataset(coco_root, captions=True)
    truth = coco_ground_truth(chair, ds, [1, 6])
    assert truth[1] == {"person", "dog", "frisbee"}                 # "puppy", "people" map into these
    assert truth[6] == {"knife", "fork", "dining table", "cup"}     # "cup" comes from the reference caption
    metrics, _ = chair.score([(6, "A knife and a cup on a table next to a chair.")], truth)
    assert metrics["chair_i"] == pytest.approx(1 / 4) and metrics["recall"] == pytest.approx(3 / 4)
