"""ELA: the module against a plain re-statement of the paper's formula, its channel checks, and the five
timm-hosted models (parameter counts, placement, forward and features_only shapes)."""

from __future__ import annotations

from functools import partial

import pytest
import timm
import torch
from helpers import assert_close
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models.resnet import BasicBlock, Bottleneck

import attnzoo  # noqa: F401  (registers the models)
from attnzoo.kernels import set_backend
from attnzoo.vision.ela import ELA_VERSIONS, EfficientLocalAttention, ELABasicBlock, ELABottleneck, ela_param_count


def _paper_ela(x: torch.Tensor, weight: torch.Tensor, gn_weight: torch.Tensor, gn_bias: torch.Tensor,
               kernel_size: int, conv_groups: int, norm_groups: int, eps: float) -> torch.Tensor:
    """The paper's formula written out with explicit sums (float64): strip means, one grouped 1-D conv
    with zero 'same' padding shared by both axes, one GroupNorm shared by both axes, sigmoid, product."""
    b, c, h, w = x.shape
    pad = kernel_size // 2
    cpg = c // conv_groups

    def conv1d(z: torch.Tensor) -> torch.Tensor:  # z: (B, C, L)
        length = z.shape[-1]
        zp = torch.nn.functional.pad(z, (pad, pad))
        out = torch.zeros_like(z)
        for o in range(c):
            g = o // cpg
            for i_local in range(cpg):
                i = g * cpg + i_local
                for t in range(kernel_size):
                    out[:, o, :] += weight[o, i_local, t] * zp[:, i, t:t + length]
        return out

    def group_norm(z: torch.Tensor) -> torch.Tensor:
        zg = z.reshape(b, norm_groups, -1)
        mean = zg.mean(-1, keepdim=True)
        var = ((zg - mean) ** 2).mean(-1, keepdim=True)
        zn = ((zg - mean) / torch.sqrt(var + eps)).reshape_as(z)
        return zn * gn_weight[None, :, None] + gn_bias[None, :, None]

    z_h = x.sum(dim=3) / w
    z_w = x.sum(dim=2) / h
    y_h = 1 / (1 + torch.exp(-group_norm(conv1d(z_h))))
    y_w = 1 / (1 + torch.exp(-group_norm(conv1d(z_w))))
    return x * y_h[:, :, :, None] * y_w[:, :, None, :]


@pytest.mark.parametrize("version,channels,hw", [("T", 64, (7, 9)), ("B", 32, (5, 6)), ("S", 48, (6, 4)),
                                                  ("L", 32, (3, 8))])
def test_ela_matches_paper_formula(rng, version, channels, hw):
    kernel_size, cpg, norm_groups = ELA_VERSIONS[version]
    ela = EfficientLocalAttention(channels, version).double()
    with torch.no_grad():  # non-trivial affine GroupNorm parameters
        ela.gn.weight.normal_(generator=rng)
        ela.gn.bias.normal_(generator=rng)
    assert ela.conv.kernel_size == (kernel_size,) and ela.conv.groups == channels // cpg
    assert ela.gn.num_groups == norm_groups
    x = torch.randn(2, channels, *hw, generator=rng, dtype=torch.float64, requires_grad=True)
    out = ela(x)
    ref = _paper_ela(x, ela.conv.weight, ela.gn.weight, ela.gn.bias, kernel_size, channels // cpg, norm_groups,
                     ela.gn.eps)
    assert_close(out, ref)
    # backward: input, conv and GroupNorm gradients
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, ela.conv.weight, ela.gn.weight), g)
    grads_ref = torch.autograd.grad(ref, (x, ela.conv.weight, ela.gn.weight), g)
    for a, e in zip(grads, grads_ref):
        assert_close(a, e)


def test_ela_float32_matches_float64(rng):
    ela = EfficientLocalAttention(64, "S")
    x = torch.randn(2, 64, 14, 14, generator=rng)
    assert_close(ela(x), ela.double()(x.double()), dtype=torch.float32)


