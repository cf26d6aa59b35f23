"""HaloNet on attnzoo.kernels.halo_attention: the fused module and fused timm models against timm's own
HaloAttn (forward and backward), the swap function, and the H0-H7 family (parameter counts, shapes)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from helpers import assert_close
from timm.layers.halo_attn import HaloAttn

import attnzoo  # noqa: F401  (registers the models)
from attnzoo.vision import use_fused_attention
from attnzoo.vision.halonet import FusedHaloAttn, HaloNet, HaloValueBlock


@pytest.mark.parametrize("kwargs,hw", [
    (dict(dim=16, num_heads=2, block_size=4, halo_size=1), (8, 12)),
    (dict(dim=16, dim_out=24, num_heads=4, block_size=4, halo_size=2, qkv_bias=True), (8, 8)),
    (dict(dim=16, num_heads=2, dim_head=12, block_size=4, halo_size=2, scale_pos_embed=True), (12, 8)),
    (dict(dim=16, dim_out=32, num_heads=4, block_size=4, halo_size=1, stride=2), (8, 8)),  # strided queries
    (dict(dim=16, num_heads=2, block_size=3, halo_size=1, stride=2), (6, 6)),  # odd block: avg-pool path
    (dict(dim=16, dim_out=40, num_heads=4, block_size=4, halo_size=1, qk_ratio=0.4), (4, 8)),  # wide values
])
def test_fused_module_matches_timm(rng, kwargs, hw):
    torch.manual_seed(0)
    timm_attn = HaloAttn(**kwargs).double()
    fused = FusedHaloAttn.from_timm(copy.deepcopy(timm_attn)).float()
    x64 = torch.randn(2, kwargs["dim"], *hw, generator=rng, dtype=torch.float64, requires_grad=True)
    x32 = x64.detach().float().requires_grad_()
    ref, out = timm_attn(x64), fused(x32)
    assert_close(out, ref)  # float32 result vs float64 timm
    g = torch.randn(ref.shape, generator=rng, dtype=torch.float64)
    ref.backward(g)
    out.backward(g.float())
    assert_close(x32.grad, x64.grad, dtype=torch.float32)
    for (name, p32), p64 in zip(fused.named_parameters(), timm_attn.parameters()):
        assert_close(p32.grad, p64.grad, dtype=torch.float32, msg=name)


def test_fused_module_has_timm_keys_and_params():
    timm_attn = HaloAttn(16, num_heads=2, block_size=4, halo_size=1)
    fused = FusedHaloAttn.from_timm(timm_attn)
    assert list(fused.state_dict()) == list(timm_attn.state_dict())
    assert all(a is b for a, b in zip(fused.parameters(), timm_attn.parameters()))  # shared, not copied
    fresh = FusedHaloAttn(16, num_heads=2, block_size=4, halo_size=1)
    fresh.load_state_dict(timm_attn.state_dict(), strict=True)


def test_fused_module_rejects_indivisible_map(rng):
    fused = FusedHaloAttn(16, num_heads=2, block_size=4, halo_size=1)
    with pytest.raises(ValueError, match="not divisible by block_size 4"):
        fused(torch.randn(1, 16, 10, 8, generator=rng))


def test_halonet26t_fused_equals_timm(rng):
    """Same weights, float32: the fused model against timm's own, forward and backward."""
    torch.manual_seed(0)
    ref = timm.create_model("halonet26t", num_classes=10).eval()
    fused = use_fused_attention(copy.deepcopy(ref))
    assert fused.attnzoo_kernels == ("halo_attention",)
    assert sum(isinstance(m, FusedHaloAttn) for m in fused.modules()) == 3
    assert not any(type(m) is HaloAttn for m in fused.modules())
    # 256x256 is the smallest input timm's halonet26t accepts (block 8 at stride 32)
    x = torch.randn(1, 3, 256, 256, generator=rng)
    out_ref, out = ref(x), fused(x)
    assert_close(out, out_ref)
    out_ref.square().sum().backward()
    out.square().sum().backward()
    for (name, p_fused), p_ref in zip(fused.named_parameters(), ref.parameters()):
        assert_close(p_fused.grad, p_ref.grad, msg=name)


