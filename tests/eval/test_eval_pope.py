"""POPE: question building (official sampling rules), files, answer parsing and metrics."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from attnzoo.eval import (
    CocoDataset,
    build_all_splits,
    build_questions,
    parse_yes_no,
    pope_metrics,
    read_questions,
    sample_images,
    score_answers,
    write_questions,
)
from attnzoo.eval.pope import co_occurrence_ranking, object_frequencies, question_text

# Three sampled images in draw order (what sample_images returns); expected questions computed by hand below.
IMAGES = {"b.jpg": ["person", "car", "truck"],
          "c.jpg": ["apple", "orange", "knife", "fork"],
          "a.jpg": ["person", "dog", "frisbee", "car"]}


def _negatives(qs):
    return [(q.image, q.object) for q in qs if q.label == "no"]


def test_frequencies_and_co_occurrence_by_hand():
    assert object_frequencies(IMAGES) == {"person": 2, "car": 2, "truck": 1, "apple": 1, "orange": 1, "knife": 1,
                                          "fork": 1, "dog": 1, "frisbee": 1}
    co = co_occurrence_ranking(IMAGES)
    assert co["person"] == ["car", "truck", "dog", "frisbee"]  # car twice, then first-seen order
    assert co["truck"] == ["person", "car"]
    assert co["apple"] == ["orange", "knife", "fork"]


def test_popular_negatives_are_the_most_frequent_absent_objects():
    qs = build_questions(IMAGES, "popular")
    # popularity order: person, car, truck, apple, orange, knife, fork, dog, frisbee
    assert _negatives(qs) == [("b.jpg", "apple"), ("b.jpg", "orange"), ("b.jpg", "knife"),
                              ("c.jpg", "person"), ("c.jpg", "car"), ("c.jpg", "truck"),
                              ("a.jpg", "truck"), ("a.jpg", "apple"), ("a.jpg", "orange")]


def test_adversarial_negatives_follow_co_occurrence_of_each_positive():
    qs = build_questions(IMAGES, "adversarial", seed=3)
    neg = _negatives(qs)
    # b: person -> dog (car, truck present); car -> frisbee (person present, dog asked); truck -> ranking
    # (person, car) exhausted -> random fallback among objects absent and not asked.
    assert neg[0] == ("b.jpg", "dog") and neg[1] == ("b.jpg", "frisbee")
    assert neg[2][1] in {"apple", "orange", "knife", "fork"}
    # c: apple -> its co-occurring objects are all present -> random; a: person -> truck; dog -> none left but
    # person/frisbee/car present -> random; frisbee -> random.
    assert neg[6] == ("a.jpg", "truck")


def test_structure_counts_and_rules(coco_root):
    ds = CocoDataset(coco_root)
    objects = ds.image_objects()
    assert objects["COCO_val2014_000000000001.jpg"] == ["person", "dog", "frisbee"]  # distinct, annotation order
    sets = build_all_splits(objects, num_images=4, seed=0, image_ids=ds.file_to_id())
    images = None
    for qs in sets.values():
        assert len(qs) == 4 * 6
        assert [q.question_id for q in qs] == list(range(1, 25))
        assert [q.label for q in qs] == ["yes", "no"] * 12  # interleaved as the official code
        per_image = {}
        for q in qs:
            per_image.setdefault(q.image, []).append(q)
        assert len(per_image) == 4
        images = images or set(per_image)
        assert set(per_image) == images, "all splits use the same sampled images"
        for img, iq in per_image.items():
            truth = objects[img]
            assert [q.object for q in iq if q.label == "yes"] == truth[:3]
            negs = [q.object for q in iq if q.label == "no"]
            assert not set(negs) & set(truth) and len(set(negs)) == 3
            assert all(q.image_id == ds.file_to_id()[img] for q in iq)
    assert "COCO_val2014_000000000004.jpg" not in images  # only one object
    again = build_all_splits(objects, num_images=4, seed=0, image_ids=ds.file_to_id())
    assert again == sets


def test_seed_changes_the_draw():
    objs = {f"{i}.jpg": ["person", "car", "dog", "cat"][i % 2:] + ["bus"] for i in range(30)}
    draws = {tuple(sample_images(objs, 5, seed=s)) for s in range(5)}
    assert len(draws) > 1
    assert sample_images(objs, 5, seed=1) == sample_images(objs, 5, seed=1)


def test_random_negatives_come_from_sampled_objects_only():
    qs = build_questions(IMAGES, "random", seed=1)
    pool = set(object_frequencies(IMAGES))
    assert all(o in pool for _, o in _negatives(qs))


def test_too_few_images_and_unknown_split():
    with pytest.raises(ValueError, match="only 3"):
        sample_images(IMAGES, num_images=4)
    with pytest.raises(ValueError, match="random, popular, adversarial"):
        build_questions(IMAGES, "hard")


def test_question_text_articles():
    assert question_text("dog") == "Is there a dog in the image?"
    assert question_text("apple") == "Is there an apple in the image?"
    assert question_text("umbrella") == "Is there an umbrella in the image?"
    assert question_text("apple", "Does the picture show {}?") == "Does the picture show apple?"


def test_question_file_roundtrip_and_official_format(tmp_path):
    qs = build_questions(IMAGES, "popular", image_ids={"a.jpg": 7})
    path = tmp_path / "coco_pope_popular.json"
    write_questions(qs, path)
    assert read_questions(path) == qs
    official = tmp_path / "official.json"
    official.write_text('{"question_id": 0, "image": "COCO_val2014_000000548882.jpg", "image_id": 548882, '
                        '"text": "Is there a dining table in the image?", "label": "yes"}\n'
                        '{"question_id": 1, "image": "COCO_val2014_000000548882.jpg", "image_id": 548882, '
                        '"text": "Is there a chair in the image?", "label": "no"}\n')
    got = read_questions(official)
    assert [(q.question_id, q.label, q.image_id) for q in got] == [(0, "yes", 548882), (1, "no", 548882)]
    bad = tmp_path / "bad.json"
    bad.write_text('{"question_id": 0, "image": "x.jpg", "text": "Is there a dog?", "label": "maybe"}\n')
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        read_questions(bad)


@pytest.mark.parametrize("answer, parsed", [
    ("Yes", "yes"), ("No", "no"), ("no", "no"), ("No.", "no"), ("Yes, there is a dog.", "yes"),
    ("No, there is no dog in the image.", "no"), ("There is no dog.", "no"), ("It is not there", "no"),
    ("Yes. There is no cat.", "yes"),   # only the first sentence counts
    ("NO", "yes"), ("Not really", "yes"),  # case-sensitive words, as the official script
    ("no,", "no"), ("", "yes"),
])
def test_parse_yes_no_as_the_official_script(answer, parsed):
    assert parse_yes_no(answer) == parsed


def test_metrics_hand_computed():
    m = pope_metrics(["yes", "no", "yes", "yes", "no", "no"], ["yes", "yes", "yes", "no", "no", "no"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 1)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == 0.5
    m = pope_metrics(["yes", "yes", "yes", "yes", "no"], ["yes", "yes", "no", "no", "no"])
    assert m["accuracy"] == pytest.approx(0.6) and m["precision"] == 0.5 and m["recall"] == 1.0
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == pytest.approx(0.8)
    m = pope_metrics(["no", "no"], ["yes", "no"])  # nothing predicted yes: precision and F1 defined as 0
    assert m["precision"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 0.5 and m["yes_ratio"] == 0.0
    with pytest.raises(ValueError, match="parse_yes_no"):
        pope_metrics(["Yes"], ["yes"])


def test_score_answers_by_id_and_by_order():
    qs = build_questions(IMAGES, "random")
    labels = [q.label for q in qs]
    by_id = [{"question_id": q.question_id, "answer": "Yes." if i % 3 else "No, it is not."}
             for i, q in enumerate(reversed(qs))]
    m = score_answers(by_id, qs)
    preds = {a["question_id"]: parse_yes_no(a["answer"]) for a in by_id}
    assert m == pope_metrics([preds[q.question_id] for q in qs], labels)
    in_order = [{"question": q.text, "answer": "yes"} for q in qs]
    assert score_answers(in_order, qs)["yes_ratio"] == 1.0
    with pytest.raises(ValueError, match="order"):
        score_answers(in_order[1:] + in_order[:1], qs)
    with pytest.raises(ValueError, match="unanswered"):
        score_answers(by_id[1:], qs)
    with pytest.raises(ValueError, match="twice"):
        score_answers(by_id + by_id[:1], qs)
    llava_style = [{"question_id": q.question_id, "prompt": q.text, "text": "No" if q.label == "no" else "Yes"}
                   for q in qs]  # LLaVA's model_vqa_loader keeps the answer in "text"
    assert score_answers(llava_style, qs)["accuracy"] == 1.0
    with pytest.raises(ValueError, match="'answer'"):
        score_answers([{"question_id": 1}], qs)


def test_counter_of_labels_balanced():
    qs = build_questions(IMAGES, "adversarial")
    assert Counter(q.label for q in qs) == {"yes": 9, "no": 9}
    assert json.loads(json.dumps(qs[0].to_json()))["object"] == "person"