def test_ela_param_count_formula():
    for version, (k, cpg, _) in ELA_VERSIONS.items():
        ela = EfficientLocalAttention(256, version)
        assert sum(p.numel() for p in ela.parameters()) == ela_param_count(256, version) == 256 * cpg * k + 512


@pytest.mark.parametrize("version,channels,needle", [
    ("T", 144, "divisible by its 32 GroupNorm groups, got 144"),
    ("B", 24, "divisible by its 16 GroupNorm groups, got 24"),
    ("S", 20, "divisible by 8"),
    ("L", 36, "divisible by 8"),
])
def test_ela_refuses_bad_channels(version, channels, needle):
    with pytest.raises(ValueError, match=needle):
        EfficientLocalAttention(channels, version)


def test_ela_refuses_unknown_version():
    with pytest.raises(ValueError, match="unknown ELA version 'X'"):
        EfficientLocalAttention(64, "X")


# Pinned parameter counts. Each equals timm's host model plus, for every ELA module, its conv weight
# C * (C / groups) * k and GroupNorm affine 2C (ela_param_count); test_param_counts checks both.
PARAMS = {
    "resnet18_ela": (11_706_792, "resnet18", "B", 8),
    "resnet34_ela": (21_831_656, "resnet34", "B", 16),
    "resnet50_ela": (26_191_400, "resnet50", "S", 16),
    "resnet101_ela": (45_914_664, "resnet101", "S", 33),
    "mobilenetv2_100_ela": (3_804_584, "mobilenetv2_100", "S", 17),
}


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(PARAMS))
def test_param_counts(name):
    pinned, host, version, n_ela = PARAMS[name]
    with torch.device("meta"):  # shapes only: skips the weight init
        model = timm.create_model(name)
        host_model = timm.create_model(host)
    elas = [m for m in model.modules() if isinstance(m, EfficientLocalAttention)]
    assert len(elas) == n_ela
    assert {m.version for m in elas} == {f"ELA-{version}"}
    assert _count(model) == pinned
    expected = _count(host_model) + sum(ela_param_count(m.conv.in_channels, version) for m in elas)
    assert pinned == expected


def test_placement_resnet():
    for name, block_cls in (("resnet18_ela", BasicBlock), ("resnet50_ela", Bottleneck)):
        model = timm.create_model(name)
        blocks = [m for m in model.modules() if isinstance(m, block_cls)]
        assert blocks and all(isinstance(b.se, EfficientLocalAttention) for b in blocks)
        # on the block output channels (after the last conv + BN, before the shortcut add)
        last_bn = "bn2" if block_cls is BasicBlock else "bn3"
        assert all(b.se.conv.in_channels == getattr(b, last_bn).num_features for b in blocks)


def test_placement_mobilenetv2():
    model = timm.create_model("mobilenetv2_100_ela")
    blocks = [m for m in model.modules() if isinstance(m, (InvertedResidual, DepthwiseSeparableConv))]
    assert len(blocks) == 17 and all(isinstance(b.se, EfficientLocalAttention) for b in blocks)
    # after the depthwise conv: on its (expanded) output channels
    assert all(b.se.conv.in_channels == b.conv_dw.out_channels for b in blocks)


def test_version_override():
    model = timm.create_model("resnet18_ela", ela_version="T")
    assert {m.version for m in model.modules() if isinstance(m, EfficientLocalAttention)} == {"ELA-T"}
    with pytest.raises(ValueError, match="32 GroupNorm groups, got 144"):
        timm.create_model("mobilenetv2_100_ela", ela_version="T")


