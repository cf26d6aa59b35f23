"""``attnzoo eval``: scoring files without a model, and the errors raised before any model loads."""

from __future__ import annotations

import json

import pytest

from attnzoo.cli import main
from attnzoo.eval import build_questions, parse_yes_no, pope_metrics, write_questions

IMAGES = {"b.jpg": ["person", "car", "truck"], "c.jpg": ["apple", "orange", "knife", "fork"]}


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_score_pope_file(tmp_path, capsys):
    qs = build_questions(IMAGES, "adversarial")
    qfile = tmp_path / "coco_pope_adversarial.json"
    write_questions(qs, qfile)
    answers = [{"question_id": q.question_id, "text": q.text, "answer": "No, there is not." if i % 4 == 0 else "Yes"}
               for i, q in enumerate(qs)]
    afile = _jsonl(tmp_path / "answers.jsonl", answers)
    assert main(["eval", "pope", "--score", str(afile), "--questions", str(qfile)]) == 0
    out = capsys.readouterr().out
    assert "| adversarial |" in out and "accuracy" in out
    result = json.loads((tmp_path / "answers.results.json").read_text())[0]
    expected = pope_metrics([parse_yes_no(a["answer"]) for a in answers], [q.label for q in qs])
    assert result["split"] == "adversarial" and result["metrics"] == expected
    assert (tmp_path / "answers.results.md").read_text().startswith("POPE")


def test_score_chair_file(tmp_path, coco_root, capsys):
    caps = _jsonl(tmp_path / "caps.jsonl", [
        {"image_id": 1, "caption": "A man and his puppy play with a frisbee."},
        {"image_id": 6, "caption": "A knife and a cup on a table next to a chair."},
    ])
    out_dir = tmp_path / "scored"
    assert main(["eval", "chair", "--score", str(caps), "--coco-root", str(coco_root), "--out", str(out_dir)]) == 0
    m = json.loads((out_dir / "results.json").read_text())[0]["metrics"]
    # image 6's references mention a cup, so only "chair" is hallucinated: 1 of 7 mentions, 1 of 2 captions
    assert m["chair_s"] == 0.5 and m["chair_i"] == pytest.approx(1 / 7)
    assert m["recall"] == pytest.approx((3 + 3) / (3 + 4))
    assert "chair_s" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["eval", "pope", "--model", "nowhere/none", "--coco-root", "{tmp}/missing"], "COCO folder {tmp}/missing"),
    (["eval", "pope", "--model", "nowhere/none", "--coco-root", "{coco}", "--split", "hard"],
     "valid splits: random, popular, adversarial"),
    (["eval", "chair", "--model", "nowhere/none", "--coco-root", "{coco}", "--coco-split", "val2017"],
     "instances_val2017.json not found"),
    (["eval", "pope", "--model", "nowhere/none", "--coco-root", "{coco}", "--mitigation", "nosuchpass"],
     "unknown mitigation pass 'nosuchpass'"),
    (["eval", "pope", "--coco-root", "{coco}"], "give --model"),
    (["eval", "pope", "--score", "{tmp}/none.jsonl", "--questions", "q.json"], "answer file"),
    (["eval", "chair", "--model", "nowhere/none", "--coco-root", "{coco}", "--num-images", "50"],
     "asked for 50 images"),
])
def test_errors_before_model_loads(tmp_path, coco_root, capsys, monkeypatch, argv, message):
    monkeypatch.setattr("attnzoo.eval._cli._load_model", _no_load)
    fill = {"tmp": str(tmp_path), "coco": str(coco_root)}
    code = main([a.format(**fill) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and message.format(**fill) in err, err


def _no_load(args):
    raise _ModelLoad(args.model)


class _ModelLoad(Exception):
    """Raised instead of loading a model: reaching it means every check passed."""


def test_missing_image_files_and_changed_configuration(tmp_path, coco_root, capsys, monkeypatch):
    monkeypatch.setattr("attnzoo.eval._cli._load_model", _no_load)
    base = ["eval", "pope", "--model", "nowhere/none", "--coco-root", str(coco_root), "--num-images", "4",
            "--split", "random", "--out", str(tmp_path / "runs")]
    with pytest.raises(_ModelLoad):  # every check passed and config.json was written before the load
        main(base)
    assert (tmp_path / "runs" / "pope_random_none" / "config.json").is_file()
    code = main(base[:-4] + ["--seed", "1", "--split", "random", "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "different configuration" in err and "items_sha256" in err
    (coco_root / "val2014" / "COCO_val2014_000000000002.jpg").unlink()
    code = main(base[:-2] + ["--out", str(tmp_path / "other")])
    assert code == 2 and "image files are missing" in capsys.readouterr().err


def test_official_question_file_in_model_mode(tmp_path, coco_root, capsys, monkeypatch):
    monkeypatch.setattr("attnzoo.eval._cli._load_model", _no_load)
    images = {"COCO_val2014_000000000001.jpg": ["person", "dog", "frisbee"],
              "COCO_val2014_000000000003.jpg": ["apple", "orange", "knife"]}
    qfile = tmp_path / "coco_pope_popular.json"
    write_questions(build_questions(images, "popular"), qfile)
    argv = ["eval", "pope", "--model", "m", "--coco-root", str(coco_root), "--questions", str(qfile),
            "--limit", "5", "--mitigation", "none", "--out", str(tmp_path / "runs")]
    with pytest.raises(_ModelLoad):
        main(argv)
    config = json.loads((tmp_path / "runs" / "pope_popular_none" / "config.json").read_text())
    assert config["items"] == 12 and config["split"] == "popular" and config["gen_kwargs"]["max_new_tokens"] == 128
    assert main(argv + ["--split", "random"]) == 2 and "leave out --split" in capsys.readouterr().err
