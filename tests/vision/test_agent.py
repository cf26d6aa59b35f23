"""Agent attention (DeiT, PVT, Swin hosts): the attention against a plain re-statement of the official formula,
parameter counts of every variant, shapes, features, and official-layout checkpoints through the user's path."""

from __future__ import annotations

import math
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import assert_close

import attnzoo  # registers the models
from attnzoo.vision import agent_pvt, agent_swin
from attnzoo.vision._agent_attention import AgentAttention, SpatialReductionAgentAttention

# Exact counts of the official models (LeapLabTHU/Agent-Attention code built with the configs of cfgs/*.yaml),
# and the README's rounded numbers (millions; the paper's 6.02 / 22.65 for DeiT-T/S).
PARAM_COUNTS = {
    "agent_deit_tiny": (6_015_640, 6.02),
    "agent_deit_small": (22_647_112, 22.65),
    "agent_deit_base": (87_204_904, 87.2),
    "agent_pvt_tiny": (11_570_352, 11.6),
    "agent_pvt_small": (20_635_066, 20.6),
    "agent_pvt_medium": (35_921_746, 35.9),
    "agent_pvt_large": (48_738_180, 48.7),
    "agent_swin_tiny": (28_902_964, 29),
    "agent_swin_small": (49_666_684, 50),
    "agent_swin_base": (88_095_096, 88),
}


# ---------------------------------------------------------------------------------------------------------------
# Plain re-statement of agent attention (paper Eq. 3-4 + the official biases), float64, explicit softmaxes.
# ---------------------------------------------------------------------------------------------------------------

def _bilinear_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D linear resampling with half-pixel centres (align_corners=False)."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        m[o, i0] += 1 - frac
        m[o, i1] += frac
    return m


def _adaptive_pool_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """(n_out, n_in) averaging weights of adaptive pooling: bin o covers [floor(o n/p), ceil((o+1) n/p))."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        lo, hi = (o * n_in) // n_out, -((-(o + 1) * n_in) // n_out)
        m[o, lo:hi] = 1.0 / (hi - lo)
    return m


def _resize(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (..., h, w) to ``size`` through the interpolation matrices."""
    mh, mw = _bilinear_matrix(size[0], grid.shape[-2]), _bilinear_matrix(size[1], grid.shape[-1])
    return torch.einsum("ih,...hw,jw->...ij", mh, grid, mw)