@pytest.mark.parametrize("name", list(PARAMS))
def test_forward_shape(rng, name):
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32, generator=rng)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name,channels", [
    ("resnet18_ela", [64, 64, 128, 256, 512]),
    ("resnet50_ela", [64, 256, 512, 1024, 2048]),
    ("mobilenetv2_100_ela", [16, 24, 32, 96, 320]),
])
def test_features_only(rng, name, channels):
    model = timm.create_model(name, features_only=True).eval()
    assert model.feature_info.channels() == channels
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64, generator=rng))
    assert [tuple(f.shape) for f in feats] == [(1, c, 64 // r, 64 // r) for c, r in zip(channels, [2, 4, 8, 16, 32])]


def test_backward_through_model(rng):
    # zero_init_last=False: timm zeroes each block's last BN by default, which zeroes ELA's input at init
    model = timm.create_model("resnet18_ela", num_classes=4, zero_init_last=False)
    model(torch.randn(2, 3, 32, 32, generator=rng)).sum().backward()
    ela = next(m for m in model.modules() if isinstance(m, EfficientLocalAttention))
    assert ela.conv.weight.grad is not None and ela.conv.weight.grad.abs().sum() > 0


# --- the fused path (Triton strip kernels, under TRITON_INTERPRET=1 here) against the torch path ---


def _ela_with_affine(channels: int, version: str, rng: torch.Generator) -> EfficientLocalAttention:
    ela = EfficientLocalAttention(channels, version)
    with torch.no_grad():
        ela.gn.weight.normal_(generator=rng)
        ela.gn.bias.normal_(generator=rng)
    return ela


@pytest.mark.parametrize("hw", [(6, 6), (5, 7)])  # square maps batch both strips through one conv call
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_ela_fused_matches_torch_path(rng, hw, channels_last, residual):
    ela = _ela_with_affine(32, "S", rng)
    x = torch.randn(2, 32, *hw, generator=rng)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    shortcut = torch.randn(x.shape, generator=rng)
    g = torch.randn(x.shape, generator=rng)
    results = {}
    for backend in ("triton", "torch"):
        set_backend(backend)
        xr, sr = x.clone().requires_grad_(), shortcut.clone().requires_grad_()
        out = ela.forward_residual(xr, sr) if residual else ela(xr)
        params = list(ela.parameters())
        wrt = [xr, *params] + ([sr] if residual else [])
        results[backend] = (out, torch.autograd.grad(out, wrt, g))
    out, grads = results["triton"]
    ref, ref_grads = results["torch"]
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert_close(out, ref)
    for i, (a, e) in enumerate(zip(grads, ref_grads)):
        # parameter gradients sum B * (H + W) products in different orders on the two paths
        assert_close(a, e, scale=1.0 if i == 0 else 5.0, msg=f"grad {i}")


@pytest.mark.parametrize("version,channels,hw", [("S", 32, (6, 6)), ("B", 16, (5, 7))])
def test_ela_fused_inference_matches_torch_path(rng, version, channels, hw):
    # no gradients: strip means, the conv + GroupNorm + sigmoid kernel and the gating, all Triton
    ela = _ela_with_affine(channels, version, rng)
    x = torch.randn(2, channels, *hw, generator=rng)
    s = torch.randn(x.shape, generator=rng)
    with torch.no_grad():
        set_backend("triton")
        out, out_res = ela(x), ela.forward_residual(x, s)
        set_backend("torch")
        ref, ref_res = ela(x), ela.forward_residual(x, s)
    assert_close(out, ref, scale=2.0)  # float32, conv + norm computed in a different order
    assert_close(out_res, ref_res, scale=2.0)


def test_resnet_ela_blocks_keep_timm_state_dict():
    # resnet50_ela's block subclass vs timm's own Bottleneck with the same ELA: same modules, same keys
    with torch.device("meta"):
        ours = timm.create_model("resnet50_ela")
        timms = timm.create_model("resnet50", block_args=dict(attn_layer=partial(EfficientLocalAttention,
                                                                                 version="S")))
    assert type(timms.layer1[0]) is Bottleneck and type(ours.layer1[0]) is ELABottleneck
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in timms.state_dict().items()}


def _two_blocks(block_cls: type[torch.nn.Module], version: str) -> torch.nn.Sequential:
    # a downsampling block (1x1 conv shortcut, stride 2) feeding an identity-shortcut block: the second block
    # reads the first one's fused output, which the first block's backward also keeps (its ReLU mask)
    expansion = block_cls.expansion
    planes = 16
    downsample = torch.nn.Sequential(torch.nn.Conv2d(8, planes * expansion, 1, stride=2, bias=False),
                                     torch.nn.BatchNorm2d(planes * expansion))
    attn = partial(EfficientLocalAttention, version=version)
    return torch.nn.Sequential(block_cls(8, planes, stride=2, downsample=downsample, attn_layer=attn),
                               block_cls(planes * expansion, planes, attn_layer=attn))


@pytest.mark.parametrize("ours_cls,timm_cls,version", [(ELABottleneck, Bottleneck, "S"),
                                                       (ELABasicBlock, BasicBlock, "B")])
def test_fused_blocks_match_timm_blocks(rng, ours_cls, timm_cls, version):
    torch.manual_seed(0)
    ours = _two_blocks(ours_cls, version)
    for m in ours.modules():  # non-trivial BatchNorm/GroupNorm affine parameters and statistics
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
            with torch.no_grad():
                m.weight.normal_(generator=rng)
                m.bias.normal_(generator=rng)
    ours.eval()
    timms = _two_blocks(timm_cls, version).eval()
    timms.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 8, 11, 9, generator=rng)
    g = torch.randn(2, 16 * ours_cls.expansion, 6, 5, generator=rng)
    set_backend("triton")
    xr = x.clone().requires_grad_()
    out = ours(xr)
    grads = torch.autograd.grad(out, [xr, *ours.parameters()], g)
    set_backend("torch")
    xr = x.clone().requires_grad_()
    ref = timms(xr)
    ref_grads = torch.autograd.grad(ref, [xr, *timms.parameters()], g)
    assert_close(out, ref)
    for (name, _), a, e in zip([("x", None), *ours.named_parameters()], grads, ref_grads):
        # float32 through two blocks; parameter gradients sum over batch and map in different orders
        assert_close(a, e, scale=10.0, msg=name)
    with torch.no_grad():  # the subclass on the torch backend runs exactly timm's tail
        assert_close(ours(x), ref.detach(), dtype=torch.float64)


