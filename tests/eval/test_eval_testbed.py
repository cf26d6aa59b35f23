"""Training the testbed's tiny LLaVA: labels cover only the answers, loss goes down, resume is exact, CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch

from attnzoo.eval.scenes import generate_scenes
from attnzoo.eval.testbed import (
    CAPTION_PROMPT,
    SceneData,
    TrainConfig,
    WordAlignedHead,
    augment,
    build_testbed_model,
    encode_batch,
    image_features,
    train,
)

TINY = dict(batch_size=4, num_images=24, image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
            num_kv_heads=1, vision_layers=2, vocab_size=480, warmup=2, vision_steps=3, vision_batch_size=6, max_shift=2)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return generate_scenes(tmp_path_factory.mktemp("scenes"), "train", num_images=24, seed=0, image_size=32)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/eval/conftest.py


def test_labels_are_the_answer_tokens(scenes):
    from attnzoo.mllm import wrap

    config = TrainConfig(**TINY)
    model, processor = build_testbed_model(config)
    lvlm = wrap(model, processor)
    data = SceneData(scenes, "train")
    examples = data.sample(random.Random(0), 6, caption_fraction=0.5)
    assert any(p == CAPTION_PROMPT for _, p, _ in examples) and any(p != CAPTION_PROMPT for _, p, _ in examples)
    inputs = encode_batch(lvlm, examples)
    tok = processor.tokenizer
    for b, (_, prompt, answer) in enumerate(examples):
        ids = inputs["labels"][b][inputs["labels"][b] != -100].tolist()
        assert tok.decode(ids) == " " + answer + tok.eos_token
        if prompt != CAPTION_PROMPT:
            obj = prompt.split("Is there a")[1].split(" in the image")[0].strip().removeprefix("n ")
            assert answer == ("Yes" if obj in data.objects[data.images.index(examples[b][0])] else "No")
    # right padding: the padded tail is never a label
    assert (inputs["labels"][inputs["attention_mask"] == 0] == -100).all()


def test_augment_flips_and_shifts():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    flips = set()
    for seed in range(8):
        y = augment(x, torch.Generator().manual_seed(seed), 0)
        for b in range(2):
            assert torch.equal(y[b], x[b]) or torch.equal(y[b], x[b].flip(-1))
            flips.add(torch.equal(y[b], x[b]))
    assert flips == {True, False}
    for seed in range(8):
        gen = torch.Generator().manual_seed(seed)
        y = augment(x, gen, 2)
        for b in range(2):
            # every output equals some shift (dy, dx) in [-2, 2]^2 of x[b] or of its mirror, edges repeated
            padded = [torch.nn.functional.pad(v[None], (2,) * 4, mode="replicate")[0] for v in (x[b], x[b].flip(-1))]
            assert any(torch.equal(y[b], p[:, i:i + 6, j:j + 6]) for p in padded for i in range(5) for j in range(5))
    assert torch.equal(augment(x, torch.Generator().manual_seed(3), 2), augment(x, torch.Generator().manual_seed(3), 2))


def test_pixel_cache_matches_the_processor(scenes):
    config = TrainConfig(**TINY)
    model, processor = build_testbed_model(config)
    data = SceneData(scenes, "train")
    cached = data.pixel_values(processor.image_processor, chunk=7)
    direct = processor(images=data.images[:3], text=["<image>"] * 3, return_tensors="pt")["pixel_values"]
    assert cached.shape == (24, 3, 32, 32) and torch.equal(cached[:3], direct)
    y = data.targets()
    assert y.shape == (24, len(data.names)) and y.sum().item() == sum(len(o) for o in data.objects)
    feats = image_features(model, cached[:2])
    assert feats.shape == (2, (32 // 8) ** 2, 32)


def test_training_lowers_the_loss(tmp_path, scenes):
    config = TrainConfig(steps=12, lr=5e-3, checkpoint_every=100, **TINY)
    result = train(tmp_path, config, data_root=scenes, progress=False)
    losses = result["losses"]
    assert len(losses) == 12 and len(result["vision_losses"]) == 3 and result["step"] == 15
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 16))
    assert [r["stage"] for r in log] == ["vision"] * 3 + ["llava"] * 12
    # the finished model loads through attnzoo.mllm and answers
    from PIL import Image

    from attnzoo.mllm import load

    lvlm = load(result["model_dir"])
    image = Image.open(next((scenes / "train").iterdir()))
    out = lvlm.generate([image], ["Is there a fork in the image?"], max_new_tokens=3)
    assert len(out) == 1 and isinstance(out[0], str)


def test_resume_repeats_the_uninterrupted_run(tmp_path, scenes):
    config = TrainConfig(steps=5, lr=3e-3, checkpoint_every=2, **TINY)
    run = train(tmp_path / "full", config, data_root=scenes, progress=False)
    full, full_vision = run["losses"], run["vision_losses"]
    # interrupted inside the vision stage (checkpoint at 2), resumed, interrupted inside the LLaVA stage (at 6)...
    part = train(tmp_path / "part", config, data_root=scenes, progress=False, stop_after=2)
    assert part["model_dir"] is None and part["vision_losses"] == full_vision[:2] and part["losses"] == []
    part = train(tmp_path / "part", None, data_root=scenes, progress=False, resume=True, stop_after=6)
    assert part["model_dir"] is None and part["vision_losses"] == full_vision and part["losses"] == full[:3]
    with pytest.raises(ValueError, match="resume"):
        train(tmp_path / "part", config, data_root=scenes, progress=False)
    other = TrainConfig(steps=5, lr=1e-3, checkpoint_every=2, **TINY)
    with pytest.raises(ValueError, match="other settings"):
        train(tmp_path / "part", other, data_root=scenes, progress=False, resume=True)
    resumed = train(tmp_path / "part", None, data_root=scenes, progress=False, resume=True)
    assert resumed["step"] == 8
    assert resumed["losses"] == full  # bit-identical: same batches, weights, optimizer state, RNG
    log = [json.loads(line)["loss"] for line in (tmp_path / "part" / "train_log.jsonl").read_text().splitlines()]
    assert log == full_vision + full


def test_cli_scenes_and_train(tmp_path, scenes, capsys):
    from attnzoo.cli import main

    assert main(["testbed", "scenes", "--out", str(tmp_path / "d"), "--split", "eval", "--num-images", "3",
                 "--image-size", "32"]) == 0
    assert (tmp_path / "d" / "annotations" / "instances_eval.json").is_file()
    args = ["testbed", "train", "--out", str(tmp_path / "run"), "--data", str(scenes), "--steps", "2",
            "--no-progress", "--threads", "1"] + [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert main(args) == 0
    assert "3 vision + 2 LLaVA steps" in capsys.readouterr().out
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_word_aligned_head_scores_image_tokens_against_name_embeddings(scenes):
    config = TrainConfig(**TINY)
    model, processor = build_testbed_model(config)
    data = SceneData(scenes, "train")
    head = WordAlignedHead(model, processor.tokenizer, data.names)
    emb = model.get_input_embeddings().weight.detach().double()
    tok = processor.tokenizer
    for c, name in enumerate(data.names):
        ids = tok(" " + name, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == " " + name
        assert torch.allclose(head.words[c].double(), emb[ids].mean(0))
    with torch.no_grad():
        head.module["log_scale"].fill_(0.7)
        head.module["bias"].copy_(torch.linspace(-1, 1, len(data.names)))
        pixels = data.pixel_values(processor.image_processor)[:3]
        logits = head(model, pixels).double()
        z = model.model.multi_modal_projector(image_features(model, pixels)).double()  # (3, T, d)
    ref = torch.tensor([[max(float(z[b, t] @ head.words[c].double()) for t in range(z.shape[1]))
                         for c in range(len(data.names))] for b in range(3)], dtype=torch.float64)
    ref = ref * torch.tensor(0.7, dtype=torch.float64).exp() + torch.linspace(-1, 1, len(data.names)).double()
    assert torch.allclose(logits, ref, rtol=1e-5, atol=1e-6)