def reference_agent_attention(mod: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Agent attention of ``mod``'s parameters applied to ``x`` (B, P + H*W, C), all in float64."""
    p = {k: v.double() for k, v in mod.named_parameters()}
    x = x.double()
    b, n, c = x.shape
    heads, a, pre = mod.num_heads, mod.agent_num, mod.num_prefix_tokens
    d = c // heads
    (h, w), (kh, kw) = mod.grid_size, mod.kv_grid_size
    side = math.isqrt(a)

    if "qkv.weight" in p:
        q, k, v = (x @ p["qkv.weight"].T + p["qkv.bias"]).split(c, dim=-1)
    else:  # PVT: separate q / kv, keys and values from the spatially reduced input
        q = x @ p["q.weight"].T + p["q.bias"]
        src = x
        if "sr.weight" in p:
            src = F.conv2d(x.transpose(1, 2).reshape(b, c, h, w), p["sr.weight"], p["sr.bias"], stride=mod.sr_ratio)
            src = F.layer_norm(src.flatten(2).transpose(1, 2), (c,), p["norm.weight"], p["norm.bias"])
        k, v = (src @ p["kv.weight"].T + p["kv.bias"]).split(c, dim=-1)

    q_grid = q[:, pre:].reshape(b, h, w, c)
    agents = torch.einsum("ih,bhwc,jw->bijc", _adaptive_pool_matrix(side, h), q_grid, _adaptive_pool_matrix(side, w))
    agents = agents.reshape(b, a, heads, d).transpose(1, 2)  # (B, heads, a, d)
    qh, kh_, vh = (t.reshape(b, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))

    # agents -> keys: resized an_bias + row bias + column bias (+ the class-token column)
    bias1 = _resize(p["an_bias"], (kh, kw)) + p["ah_bias"][0] + p["aw_bias"][0]  # (heads, a, kh, kw)
    bias1 = bias1.reshape(heads, a, kh * kw)
    if pre:
        bias1 = torch.cat([p["ac_bias"][0], bias1], dim=-1)
    # queries -> agents: resized na_bias (transposed) + row bias + column bias (+ the class-token row)
    bias2 = _resize(p["na_bias"], (h, w)).permute(0, 2, 3, 1) + p["ha_bias"][0] + p["wa_bias"][0]  # (heads,h,w,a)
    bias2 = bias2.reshape(heads, h * w, a)
    if pre:
        bias2 = torch.cat([p["ca_bias"][0], bias2], dim=-2)

    agent_values = torch.softmax(agents @ kh_.transpose(-1, -2) / math.sqrt(d) + bias1, dim=-1) @ vh
    out = torch.softmax(qh @ agents.transpose(-1, -2) / math.sqrt(d) + bias2, dim=-1) @ agent_values
    out = out.transpose(1, 2).reshape(b, n, c)

    v_grid = v[:, pre:].transpose(1, 2).reshape(b, c, kh, kw)
    if (kh, kw) != (h, w):
        v_grid = _resize(v_grid, (h, w))
    local = F.conv2d(v_grid, p["dwc.weight"], p["dwc.bias"], padding=1, groups=c).flatten(2).transpose(1, 2)
    out = torch.cat([out[:, :pre], out[:, pre:] + local], dim=1)
    return out @ p["proj.weight"].T + p["proj.bias"]


def _randomize(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Random weights everywhere (biases included, so no term can hide behind a zero init)."""
    with torch.no_grad():
        for prm in module.parameters():
            prm.copy_(torch.randn(prm.shape, generator=gen, dtype=prm.dtype) * 0.3)


AGENT_CASES = {
    # DeiT-like: class token, 7x5 grid pooled to 3x3 (uneven adaptive bins), bias grid resized 7x7 -> 7x5
    "cls_uneven": lambda: AgentAttention(24, 3, agent_num=9, grid_size=(7, 5), num_prefix_tokens=1),
    # Swin-like: no prefix token, upsampled bias grid
    "grid_9x10": lambda: AgentAttention(16, 2, agent_num=4, grid_size=(9, 10)),
    # PVT with spatial reduction 2: 8x6 queries, 4x3 keys, V resized back before the depthwise conv
    "pvt_sr2": lambda: SpatialReductionAgentAttention(16, 2, agent_num=4, grid_size=(8, 6), sr_ratio=2),
}


@pytest.mark.parametrize("case", sorted(AGENT_CASES))
def test_agent_attention_matches_formula(case: str, rng: torch.Generator) -> None:
    mod = AGENT_CASES[case]().eval()
    _randomize(mod, rng)
    n = mod.num_prefix_tokens + mod.grid_size[0] * mod.grid_size[1]
    x = torch.randn(2, n, mod.dim, generator=rng)
    expected = reference_agent_attention(mod, x)

    # float32 forward
    assert_close(mod(x, mod.grid_size) if isinstance(mod, SpatialReductionAgentAttention) else mod(x), expected)

    # float64 forward and backward (input and every parameter) against the reference's autograd
    mod64 = AGENT_CASES[case]().double().eval()
    mod64.load_state_dict(mod.state_dict())
    x64 = x.double().requires_grad_()
    out = mod64(x64, mod64.grid_size) if isinstance(mod64, SpatialReductionAgentAttention) else mod64(x64)
    assert_close(out, expected)
    grad_out = torch.randn(out.shape, generator=rng, dtype=torch.float64)
    got = torch.autograd.grad(out, [x64, *mod64.parameters()], grad_out)
    xr = x.double().requires_grad_()
    ref_out = reference_agent_attention(mod64, xr)
    want = torch.autograd.grad(ref_out, [xr, *mod64.parameters()], grad_out)
    for (name, _), g, r in zip([("input", None), *mod64.named_parameters()], got, want):
        assert_close(g, r, msg=f"grad of {name}")


def test_agent_attention_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="perfect square"):
        AgentAttention(16, 2, agent_num=10, grid_size=7)
    with pytest.raises(ValueError, match="num_heads"):
        AgentAttention(16, 3, agent_num=9, grid_size=7)
    mod = AgentAttention(16, 2, agent_num=9, grid_size=7)
    with pytest.raises(ValueError, match="7x7 query grid"):
        mod(torch.randn(1, 36, 16))
    with pytest.raises(ValueError, match="no attention mask"):
        mod(torch.randn(1, 49, 16), mask=torch.zeros(1, 49, 49))


# ---------------------------------------------------------------------------------------------------------------
# Variants: parameter counts, block layout, shapes, features
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_param_count_and_create_model(name: str) -> None:
    exact, readme_millions = PARAM_COUNTS[name]
    with torch.device("meta"):  # structure only: no weight init, no memory
        model = timm.create_model(name)
    count = sum(prm.numel() for prm in model.parameters())
    assert count == exact, f"{name}: {count} parameters, official {exact}"
    digits = len(str(readme_millions).split(".")[1]) if "." in str(readme_millions) else 0
    assert round(count / 1e6, digits) == readme_millions
    assert name in attnzoo.vision.list_models("agent_*")


def test_block_layouts() -> None:
    assert agent_swin.block_types("AAMB2", (2, 2, 18, 2)) == ["AA", "AA", "AA" + "B" * 16, "BB"]
    with pytest.raises(ValueError, match="agent block count"):
        agent_swin.block_types("AAMB", (2, 2, 18, 2))
    with torch.device("meta"):
        swin_b = timm.create_model("agent_swin_base")
        deit_b = timm.create_model("agent_deit_base")
        deit_s = timm.create_model("agent_deit_small", agent_num=(4, 9, 16, 25))
    kinds = ["".join("A" if isinstance(b, agent_swin.AgentSwinTransformerBlock) else "B" for b in stage.blocks)
             for stage in swin_b.layers]
    assert kinds == ["AA", "AA", "AA" + "B" * 16, "BB"]
    grids = [stage.blocks[0].attn.grid_size for stage in swin_b.layers[:3]]
    assert grids == [(56, 56), (28, 28), (14, 14)]  # agent blocks span the whole stage grid
    assert all(b.attn.fused_attn for b in swin_b.layers[3].blocks)  # window blocks on SDPA
    assert [isinstance(b.attn, AgentAttention) for b in deit_b.blocks] == [True] * 4 + [False] * 8
    assert {b.attn.agent_num for b in deit_b.blocks[:4]} == {81}
    # official block -> agent_num entry map {0, 1, 2, 2, 2, 3}[i // 2]
    assert [b.attn.agent_num for b in deit_s.blocks] == [4, 4, 9, 9, 16, 16, 16, 16, 16, 16, 25, 25]


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, torch.nn.Module]:
    """The registered tiny variants, built once (weight init dominates the cost of these tests)."""
    torch.manual_seed(0)
    return {name: timm.create_model(name).eval() for name in ("agent_deit_tiny", "agent_pvt_tiny", "agent_swin_tiny")}


@pytest.mark.parametrize("name", ["agent_deit_tiny", "agent_pvt_tiny", "agent_swin_tiny"])
def test_forward_shape(name: str, tiny_models: dict[str, torch.nn.Module]) -> None:
    model = tiny_models[name]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = model(x)
        final, inter = model.forward_intermediates(x)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    if "deit" in name:
        assert [t.shape for t in inter] == [(2, 192, 14, 14)] * 12
    else:
        channels = [64, 128, 320, 512] if "pvt" in name else [96, 192, 384, 768]
        assert [tuple(t.shape) for t in inter] == [(2, c, s, s) for c, s in zip(channels, (56, 28, 14, 7))]
        with torch.no_grad():  # the head on the returned final features gives the logits
            assert_close(model.forward_head(final), out)
    with pytest.raises((ValueError, AssertionError)):  # fixed input size: a clear refusal, not silent garbage
        model(torch.randn(1, 3, 192, 192))


@pytest.mark.parametrize("name, nhwc", [("agent_pvt_tiny", False), ("agent_swin_tiny", True)])
def test_features_only(name: str, nhwc: bool) -> None:
    # narrow widths keep the build cheap; the stage structure is the registered variant's
    narrow = dict(embed_dims=(16, 32, 80, 128)) if "pvt" in name else dict(embed_dim=24)
    model = timm.create_model(name, features_only=True, **narrow).eval()
    channels = [16, 32, 80, 128] if "pvt" in name else [24, 48, 96, 192]
    assert model.feature_info.channels() == channels
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 224, 224))
    for f, c, s in zip(feats, channels, (56, 28, 14, 7)):
        assert f.shape == ((1, s, s, c) if nhwc else (1, c, s, s))


def test_backward_and_grad_checkpointing(rng: torch.Generator) -> None:
    # narrow PVT: every parameter (agent biases included) gets a gradient, identical with checkpointing
    model = timm.create_model("agent_pvt_tiny", embed_dims=(16, 32, 80, 128), num_classes=5, img_size=128)
    _randomize(model, rng)
    x = torch.randn(2, 3, 128, 128, generator=rng)
    model(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        assert_close(p.grad, grads[n], msg=n)


# ---------------------------------------------------------------------------------------------------------------
# Official checkpoint layout -> timm.create_model(pretrained=True, file=...) -> same outputs
# ---------------------------------------------------------------------------------------------------------------

def official_swin_state_dict(model: agent_swin.AgentSwinTransformer) -> dict[str, torch.Tensor]:
    """Our weights under the original (official Agent-Swin) names, with its persistent buffers."""
    out = {}
    for k, v in model.state_dict().items():
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[re.sub(r"^head\.fc\.", "head.", k)] = v
    for i, stage in enumerate(model.layers):  # the official Swin block registers these buffers as persistent
        res = stage.blocks[0].input_resolution[0]
        for j, block in enumerate(stage.blocks):
            if isinstance(block, agent_swin.AgentSwinTransformerBlock):
                continue
            out[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
            if j % 2 == 1 and res > 7:
                out[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros((res // 7) ** 2, 49, 49)
    return out


def official_pvt_state_dict(model: agent_pvt.AgentPyramidVisionTransformer) -> dict[str, torch.Tensor]:
    """Our weights under the official Agent-PVT names (patch_embed{i}, pos_embed{i}, block{i}.{j})."""
    out = {}
    for k, v in model.state_dict().items():
        k = re.sub(r"^stages\.(\d+)\.patch_embed\.", lambda m: f"patch_embed{int(m.group(1)) + 1}.", k)
        k = re.sub(r"^stages\.(\d+)\.pos_embed$", lambda m: f"pos_embed{int(m.group(1)) + 1}", k)
        out[re.sub(r"^stages\.(\d+)\.blocks\.", lambda m: f"block{int(m.group(1)) + 1}.", k)] = v
    return out


# Reduced widths / depths of the registered variants that still hit every block kind and key pattern.
SMALL = {
    "agent_swin_tiny": (dict(embed_dim=24, depths=(2, 2, 3, 2), num_heads=(1, 2, 3, 4), attn_type="AAMB1",
                             agent_num=(9, 16, 9, 4)), official_swin_state_dict),
    "agent_pvt_tiny": (dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4),
                            attn_type="AAAB", agent_sr_ratios=(2, 1, 1, 1)), official_pvt_state_dict),
    "agent_deit_tiny": (dict(embed_dim=48, depth=6, num_heads=3, agent_depth=4, agent_num=(4, 9, 16, 25)),
                        lambda m: dict(m.state_dict())),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_official_checkpoint_loads(name: str, tmp_path, rng: torch.Generator) -> None:
    kwargs, to_official = SMALL[name]
    model = timm.create_model(name, **kwargs).eval()
    _randomize(model, rng)
    official = to_official(model)
    assert not any(k.startswith(("stages.", "head.fc")) for k in official)
    path = tmp_path / "official.pth"
    torch.save({"model": official, "epoch": 299}, path)  # official training scripts save under "model"

    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()
    x = torch.randn(2, 3, 224, 224, generator=rng)
    with torch.no_grad():
        assert_close(loaded(x), model(x), msg=name)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
