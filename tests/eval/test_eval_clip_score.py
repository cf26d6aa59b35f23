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


def test_local_checkpoint_loads(tmp_path):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)
    scorer = CLIPScorer("ViT-B-32", str(path), device="cpu")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), scorer.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
