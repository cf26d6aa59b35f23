"""attnzoo backbones as open_clip vision towers: every shipped config builds, encodes, and trains a step."""

from __future__ import annotations

import pytest
import torch

from attnzoo.vision.clip import open_clip_model_names, register_open_clip_models

NAMES = open_clip_model_names()


def test_configs_register_on_demand_only():
    import subprocess
    import sys

    code = "import sys, attnzoo; print('open_clip' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    import open_clip

    names = register_open_clip_models()
    assert names == NAMES and len(names) == 4
    assert set(names) <= set(open_clip.list_models())
    assert register_open_clip_models() == names  # idempotent


@pytest.mark.parametrize("name", NAMES)
def test_tower_builds_encodes_and_locks(name):
    import open_clip

    register_open_clip_models()
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    assert preprocess.transforms[0].size in (224, (224, 224))
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        image_features = model.eval().encode_image(torch.randn(2, 3, 224, 224), normalize=True)
        text_features = model.encode_text(tokenizer(["a dog on grass", "a red car"]), normalize=True)
    assert image_features.shape == text_features.shape == (2, 512)
    assert torch.isfinite(image_features).all() and torch.isfinite(text_features).all()
    # what open_clip's timm adapter uses besides forward: layer-group locking (group_matcher) and
    # gradient checkpointing (set_grad_checkpointing) of the trunk
    model.lock_image_tower(unlocked_groups=1)
    frozen = [p.requires_grad for p in model.visual.trunk.parameters()]
    assert not all(frozen) and any(frozen), "lock_image_tower(unlocked_groups=1) should freeze all but the last group"
    model.set_grad_checkpointing(True)


def test_contrastive_step_lowers_the_loss():
    """One plain gradient step of open_clip's ClipLoss on a fixed batch (eval mode: no drop-path noise), at
    64 x 64 input (NAT pads the small late stages as the official model does) to keep CPU time low."""
    import open_clip

    register_open_clip_models()
    torch.manual_seed(0)
    name = "attnzoo-nat-tiny-clip"
    model = open_clip.create_model(name, pretrained=None, output_dict=True).eval()
    tokenizer = open_clip.get_tokenizer(name)
    images, texts = torch.randn(2, 3, 64, 64), tokenizer(["a dog on grass", "a red car"])
    loss_fn = open_clip.ClipLoss()

    def loss() -> torch.Tensor:
        out = model(images, texts)
        return loss_fn(out["image_features"], out["text_features"], out["logit_scale"])

    before = loss()
    before.backward()
    trunk = [p for p in model.visual.trunk.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trunk), "vision tower got no gradient"
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    opt.step()
    with torch.no_grad():
        after = loss()
    assert after.item() < before.item(), f"loss {before.item():.4f} -> {after.item():.4f} did not go down"
