"""The shipped testbed LLaVA: loads offline by name, answers as recorded; the demo runs end to end (small subset)."""

from __future__ import annotations

from pathlib import Path

import pytest

from attnzoo.eval.scenes import generate_scenes
from attnzoo.eval.testbed import CAPTION_PROMPT, companion_yes_rate, format_testbed_table

# Greedy answers of the shipped weights to _questions() on 8 evaluation scenes (seed 1), recorded when shipped:
# per scene a present object, the companion of the first object (or "apple"), a caption.
RECORDED = [
    "Yes",
    "No",
    "A picture of a spoon, a bowl, a kite and a kite.",
    "Yes",
    "Yes",
    "A picture of a vase and an umbrella.",
    "Yes",
    "Yes",
    "A picture of a clock and a teddy bear.",
    "Yes",
    "No",
    "A picture of a clock, a baseball glove and a baseball bat.",
    "No",
    "No",
    "A picture of a tv, a remote and a book.",
    "Yes",
    "No",
    "A picture of a vase, a kite and a clock.",
    "Yes",
    "Yes",
    "A picture of a cup, a dining table, a tennis racket, a sports ball and a kite.",
    "Yes",
    "Yes",
    "A picture of a baseball glove, a baseball bat, a dining table and a cup.",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/eval/conftest.py


@pytest.fixture(scope="module")
def eval_scenes(tmp_path_factory):
    return generate_scenes(tmp_path_factory.mktemp("scenes"), "eval", num_images=8, seed=1, cooccurrence=0.25)


def _questions(root: Path) -> list[tuple[str, str]]:
    """(image file, prompt) pairs: per scene one present object, the companion of the first one, a caption."""
    from attnzoo.eval import CocoDataset
    from attnzoo.eval.scenes import CATEGORIES, companion

    coco = CocoDataset(root, "eval")
    out = []
    for i in coco.image_ids():
        objs = coco.objects(i)
        other = companion(objs[0]) or next(n for n in sorted(CATEGORIES) if n not in objs)
        for obj in (objs[0], other):
            out.append((coco.file_name(i), f"Is there a{'n' if obj[0] in 'aeiou' else ''} {obj} in the image?\n"
                        "Answer the question using a single word or phrase."))
        out.append((coco.file_name(i), CAPTION_PROMPT))
    return out


def answer_all(root: Path) -> list[str]:
    """The shipped model's greedy answers to :func:`_questions` (the regression record)."""
    from PIL import Image

    from attnzoo.mllm import load

    lvlm = load("attnzoo/testbed-llava")
    qs = _questions(root)
    images = [Image.open(root / "eval" / f).convert("RGB") for f, _ in qs]
    return lvlm.generate(images, [p for _, p in qs], max_new_tokens=30)


def test_shipped_model_loads_offline_and_answers_as_recorded(eval_scenes, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from attnzoo.mllm.lvlm import BUNDLED_MODELS

    folder = BUNDLED_MODELS["attnzoo/testbed-llava"]
    assert (folder / "model.safetensors").stat().st_size < 8 * 2**20  # "a few MB"
    assert answer_all(eval_scenes) == RECORDED


def test_companion_yes_rate():
    objects = {"a.png": ["fork", "apple"], "b.png": ["cup", "dining table"]}
    rec = [
        {"image": "/x/a.png", "text": "Is there a knife in the image?", "label": "no", "answer": "Yes"},
        {"image": "/x/a.png", "text": "Is there a banana in the image?", "label": "no", "answer": "Yes"},  # no pair
        {"image": "/x/a.png", "text": "Is there a fork in the image?", "label": "yes", "answer": "Yes"},  # present
        {"image": "/x/b.png", "text": "Is there a knife in the image?", "label": "no", "answer": "No"},  # not a pair
    ]
    assert companion_yes_rate(rec, objects) == (1.0, 1)
    rec.append({"image": "/y/a.png", "text": "Is there a knife in the image?", "label": "no", "answer": "No, none"})
    assert companion_yes_rate(rec, objects) == (0.5, 2)
    assert companion_yes_rate(rec[1:3], objects) == (None, 0)


def test_table_format():
    rows = [{"passes": "none", "benchmark": "POPE random", "accuracy": 0.5, "F1": 2 / 3, "yes-ratio": 1.0,
             "yes on absent companions": None, "CHAIR_s": None, "CHAIR_i": None, "time": 1.234}]
    lines = format_testbed_table(rows).splitlines()
    assert lines[0].startswith("| passes") and "CHAIR_i" in lines[0]
    assert [c.strip() for c in lines[2].strip("|").split("|")] == ["none", "POPE random", "50.0", "66.7", "100.0",
                                                                   "-", "-", "-", "1.2 s"]


def test_write_docs_table(tmp_path):
    from attnzoo.cli import TABLE_END, TABLE_START, write_docs_table

    doc = tmp_path / "t.md"
    doc.write_text(f"intro\n{TABLE_START}\nold\n{TABLE_END}\noutro\n")
    write_docs_table("| new |", doc)
    assert doc.read_text() == f"intro\n{TABLE_START}\n| new |\n{TABLE_END}\noutro\n"
    doc.write_text("no markers\n")
    with pytest.raises(ValueError, match="demo-table"):
        write_docs_table("x", doc)


def test_demo_small_subset(tmp_path, capsys):
    from attnzoo.cli import main
    from attnzoo.mitigation import available

    assert main(["demo", "--pope-images", "3", "--chair-images", "2", "--no-progress", "--threads", "1",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "passes" not in line]
    # baseline + every registered pass, each POPE x 3 splits + CHAIR
    assert len(rows) == 4 * (1 + len(available()))
    for name in ["none", *available()]:
        assert sum(r.split("|")[1].strip() == name for r in rows) == 4
    assert (tmp_path / "runs" / "pope_adversarial_none" / "results.json").is_file()
    assert main(["demo", "--passes", "nosuchpass", "--out", str(tmp_path)]) == 2


def test_demo_table_is_reproducible_with_a_sampling_pass(tmp_path, capsys):
    """CausalMM samples (official default): with the demo's seed two fresh runs give the same table."""
    from attnzoo.cli import main

    tables = []
    for run in ("a", "b"):
        assert main(["demo", "--passes", "causalmm", "--pope-images", "3", "--chair-images", "2", "--no-progress",
                     "--threads", "1", "--out", str(tmp_path / run)]) == 0
        out = capsys.readouterr().out
        # the time column differs run to run; everything before it must not
        tables.append([line.rsplit("|", 2)[0] for line in out.splitlines() if line.startswith("| causalmm")])
    assert len(tables[0]) == 4 and tables[0] == tables[1]
