"""The CLIP caption score equals a plain re-computation from the encoders; offline refusal is clear."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from attnzoo.eval.clip_score import CLIPScorer, clip_score_from_embeddings


def _tiny_open_clip():
    import open_clip

    cfg = dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
               text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=2))
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg).eval()
    preprocess = open_clip.image_transform(32, is_train=False)
    tokenizer = open_clip.SimpleTokenizer(context_length=16)
    return model, preprocess, tokenizer


def test_clip_score_equals_plain_recomputation():
    model, preprocess, tokenizer = _tiny_open_clip()
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")) for _ in range(3)]
    captions = ["a dog", "a red car on the road", "two cups"]
    scorer = CLIPScorer.from_model(model, preprocess, tokenizer, batch_size=2)
    scores = scorer.score(images, captions)
    for i, (im, cap) in enumerate(zip(images, captions)):
        with torch.no_grad():
            a = model.encode_image(preprocess(im)[None])[0].double()
            b = model.encode_text(tokenizer([cap]))[0].double()
        cos = float(a @ b / (a.norm() * b.norm()))
        assert math.isclose(float(scores[i]), 2.5 * max(cos, 0.0), rel_tol=1e-4, abs_tol=1e-5)


def test_clip_score_clamps_negative_cosine():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[-1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(clip_score_from_embeddings(a, b), torch.tensor([0.0, 2.5 / math.sqrt(2)]))
    with pytest.raises(ValueError, match="pair row by row"):
        clip_score_from_embeddings(a, b[:1])


def test_offline_refusal_names_what_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"ViT-B-32/openai are not on this machine.*--clip-pretrained"):
        CLIPScorer("ViT-B-32", "openai", device="cpu")
    with pytest.raises(ValueError, match="neither a local checkpoint file nor a pretrained tag"):
        CLIPScorer("ViT-B-32", "no-such-tag", device="cpu")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        CLIPScorer("ViT-Nope", "openai", device="cpu")


def _tiny_registered_checkpoint(tmp_path):
    """A small open_clip architecture registered from a JSON config, and a local checkpoint of it."""
    import json

    import open_clip

    cfg = dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
               text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "attnzoo-test-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "cfg")
    torch.manual_seed(0)
    model = open_clip.create_model("attnzoo-test-tiny-clip", pretrained=None)
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_local_checkpoint_loads(tmp_path):
    model, path = _tiny_registered_checkpoint(tmp_path)
    scorer = CLIPScorer("attnzoo-test-tiny-clip", str(path), device="cpu")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), scorer.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_chair_cli_reports_clip_score(tmp_path, coco_root, capsys):
    import json

    from attnzoo.cli import main

    _, path = _tiny_registered_checkpoint(tmp_path)
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"image_id": 1, "caption": "A man and his dog."}) + "\n"
                    + json.dumps({"image_id": 6, "caption": "A knife on a table."}) + "\n")
    out = tmp_path / "scored"
    argv = ["eval", "chair", "--score", str(caps), "--coco-root", str(coco_root), "--out", str(out),
            "--clip-model", "attnzoo-test-tiny-clip", "--clip-pretrained", str(path), "--device", "cpu"]
    assert main(argv) == 0
    metrics = json.loads((out / "results.json").read_text())[0]["metrics"]
    scorer = CLIPScorer("attnzoo-test-tiny-clip", str(path), device="cpu")
    from attnzoo.eval.clip_score import mean_clip_score
    from attnzoo.eval.coco import CocoDataset

    dataset = CocoDataset(coco_root, "val2014")
    expected = mean_clip_score(scorer, [(dataset.image_path(1), "A man and his dog."),
                                        (dataset.image_path(6), "A knife on a table.")])
    assert metrics["clip_score"] == pytest.approx(expected, abs=1e-4)
    assert "clip_score" in capsys.readouterr().out


def test_chair_cli_offline_refusal_before_any_model(tmp_path, coco_root, capsys, monkeypatch):
    from attnzoo.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    argv = ["eval", "chair", "--model", "nowhere/none", "--coco-root", str(coco_root), "--clip-model", "ViT-B-32"]
    assert main(argv) == 2
    assert "ViT-B-32/openai are not on this machine" in capsys.readouterr().err
