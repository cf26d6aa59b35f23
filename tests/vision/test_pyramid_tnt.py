"""PyramidTNT against a plain re-statement of the official forward on an official-layout state dict, its
converter, parameter counts and shapes; and timm's own TNT loading an official-layout TNT state dict."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import assert_close

import attnzoo  # noqa: F401  (registers the models)
from attnzoo.vision.pyramid_tnt import checkpoint_filter_fn

# official configs (tnt_pytorch/pyramid_tnt.py): depths, outer dim, inner dim, outer heads, inner heads, img size
CONFIGS = {
    "ptnt_ti_patch16_192": ((2, 6, 3, 2), 80, 5, 2, 1, 192),
    "ptnt_s_patch16_256": ((2, 8, 4, 2), 128, 8, 4, 2, 256),
    "ptnt_m_patch16_256": ((2, 8, 6, 2), 192, 12, 4, 2, 256),
    "ptnt_b_patch16_256": ((2, 10, 6, 2), 256, 16, 4, 2, 256),
}
# parameters of the official module definition at the official input size, and the README's rounded numbers
PARAMS = {
    "ptnt_ti_patch16_192": (10_578_529, 10.6),
    "ptnt_s_patch16_256": (31_953_200, 32.0),
    "ptnt_m_patch16_256": (84_943_572, 85.0),
    "ptnt_b_patch16_256": (156_990_072, 157.0),
}
SR = (4, 2, 1, 1)


def _stage_dims(name: str):
    depths, o, c, oh, ih, size = CONFIGS[name]
    m = (1, 2, 4, 4)
    return depths, [o * k for k in m], [c * k for k in m], [oh * k for k in m], [ih * k for k in m], size


def official_layout_shapes(name: str, img_size: int | None = None, num_classes: int = 1000) -> dict:
    """Key -> shape of the official PyramidTNT state dict, enumerated from the official module tree."""
    depths, od, idim, oh, _, size = _stage_dims(name)
    img_size = img_size or size
    n0 = (img_size // 8) ** 2
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(p, cin, cout):
        shapes[p + ".weight"], shapes[p + ".bias"] = (cout, cin, 3, 3), (cout,)

    def bn(p, c):
        for s in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{p}.{s}"] = (c,)
        shapes[p + ".num_batches_tracked"] = ()

    def ln(p, c):
        shapes[p + ".weight"], shapes[p + ".bias"] = (c,), (c,)

    def lin(p, cin, cout, bias=True):
        shapes[p + ".weight"] = (cout, cin)
        if bias:
            shapes[p + ".bias"] = (cout,)

    c0 = idim[0]
    conv("patch_embed.common_conv.0", 3, 2 * c0)
    bn("patch_embed.common_conv.1", 2 * c0)
    conv("patch_embed.inner_convs.0", 2 * c0, c0)
    bn("patch_embed.inner_convs.1", c0)
    for idx, (cin, cout) in zip((0, 3, 6), ((2 * c0, 4 * c0), (4 * c0, 8 * c0), (8 * c0, od[0]))):
        conv(f"patch_embed.outer_convs.{idx}", cin, cout)
        bn(f"patch_embed.outer_convs.{idx + 1}", cout)
    shapes["outer_pos"], shapes["inner_pos"] = (1, n0, od[0]), (1, 16, c0)
    for i, depth in enumerate(depths):
        if i:
            ln(f"word_merges.{i - 1}.norm", idim[i - 1])
            conv(f"word_merges.{i - 1}.conv.0", idim[i - 1], idim[i])
            ln(f"sentence_merges.{i - 1}.norm", od[i - 1])
            conv(f"sentence_merges.{i - 1}.conv.0", od[i - 1], od[i])
        n = n0 // 4 ** i
        shapes[f"stages.{i}.relative_pos"] = (1, oh[i], n, n // SR[i] ** 2)
        o, c = od[i], idim[i]
        for j in range(depth):
            p = f"stages.{i}.blocks.{j}."
            if j == 0 or (j == 1 and depth > 6):
                ln(p + "inner_norm1", 16 * c)
                lin(p + "inner_attn.q", c, c, False)
                lin(p + "inner_attn.kv", c, 2 * c, False)
                lin(p + "inner_attn.proj", c, c)
                ln(p + "inner_norm2", 16 * c)
                lin(p + "inner_mlp.fc1", c, 4 * c)
                lin(p + "inner_mlp.fc2", 4 * c, c)
                ln(p + "proj_norm1", 16 * c)
                lin(p + "proj", 16 * c, o, False)
                ln(p + "proj_norm2", o)
            ln(p + "outer_norm1", o)
            lin(p + "outer_attn.q", o, o, False)
            lin(p + "outer_attn.kv", o, 2 * o, False)
            lin(p + "outer_attn.proj", o, o)
            if SR[i] > 1:
                lin(p + "outer_attn.linear", o, o)
                ln(p + "outer_attn.norm", o)
            ln(p + "outer_norm2", o)
            lin(p + "outer_mlp.fc1", o, 4 * o)
            lin(p + "outer_mlp.fc2", 4 * o, o)
    ln("norm", od[-1])
    lin("head", od[-1], num_classes)
    return shapes


def random_state_dict(shapes: dict, rng: torch.Generator, dtype=torch.float32) -> dict:
    sd = {}
    for k, s in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(s, generator=rng, dtype=dtype) + 0.5
        elif k.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            sd[k] = 1 + 0.1 * torch.randn(s, generator=rng, dtype=dtype)
        else:
            # weights ~ 0.5 / sqrt(fan_in), vectors (biases, position tables) ~ 0.1: activations stay O(1)
            scale = 0.5 / math.sqrt(math.prod(s[1:])) if len(s) > 1 else 0.1
            sd[k] = scale * torch.randn(s, generator=rng, dtype=dtype)
    return sd


def official_forward(sd: dict, x: torch.Tensor, name: str) -> torch.Tensor:
    """The official PyramidTNT forward (eval mode) re-stated on the official keys, with an explicit softmax."""
    depths, od, idim, oh, ih, _ = _stage_dims(name)

    def cbr(t, p, stride):
        t = F.conv2d(t, sd[p + ".0.weight"], sd[p + ".0.bias"], stride=stride, padding=1)
        return F.relu(F.batch_norm(t, sd[p + ".1.running_mean"], sd[p + ".1.running_var"], sd[p + ".1.weight"],
                                   sd[p + ".1.bias"], eps=1e-5))

    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=1e-5)

    def lin(t, p):
        return F.linear(t, sd[p + ".weight"], sd.get(p + ".bias"))

    def attn(t, p, heads, hw, sr, bias):
        b, n, c = t.shape
        d = c // heads
        q = lin(t, p + ".q").reshape(b, n, heads, d).transpose(1, 2)
        if sr > 1:
            pooled = F.avg_pool2d(t.transpose(1, 2).reshape(b, c, *hw), sr).flatten(2).transpose(1, 2)
            t = ln(lin(pooled, p + ".linear"), p + ".norm")
        kv = lin(t, p + ".kv").reshape(b, -1, 2, heads, d)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        logits = q @ k.transpose(-1, -2) * d ** -0.5
        if bias is not None:
            logits = logits + bias
        w = torch.exp(logits - logits.amax(-1, keepdim=True))
        w = w / w.sum(-1, keepdim=True)
        return lin((w @ v).transpose(1, 2).reshape(b, n, c), p + ".proj")

    def mlp(t, p):
        return lin(F.gelu(lin(t, p + ".fc1")), p + ".fc2")

    bsz = x.shape[0]
    x = cbr(x, "patch_embed.common_conv", 2)
    inner = cbr(x, "patch_embed.inner_convs", 1)
    c0 = inner.shape[1]
    inner = F.unfold(inner, 4, stride=4).transpose(1, 2).reshape(-1, c0, 16).transpose(1, 2)
    t = x
    for idx, stride in zip((0, 3, 6), (2, 2, 1)):
        t = F.conv2d(t, sd[f"patch_embed.outer_convs.{idx}.weight"], sd[f"patch_embed.outer_convs.{idx}.bias"],
                     stride=stride, padding=1)
        p = f"patch_embed.outer_convs.{idx + 1}"
        t = F.relu(F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                                sd[p + ".bias"], eps=1e-5))
    h, w = t.shape[2:]
    outer = t.flatten(2).transpose(1, 2) + sd["outer_pos"]
    inner = inner + sd["inner_pos"]
    for i, depth in enumerate(depths):
        if i:
            # word merge: 2x2 neighbouring sentences' 4x4 word grids tiled into one 8x8 grid (slices + cat)
            p = f"word_merges.{i - 1}"
            g = ln(inner, p + ".norm").reshape(bsz, h, w, 4, 4, -1)
            top = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2]], dim=3)
            bottom = torch.cat([g[:, 0::2, 1::2], g[:, 1::2, 1::2]], dim=3)
            g = torch.cat([top, bottom], dim=4)
            g = g.reshape(-1, 8, 8, g.shape[-1]).permute(0, 3, 1, 2)
            g = F.conv2d(g, sd[p + ".conv.0.weight"], sd[p + ".conv.0.bias"], stride=2, padding=1)
            inner = g.reshape(-1, idim[i], 16).transpose(1, 2)
            p = f"sentence_merges.{i - 1}"
            s = ln(outer, p + ".norm").transpose(1, 2).reshape(bsz, od[i - 1], h, w)
            s = F.conv2d(s, sd[p + ".conv.0.weight"], sd[p + ".conv.0.bias"], stride=2, padding=1)
            h, w = s.shape[2:]
            outer = s.flatten(2).transpose(1, 2)
        rel = sd[f"stages.{i}.relative_pos"]
        n = h * w
        for j in range(depth):
            p = f"stages.{i}.blocks.{j}."
            if p + "inner_norm1.weight" in sd:
                inner = inner + attn(ln(inner.reshape(bsz, n, -1), p + "inner_norm1").reshape(bsz * n, 16, -1),
                                     p + "inner_attn", ih[i], (4, 4), 1, None)
                inner = inner + mlp(ln(inner.reshape(bsz, n, -1), p + "inner_norm2").reshape(bsz * n, 16, -1),
                                    p + "inner_mlp")
                outer = outer + ln(lin(ln(inner.reshape(bsz, n, -1), p + "proj_norm1"), p + "proj"), p + "proj_norm2")
            outer = outer + attn(ln(outer, p + "outer_norm1"), p + "outer_attn", oh[i], (h, w), SR[i], rel)
            outer = outer + mlp(ln(outer, p + "outer_norm2"), p + "outer_mlp")
    return lin(ln(outer, "norm").mean(1), "head")


@pytest.mark.parametrize("name", list(PARAMS))
def test_param_counts_and_official_layout(name):
    """Every variant at its official size (meta tensors, no compute): the parameter count (pinned; equal to
    the official module tree's; the README's to its rounding), and official keys/shapes -> filter -> strict load."""
    pinned, readme_millions = PARAMS[name]
    official = official_layout_shapes(name)
    with torch.device("meta"):
        model = timm.create_model(name)
        sd = {"module." + k: torch.empty(s) for k, s in official.items()}
    count = sum(p.numel() for p in model.parameters())
    assert count == pinned
    assert count == sum(math.prod(s) for k, s in official.items() if "running_" not in k and "num_batches" not in k)
    assert abs(count / 1e6 - readme_millions) < 0.1
    converted = checkpoint_filter_fn({"model": sd}, model)
    model.load_state_dict(converted, strict=True, assign=True)  # raises on missing/unexpected keys or shapes


def test_official_checkpoint_file_loads(rng, tmp_path):
    """An official-layout file (as the official trainer saves it) -> timm.create_model(pretrained=True)."""
    name = "ptnt_ti_patch16_192"
    sd = random_state_dict(official_layout_shapes(name, img_size=64), rng)
    path = tmp_path / "official.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, path)
    model = timm.create_model(name, img_size=64, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    own = model.state_dict()
    converted = checkpoint_filter_fn(dict(sd), model)
    assert set(converted) == set(own)
    for k, v in converted.items():
        assert torch.equal(own[k], v), k


def test_matches_official_forward(rng):
    name = "ptnt_ti_patch16_192"
    sd = random_state_dict(official_layout_shapes(name, img_size=64), rng, dtype=torch.float64)
    model = timm.create_model(name, img_size=64).double().eval()
    model.load_state_dict(checkpoint_filter_fn(dict(sd), model))
    x = torch.randn(2, 3, 64, 64, generator=rng, dtype=torch.float64)
    with torch.no_grad():
        assert_close(model(x), official_forward(sd, x, name))


def test_filter_refuses_other_resolution(rng):
    sd = random_state_dict(official_layout_shapes("ptnt_ti_patch16_192", img_size=64), rng)
    model = timm.create_model("ptnt_ti_patch16_192", img_size=128)
    with pytest.raises(ValueError, match="fix the input size"):
        checkpoint_filter_fn(sd, model)


def test_bad_img_size():
    for size in (72, 96):  # 96: the 3x3 grid of stage 2 cannot merge into stage 3's bias size
        with pytest.raises(ValueError, match="divisible by 64"):
            timm.create_model("ptnt_ti_patch16_192", img_size=size)


@pytest.mark.parametrize("name", list(PARAMS))
def test_forward_and_intermediate_shapes(name):
    """Shapes of every variant at 64x64, traced on the meta device (numerics: test_matches_official_forward)."""
    _, od, *_ = _stage_dims(name)
    with torch.device("meta"):
        model = timm.create_model(name, img_size=64, num_classes=7).eval()
        x = torch.empty(2, 3, 64, 64)
        out = model(x)
        final, feats = model.forward_intermediates(x)
    assert out.shape == (2, 7)
    assert final.shape == (2, 1, od[-1])
    assert [tuple(f.shape) for f in feats] == [(2, c, 8 >> i, 8 >> i) for i, c in enumerate(od)]


def test_features_only(rng):
    model = timm.create_model("ptnt_ti_patch16_192", img_size=64, features_only=True, out_indices=(1, 3)).eval()
    assert model.feature_info.channels() == [160, 320]
    assert model.feature_info.reduction() == [16, 64]
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 64, 64, generator=rng))
    assert [tuple(f.shape) for f in feats] == [(2, 160, 4, 4), (2, 320, 1, 1)]
    assert all(torch.isfinite(f).all() for f in feats)


def test_backward(rng):
    model = timm.create_model("ptnt_ti_patch16_192", img_size=64, num_classes=3)
    model(torch.randn(1, 3, 64, 64, generator=rng)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# ---- timm's own TNT (not forked): the official checkpoints' layout loads through timm's filter ----------

TNT = {"tnt_s_patch16_224": (384, 24, 23_768_584), "tnt_b_patch16_224": (640, 40, 65_428_680)}


def official_tnt_shapes(outer: int, inner: int, depth: int = 12, num_patches: int = 196) -> dict:
    """Key -> shape of the official TNT state dict (tnt_pytorch/tnt.py module tree)."""
    words = 16
    shapes = {"patch_embed.proj.weight": (inner, 3, 7, 7), "patch_embed.proj.bias": (inner,),
              "proj_norm1.weight": (words * inner,), "proj_norm1.bias": (words * inner,),
              "proj.weight": (outer, words * inner), "proj.bias": (outer,),
              "proj_norm2.weight": (outer,), "proj_norm2.bias": (outer,), "cls_token": (1, 1, outer),
              "outer_tokens": (1, num_patches, outer), "outer_pos": (1, num_patches + 1, outer),
              "inner_pos": (1, words, inner), "norm.weight": (outer,), "norm.bias": (outer,),
              "head.weight": (1000, outer), "head.bias": (1000,)}
    for j in range(depth):
        p = f"blocks.{j}."
        for n, c in (("inner_norm1", inner), ("inner_norm2", inner), ("proj_norm1", words * inner),
                     ("proj_norm2", outer), ("outer_norm1", outer), ("outer_norm2", outer)):
            shapes[p + n + ".weight"] = shapes[p + n + ".bias"] = (c,)
        for a, c in (("inner_attn", inner), ("outer_attn", outer)):
            shapes[p + a + ".qk.weight"] = (2 * c, c)
            shapes[p + a + ".v.weight"] = (c, c)
            shapes[p + a + ".proj.weight"], shapes[p + a + ".proj.bias"] = (c, c), (c,)
        for m, c in (("inner_mlp", inner), ("outer_mlp", outer)):
            shapes[p + m + ".fc1.weight"], shapes[p + m + ".fc1.bias"] = (4 * c, c), (4 * c,)
            shapes[p + m + ".fc2.weight"], shapes[p + m + ".fc2.bias"] = (c, 4 * c), (c,)
        shapes[p + "proj.weight"] = (outer, words * inner)
    return shapes


@pytest.mark.parametrize("name", list(TNT))
def test_timm_tnt_converts_official_layout_strictly(name):
    """Full official TNT-S/B layout -> timm's checkpoint_filter_fn -> strict load (meta tensors)."""
    outer, inner, n_params = TNT[name]
    with torch.device("meta"):
        model = timm.create_model(name)
        sd = {k: torch.empty(s) for k, s in official_tnt_shapes(outer, inner).items()}
    assert sum(p.numel() for p in model.parameters()) == n_params
    filter_fn = timm.models.tnt.checkpoint_filter_fn
    model.load_state_dict(filter_fn(sd, model), strict=True, assign=True)