TIMM_HALO_MODELS = {"halonet26t": 3, "sehalonet33ts": 4, "halonet50ts": 5, "eca_halonext26ts": 3, "halonet_h1": 19}


@pytest.mark.parametrize("name", list(TIMM_HALO_MODELS))
def test_use_fused_attention_on_timm_models(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    keys = list(model.state_dict())
    params = list(model.parameters())
    assert use_fused_attention(model) is model
    assert sum(isinstance(m, FusedHaloAttn) for m in model.modules()) == TIMM_HALO_MODELS[name]
    assert not any(type(m) is HaloAttn for m in model.modules())
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert model.attnzoo_kernels == ("halo_attention",)
    use_fused_attention(model)  # idempotent
    assert model.attnzoo_kernels == ("halo_attention",)


def test_model_without_halo_is_untouched():
    with torch.device("meta"):
        model = timm.create_model("resnet18")
    use_fused_attention(model)
    assert not hasattr(model, "attnzoo_kernels")


# parameters of our builds, and the paper's Table 4 numbers (M)
FAMILY = {
    "halonet_h0": (5_500_952, 5.5), "halonet_h1": (8_100_056, 8.1), "halonet_h2": (9_404_312, 9.4),
    "halonet_h3": (11_841_304, 11.8), "halonet_h4": (19_101_976, 19.1), "halonet_h5": (30_717_272, 30.7),
    "halonet_h6": (43_456_792, 43.4), "halonet_h7": (67_433_240, 67.4),
}


@pytest.mark.parametrize("name", list(FAMILY))
def test_family(name):
    """Parameter count (pinned, and the paper's to 0.06M), fused attention, and the output shape at the
    default input size traced on the meta device (numerics: the halonet26t and H0 tests)."""
    pinned, paper = FAMILY[name]
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=5).eval()
        size = model.pretrained_cfg["input_size"][-1]
        out = model(torch.empty(1, 3, size, size))
    assert out.shape == (1, 5)
    head = model.get_classifier()
    n_params = sum(p.numel() for p in model.parameters()) + head.in_features * (1000 - 5) + (1000 - 5)
    assert n_params == pinned
    assert abs(pinned / 1e6 - paper) < 0.06
    if name == "halonet_h1":  # timm's own model: fused on request
        assert not any(isinstance(m, FusedHaloAttn) for m in model.modules())
    else:
        assert isinstance(model, HaloNet) and model.attnzoo_kernels == ("halo_attention",)
        assert all(isinstance(m, FusedHaloAttn) for m in model.modules() if isinstance(m, HaloAttn))
    if name == "halonet_h5":  # rv = 2.5: values wider than queries/keys
        blocks = [m for m in model.modules() if isinstance(m, HaloValueBlock)]
        assert len(blocks) == 3 + 3 + 23 + 3
        first = blocks[0]  # stage 1: w = 64, values 2.5 * 64 = 160, output rb * w = 128
        assert first.self_attn.dim_out_qk == 64 and first.self_attn.dim_out_v == 160
        assert first.conv3_1x1.conv.in_channels == 160 and first.conv3_1x1.conv.out_channels == 128


def test_h0_forward_features_backward(rng):
    # zero_init_last=False: timm zeroes each block's last BN, which would zero the attention's gradients
    model = timm.create_model("halonet_h0", num_classes=3, zero_init_last=False)
    x = torch.randn(1, 3, 256, 256, generator=rng)
    out = model(x)
    assert out.shape == (1, 3) and torch.isfinite(out).all()
    out.sum().backward()
    attn = next(m for m in model.modules() if isinstance(m, FusedHaloAttn))
    assert attn.pos_embed.height_rel.grad is not None and attn.kv.weight.grad.abs().sum() > 0
    feats_model = timm.create_model("halonet_h0", features_only=True).eval()
    assert feats_model.feature_info.channels() == [64, 32, 64, 128, 256]
    assert feats_model.feature_info.reduction() == [2, 4, 8, 16, 32]
    with torch.no_grad():
        feats = feats_model(x)
    assert [tuple(f.shape) for f in feats] == [(1, 64, 128, 128), (1, 32, 64, 64), (1, 64, 32, 32),
                                              (1, 128, 16, 16), (1, 256, 8, 8)]
