"""BiFormer: parameter counts, official semantics, official checkpoint layout, timm features.

The reference here is an independent plain re-statement of the official model (rayleizhu/BiFormer
``models/biformer.py``, ``models/_common.py``, ``ops/bra_legacy.py``) written from its semantics: explicit
region lists, an explicit gather of the routed regions' tokens, per-head softmax, float64. It reads weights
under the official key names, so the same tests also check :func:`checkpoint_filter_fn`.
"""

from __future__ import annotations

import argparse

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import assert_close

from attnzoo.kernels import set_backend
from attnzoo.vision import biformer, list_models

# Official model sizes (README: 13.1M / 25.5M / 56.8M; exact counts of the official code's modules).
PARAMS = {"biformer_tiny": 13_142_760, "biformer_small": 25_536_232, "biformer_base": 56_804_968}
ARCH = {"biformer_tiny": ((2, 2, 8, 2), (64, 128, 256, 512)),
        "biformer_small": ((4, 4, 18, 4), (64, 128, 256, 512)),
        "biformer_base": ((4, 4, 18, 4), (96, 192, 384, 768))}
TOPKS = (1, 4, 16, None)  # official topks=[1, 4, 16, -2]: stage 4 is full attention with LePE
HEAD_DIM, N_WIN = 32, 7


# ------------------------------------------------------------------ official layout and semantics