def test_resnet18_ela_fused_forward_matches_torch(rng):
    model = timm.create_model("resnet18_ela", num_classes=4, zero_init_last=False).eval()
    x = torch.randn(1, 3, 32, 32, generator=rng)
    with torch.no_grad():
        set_backend("triton")
        out = model(x)
        set_backend("torch")
        ref = model(x)
    assert_close(out, ref, scale=10.0)  # float32 through 8 blocks


def test_resnet18_ela_fused_gradients_match_float64(rng):
    """End to end through 8 fused blocks: every parameter gradient of the fused float32 model is as close to the
    float64 model on the PyTorch path as the PyTorch path's own float32 gradients are (no ReLU-mask or reduction
    error that grows with depth). Random BatchNorm/GroupNorm affines so no branch starts at zero."""
    model = timm.create_model("resnet18_ela", num_classes=4).eval()  # eval BN: batch-independent
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                mod.weight.uniform_(0.5, 1.5, generator=rng)
                mod.bias.uniform_(-0.3, 0.3, generator=rng)
    x = torch.randn(2, 3, 48, 48, generator=rng)

    def grads(backend: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        model.to(dtype).zero_grad(set_to_none=True)
        set_backend(backend)
        model(x.to(dtype)).square().sum().backward()
        return {n: p.grad.double() for n, p in model.named_parameters()}

    ref = grads("torch", torch.float64)
    plain = grads("torch", torch.float32)
    fused = grads("triton", torch.float32)
    for name, g in ref.items():
        bound = max(4 * (plain[name] - g).norm().item(), 1e-6 * g.norm().item())
        assert (fused[name] - g).norm().item() <= bound, name