def test_timm_tnt_loads_official_file(rng, tmp_path):
    """The user path, timm.create_model(pretrained=True, file=...), on a 2-block TNT-S in the official layout;
    values land where the official semantics put them."""
    outer, inner = 384, 24
    sd = {k: torch.randn(s, generator=rng) for k, s in official_tnt_shapes(outer, inner, depth=2).items()}
    path = tmp_path / "tnt_official.pth"
    # as the official train.py (timm's CheckpointSaver) saves it, from a DistributedDataParallel model
    torch.save({"epoch": 299, "arch": "tnt_s_patch16_224", "state_dict": {"module." + k: v for k, v in sd.items()}},
               path)
    model = timm.create_model("tnt_s_patch16_224", depth=2, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))  # pretrained_strict defaults to True
    own = model.state_dict()
    assert torch.equal(own["patch_pos"], sd["outer_pos"])
    assert torch.equal(own["pixel_pos"], sd["inner_pos"].permute(0, 2, 1).reshape(1, inner, 4, 4))
    assert torch.equal(own["pixel_embed.proj.weight"], sd["patch_embed.proj.weight"])
    assert torch.equal(own["blocks.1.attn_in.qk.weight"], sd["blocks.1.inner_attn.qk.weight"])
    assert torch.equal(own["blocks.1.mlp.fc2.bias"], sd["blocks.1.outer_mlp.fc2.bias"])
    assert torch.equal(own["norm1_proj.weight"], sd["proj_norm1.weight"])
    assert torch.equal(own["blocks.0.norm1_proj.weight"], sd["blocks.0.proj_norm1.weight"])
    assert not model.pixel_embed.legacy  # per-patch 7x7 conv after unfolding, as the official PatchEmbed


def test_attention_chunks_large_batches(monkeypatch, rng):
    """Past MAX_SDPA_BATCH sequences the attention runs in chunks (CUDA grid limit) with the same result."""
    from attnzoo.vision import pyramid_tnt

    attn = pyramid_tnt.Attention(16, 2).eval()
    x = torch.randn(7, 16, 16, generator=rng)
    with torch.no_grad():
        whole = attn(x, (4, 4))
        monkeypatch.setattr(pyramid_tnt, "MAX_SDPA_BATCH", 3)
        chunked = attn(x, (4, 4))
    assert chunked.shape == whole.shape
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