def official_state_dict(depths: tuple[int, ...], dims: tuple[int, ...], num_classes: int = 1000,
                        seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights under the official BiFormer key names and shapes (``model.state_dict()`` there)."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def weight(key: str, *shape: int) -> None:
        fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
        sd[key] = torch.randn(*shape, generator=gen, dtype=dtype) * fan_in ** -0.5

    def vector(key: str, n: int, center: float = 0.0) -> None:
        sd[key] = center + 0.1 * torch.randn(n, generator=gen, dtype=dtype)

    def batchnorm(prefix: str, n: int) -> None:
        vector(prefix + "weight", n, 1.0)
        vector(prefix + "bias", n)
        vector(prefix + "running_mean", n)
        sd[prefix + "running_var"] = 0.5 + torch.rand(n, generator=gen, dtype=dtype)
        sd[prefix + "num_batches_tracked"] = torch.tensor(1000)

    def linear(prefix: str, n_out: int, n_in: int, bias: bool = True) -> None:
        weight(prefix + "weight", n_out, n_in)
        if bias:
            vector(prefix + "bias", n_out)

    def depthwise(prefix: str, n: int, size: int) -> None:
        weight(prefix + "weight", n, 1, size, size)
        vector(prefix + "bias", n)

    weight("downsample_layers.0.0.weight", dims[0] // 2, 3, 3, 3)
    vector("downsample_layers.0.0.bias", dims[0] // 2)
    batchnorm("downsample_layers.0.1.", dims[0] // 2)
    weight("downsample_layers.0.3.weight", dims[0], dims[0] // 2, 3, 3)
    vector("downsample_layers.0.3.bias", dims[0])
    batchnorm("downsample_layers.0.4.", dims[0])
    for i in range(1, 4):
        weight(f"downsample_layers.{i}.0.weight", dims[i], dims[i - 1], 3, 3)
        vector(f"downsample_layers.{i}.0.bias", dims[i])
        batchnorm(f"downsample_layers.{i}.1.", dims[i])
    for i, (depth, d) in enumerate(zip(depths, dims)):
        for j in range(depth):
            p = f"stages.{i}.{j}."
            depthwise(p + "pos_embed.", d, 3)
            vector(p + "norm1.weight", d, 1.0)
            vector(p + "norm1.bias", d)
            if TOPKS[i] is not None:  # BiLevelRoutingAttention
                depthwise(p + "attn.lepe.", d, 5)
                linear(p + "attn.qkv.qkv.", 3 * d, d)
                linear(p + "attn.wo.", d, d)
            else:  # AttentionLePE
                linear(p + "attn.qkv.", 3 * d, d, bias=False)
                linear(p + "attn.proj.", d, d)
                depthwise(p + "attn.lepe.", d, 5)
            vector(p + "norm2.weight", d, 1.0)
            vector(p + "norm2.bias", d)
            linear(p + "mlp.0.", 3 * d, d)
            linear(p + "mlp.3.", d, 3 * d)
    batchnorm("norm.", dims[-1])
    linear("head.", num_classes, dims[-1])
    return sd


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Zero-padded 'same' depthwise conv written as a sum of shifted maps. x: (N, C, H, W), weight (C, 1, k, k)."""
    k = weight.shape[-1]
    height, width = x.shape[-2:]
    padded = F.pad(x, (k // 2,) * 4)
    out = bias[None, :, None, None].expand_as(x).clone()
    for dy in range(k):
        for dx in range(k):
            out = out + weight[None, :, 0, dy, dx, None, None] * padded[..., dy:dy + height, dx:dx + width]
    return out


def official_bra(x: torch.Tensor, p: dict[str, torch.Tensor], num_heads: int, topk: int,
                 auto_pad: bool) -> torch.Tensor:
    """Official BiLevelRoutingAttention (identity kv, hard non-differentiable routing). x: (N, H, W, C)."""
    n, h_in, w_in, c = x.shape
    if auto_pad:  # zeros at the bottom / right, before the qkv projection
        x = torch.cat([x, x.new_zeros(n, h_in, (-w_in) % N_WIN, c)], dim=2)
        x = torch.cat([x, x.new_zeros(n, (-h_in) % N_WIN, x.shape[2], c)], dim=1)
    h, w = x.shape[1:3]
    qkv = x @ p["qkv.qkv.weight"].T + p["qkv.qkv.bias"]
    q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
    rh, rw = h // N_WIN, w // N_WIN
    windows = [(slice(j * rh, (j + 1) * rh), slice(i * rw, (i + 1) * rw)) for j in range(N_WIN) for i in range(N_WIN)]
    scale = c ** -0.5  # the full qk width, not the head width
    hd = c // num_heads
    out = torch.zeros_like(v)
    for b in range(n):
        def tokens(t: torch.Tensor, r: int, b: int = b) -> torch.Tensor:
            return t[b, windows[r][0], windows[r][1]].reshape(rh * rw, -1)

        q_mean = torch.stack([tokens(q, r).mean(0) for r in range(len(windows))])
        k_mean = torch.stack([tokens(k, r).mean(0) for r in range(len(windows))])
        chosen = ((q_mean * scale) @ k_mean.T).topk(topk, dim=-1).indices
        for r in range(len(windows)):
            keys = torch.cat([tokens(k, int(s)) for s in chosen[r]])  # explicit gather of the routed regions
            values = torch.cat([tokens(v, int(s)) for s in chosen[r]])
            queries = tokens(q, r).reshape(-1, num_heads, hd)
            logits = torch.einsum("qhd,khd->hqk", queries * scale, keys.reshape(-1, num_heads, hd))
            heads = torch.einsum("hqk,khd->qhd", logits.softmax(-1), values.reshape(-1, num_heads, hd))
            out[b, windows[r][0], windows[r][1]] = heads.reshape(rh, rw, c)
    lepe = depthwise_conv(v.permute(0, 3, 1, 2), p["lepe.weight"], p["lepe.bias"])
    out = (out + lepe.permute(0, 2, 3, 1)) @ p["wo.weight"].T + p["wo.bias"]
    return out[:, :h_in, :w_in]


def official_full_attention(x: torch.Tensor, p: dict[str, torch.Tensor], num_heads: int = 8) -> torch.Tensor:
    """Official AttentionLePE: global attention, head-dim scale, no qkv bias, LePE on the input x."""
    n, h, w, c = x.shape
    tokens = x.reshape(n, h * w, c)
    q, k, v = (tokens @ p["qkv.weight"].T).split(c, dim=-1)
    hd = c // num_heads
    heads = []
    for m in range(num_heads):
        sl = slice(m * hd, (m + 1) * hd)
        heads.append(torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) * hd ** -0.5, -1) @ v[..., sl])
    lepe = depthwise_conv(x.permute(0, 3, 1, 2), p["lepe.weight"], p["lepe.bias"])
    out = torch.cat(heads, -1) + lepe.permute(0, 2, 3, 1).reshape(n, h * w, c)
    return (out @ p["proj.weight"].T + p["proj.bias"]).reshape(n, h, w, c)


def official_block(x: torch.Tensor, p: dict[str, torch.Tensor], num_heads: int, topk: int | None,
                   auto_pad: bool = False) -> torch.Tensor:
    """Official Block: x + dwconv3x3(x), then pre-norm attention and MLP (LayerNorm eps 1e-6). x: NCHW."""
    c = x.shape[1]
    x = x + depthwise_conv(x, p["pos_embed.weight"], p["pos_embed.bias"])
    x = x.permute(0, 2, 3, 1)
    y = F.layer_norm(x, (c,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
    attn_p = {k.removeprefix("attn."): v for k, v in p.items() if k.startswith("attn.")}
    x = x + (official_full_attention(y, attn_p) if topk is None else official_bra(y, attn_p, num_heads, topk, auto_pad))
    y = F.layer_norm(x, (c,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
    x = x + F.gelu(y @ p["mlp.0.weight"].T + p["mlp.0.bias"]) @ p["mlp.3.weight"].T + p["mlp.3.bias"]
    return x.permute(0, 3, 1, 2)


def official_model(x: torch.Tensor, sd: dict[str, torch.Tensor], depths: tuple[int, ...], auto_pad: bool = False,
                   head_dim: int = HEAD_DIM) -> torch.Tensor:
    """Official BiFormer.forward in eval mode: images (N, 3, H, W) -> logits."""
    def bn(t: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.batch_norm(t, sd[prefix + "running_mean"], sd[prefix + "running_var"], sd[prefix + "weight"],
                            sd[prefix + "bias"], training=False, eps=1e-5)

    def conv(t: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.conv2d(t, sd[prefix + "weight"], sd[prefix + "bias"], stride=2, padding=1)

    x = F.gelu(bn(conv(x, "downsample_layers.0.0."), "downsample_layers.0.1."))
    x = bn(conv(x, "downsample_layers.0.3."), "downsample_layers.0.4.")
    for i, depth in enumerate(depths):
        if i > 0:
            x = bn(conv(x, f"downsample_layers.{i}.0."), f"downsample_layers.{i}.1.")
        for j in range(depth):
            prefix = f"stages.{i}.{j}."
            p = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
            x = official_block(x, p, x.shape[1] // head_dim, TOPKS[i], auto_pad)
    x = bn(x, "norm.").flatten(2).mean(-1)
    return x @ sd["head.weight"].T + sd["head.bias"]


def _loaded(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    model.load_state_dict(biformer.checkpoint_filter_fn({"model": sd}, model), strict=True)
    return model.eval()


# ------------------------------------------------------------------ architecture


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_count_is_official(name):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert model.attnzoo_kernels == ("routed_attention",)


def test_registered_with_official_urls():
    assert list_models("biformer*") == ["biformer_base", "biformer_small", "biformer_tiny"]
    for name in PARAMS:
        cfg = timm.get_pretrained_cfg(name).to_dict()
        assert cfg["url"].startswith("https://api.onedrive.com/v1.0/shares/")
        assert cfg["classifier"] == "head.fc" and cfg["first_conv"] == "stem.0"


@pytest.mark.parametrize("size,topk,auto_pad", [((28, 28), 4, False), ((30, 23), 2, True), ((14, 21), None, False)])
def test_block_matches_official_bra(rng, size, topk, auto_pad):
    """One block (routed, routed with auto_pad on a non-divisible map, full attention) vs the re-statement."""
    dim, heads = 64, 2
    sd = official_state_dict((1, 1, 1, 1), (dim,) * 4, seed=1, dtype=torch.float64)
    stage = 0 if topk is not None else 3
    prefix = f"stages.{stage}.0."
    block = biformer.BiFormerBlock(dim, heads, topk, n_win=N_WIN, auto_pad=auto_pad)
    converted = biformer.checkpoint_filter_fn(sd, block)
    block.load_state_dict({k.removeprefix(f"stages.{stage}.blocks.0."): v for k, v in converted.items()
                           if k.startswith(f"stages.{stage}.blocks.0.")}, strict=True)
    x = torch.randn(2, dim, *size, dtype=torch.float64, generator=rng)
    p = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    with torch.no_grad():
        assert_close(block(x.float()), official_block(x, p, heads, topk, auto_pad))


def test_model_matches_official_restatement(rng):
    """Whole model (stem, downsampling, all attention kinds, BatchNorm, head) on random official weights."""
    # Reduced widths keep the float64 re-statement cheap; heads 1, 2, 4 in the routed stages, 8 in stage 4.
    depths, dims, head_dim = (1, 1, 2, 1), (32, 64, 128, 128), 32
    sd = official_state_dict(depths, dims, num_classes=10, seed=2, dtype=torch.float64)
    kwargs = dict(depths=depths, embed_dims=dims, head_dim=head_dim, num_classes=10)
    model = _loaded(biformer.BiFormer(**kwargs), sd)
    x = torch.randn(1, 3, 112, 112, dtype=torch.float64, generator=rng)
    with torch.no_grad():
        assert_close(model(x.float()), official_model(x, sd, depths, head_dim=head_dim))
    padded = _loaded(biformer.BiFormer(**kwargs, auto_pad=True), sd)
    x = torch.randn(1, 3, 100, 130, dtype=torch.float64, generator=rng)  # maps 25x33, 13x17, 7x9: all padded
    with torch.no_grad():
        assert_close(padded(x.float()), official_model(x, sd, depths, auto_pad=True, head_dim=head_dim))


# ------------------------------------------------------------------ input sizes and timm features


def test_forward_shapes():
    model = timm.create_model("biformer_tiny", pretrained=False).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
        features = model.forward_features(torch.randn(1, 3, 224, 112))
        assert features.shape == (1, 512, 7, 4)
        assert model.forward_head(features).shape == (1, 1000)
        assert model.forward_head(features, pre_logits=True).shape == (1, 512)


def test_non_divisible_input_names_sizes_that_work():
    model = biformer.BiFormer(depths=(1, 1, 1, 1)).eval()
    with pytest.raises(ValueError, match=r"input height 200 .* are 112 or 221 \(multiples of 112 .*auto_pad=True"):
        model(torch.randn(1, 3, 200, 224))
    attn = biformer.BiLevelRoutingAttention(32, 2, n_win=N_WIN, topk=2)
    with pytest.raises(ValueError, match=r"feature map 15x14 is not divisible by n_win=7; pad it to 21x14"):
        attn(torch.randn(1, 15, 14, 32))
    padded = biformer.BiFormer(depths=(1, 1, 1, 1), num_classes=5, auto_pad=True).eval()
    with torch.no_grad():
        assert padded(torch.randn(1, 3, 64, 90)).shape == (1, 5)


def test_features_only_and_intermediates():
    features = timm.create_model("biformer_tiny", pretrained=False, features_only=True).eval()
    assert features.feature_info.channels() == [64, 128, 256, 512]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        outs = features(torch.randn(1, 3, 112, 112))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 28, 28), (1, 128, 14, 14), (1, 256, 7, 7), (1, 512, 4, 4)]

    model = biformer.BiFormer(depths=(1, 1, 1, 1)).eval()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[1, 3])
        assert [tuple(t.shape) for t in inter] == [(1, 128, 14, 14), (1, 512, 4, 4)]
        assert_close(final, model.forward_features(x))
        assert_close(model.norm(inter[-1]), final)
        early = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        assert_close(early[1], inter[0])
    kept = model.prune_intermediate_layers([0, 1])
    assert kept == [0, 1] and len(model.stages) == 2 and model.num_features == 128


def test_grad_checkpointing_and_classifier(rng):
    torch.manual_seed(0)
    model = biformer.BiFormer(depths=(1, 1, 1, 1), embed_dims=(32, 64, 96, 128), num_classes=7).train()
    x = torch.randn(2, 3, 112, 112, generator=rng)
    plain = model(x)
    grads = torch.autograd.grad(plain.sum(), list(model.parameters()))
    model.set_grad_checkpointing(True)
    ckpt = model(x)
    grads_ckpt = torch.autograd.grad(ckpt.sum(), list(model.parameters()))
    assert_close(ckpt, plain)
    for g, gc in zip(grads, grads_ckpt):
        assert_close(gc, g)
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3
    model.eval().reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, 128)


@pytest.mark.parametrize("backend", ["triton", "flex"])
def test_backends_agree_inside_model(rng, backend):
    """The model on another kernel backend (Triton in the interpreter, FlexAttention) gives the torch backend's
    output, and for Triton the input gradient (FlexAttention has no CPU backward). Reduced config: 4x4
    regions keep the interpreter's program count small."""
    model = biformer.BiFormer(depths=(1, 1, 1, 1), embed_dims=(32, 32, 64, 64), head_dim=16, n_win=4,
                              topks=(2, 3, None, None), num_classes=4).eval()
    x = torch.randn(1, 3, 64, 64, generator=rng)
    backward = backend == "triton"
    results = {}
    for name in ("torch", backend):
        set_backend(name)
        xi = x.clone().requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            out = model(xi)
        grad = torch.autograd.grad(out.square().sum(), xi)[0] if backward else None
        results[name] = out.detach(), grad
    assert_close(results[backend][0], results["torch"][0])
    if backward:
        assert_close(results[backend][1], results["torch"][1])


# ------------------------------------------------------------------ official checkpoints


def test_official_layout_converts_and_loads_strict():
    depths, dims = ARCH["biformer_tiny"]
    sd = official_state_dict(depths, dims)
    with torch.device("meta"):
        model = timm.create_model("biformer_tiny", pretrained=False)
    converted = biformer.checkpoint_filter_fn({"model": sd, "epoch": 299}, model)
    assert sorted(converted) == sorted(model.state_dict())
    for key, value in converted.items():
        assert value.shape == model.state_dict()[key].shape, key
    assert sum(v.numel() for k, v in sd.items() if "running" not in k and "num_batches" not in k) == PARAMS[
        "biformer_tiny"]
    # Already-converted weights (what `attnzoo convert` writes) pass through unchanged.
    assert biformer.checkpoint_filter_fn(converted, model) is converted
    prefixed = biformer.checkpoint_filter_fn({"model": {f"module.{k}": v for k, v in sd.items()}}, model)
    assert sorted(prefixed) == sorted(converted)


def test_pretrained_from_local_official_file(tmp_path, rng):
    """timm.create_model(pretrained=True, pretrained_cfg_overlay=dict(file=...)) on an official-format .pth."""
    depths, dims = ARCH["biformer_tiny"]
    sd = official_state_dict(depths, dims, seed=3)
    path = tmp_path / "biformer_tiny_in1k.pth"
    torch.save({"model": sd, "epoch": 299, "args": argparse.Namespace(model="biformer_tiny")}, path)
    model = timm.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    direct = _loaded(timm.create_model("biformer_tiny", pretrained=False), sd)
    for key, value in direct.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.randn(1, 3, 112, 112, generator=rng)
    with torch.no_grad():
        assert torch.equal(model(x), direct(x))
