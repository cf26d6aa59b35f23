"""NAT / DiNAT / DiNAT_s / isotropic NAT & DiNAT: parameter counts, shapes, official-checkpoint conversion,
kernel backends.

The ground truth for the architecture is ``official_forward`` below: a plain float64 re-statement of the
official ``classification/nat.py`` / ``dinats.py`` / ``isotropic.py`` forward (with NATTEN 0.14's
``NeighborhoodAttention2D``, which zero-pads maps smaller than the dilated window) that reads an
official-layout state dict directly, with attention from :func:`attnzoo.kernels.reference.na_reference`.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import assert_close

import attnzoo
from attnzoo.kernels import use_backend
from attnzoo.kernels.reference import na_reference
from attnzoo.vision.nat import NAT, NATIsotropic, checkpoint_filter_fn

# Official architecture hyper-parameters (SHI-Labs/Neighborhood-Attention-Transformer, classification/).
_D18 = [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]
_DS18 = [[1, 8], [1, 4], [1, 2] * 9, [1, 1]]
OFFICIAL = {
    "nat_mini": dict(depths=[3, 4, 6, 5], heads=[2, 4, 8, 16], dim=64, mlp=3, k=7, ls=None, swin=False),
    "nat_tiny": dict(depths=[3, 4, 18, 5], heads=[2, 4, 8, 16], dim=64, mlp=3, k=7, ls=None, swin=False),
    "nat_small": dict(depths=[3, 4, 18, 5], heads=[3, 6, 12, 24], dim=96, mlp=2, k=7, ls=1e-5, swin=False),
    "nat_base": dict(depths=[3, 4, 18, 5], heads=[4, 8, 16, 32], dim=128, mlp=2, k=7, ls=1e-5, swin=False),
    "dinat_mini": dict(depths=[3, 4, 6, 5], heads=[2, 4, 8, 16], dim=64, mlp=3, k=7, ls=None, swin=False,
                       dil=[[1, 8, 1], [1, 4, 1, 4], [1, 2] * 3, [1] * 5]),
    "dinat_tiny": dict(depths=[3, 4, 18, 5], heads=[2, 4, 8, 16], dim=64, mlp=3, k=7, ls=None, swin=False, dil=_D18),
    "dinat_small": dict(depths=[3, 4, 18, 5], heads=[3, 6, 12, 24], dim=96, mlp=2, k=7, ls=None, swin=False,
                        dil=_D18),
    "dinat_base": dict(depths=[3, 4, 18, 5], heads=[4, 8, 16, 32], dim=128, mlp=2, k=7, ls=1e-5, swin=False,
                       dil=_D18),
    "dinat_large": dict(depths=[3, 4, 18, 5], heads=[6, 12, 24, 48], dim=192, mlp=2, k=7, ls=None, swin=False,
                        dil=_D18),
    "dinat_large_384": dict(depths=[3, 4, 18, 5], heads=[6, 12, 24, 48], dim=192, mlp=2, k=7, ls=None, swin=False,
                            dil=[[1, 13, 1], [1, 6, 1, 6], [1, 3] * 9, [1] * 5]),
    "dinat_large_384_11x11": dict(depths=[3, 4, 18, 5], heads=[6, 12, 24, 48], dim=192, mlp=2, k=11, ls=None,
                                  swin=False, dil=_D18),
    "dinat_s_tiny": dict(depths=[2, 2, 6, 2], heads=[3, 6, 12, 24], dim=96, mlp=4, k=7, ls=None, swin=True,
                         dil=[[1, 8], [1, 4], [1, 2] * 3, [1, 1]]),
    "dinat_s_small": dict(depths=[2, 2, 18, 2], heads=[3, 6, 12, 24], dim=96, mlp=4, k=7, ls=None, swin=True,
                          dil=_DS18),
    "dinat_s_base": dict(depths=[2, 2, 18, 2], heads=[4, 8, 16, 32], dim=128, mlp=4, k=7, ls=None, swin=True,
                         dil=_DS18),
    "dinat_s_large": dict(depths=[2, 2, 18, 2], heads=[6, 12, 24, 48], dim=192, mlp=4, k=7, ls=None, swin=True,
                          dil=_DS18),
    "dinat_s_large_384": dict(depths=[2, 2, 18, 2], heads=[6, 12, 24, 48], dim=192, mlp=4, k=7, ls=None, swin=True,
                              dil=[[1, 13], [1, 6], [1, 3] * 9, [1, 1]]),
    "nat_isotropic_small": dict(iso=True, depth=12, heads=12, dim=384, mlp=4, k=7, iso_dil=1),
    "nat_isotropic_base": dict(iso=True, depth=12, heads=24, dim=768, mlp=4, k=7, iso_dil=1),
    "dinat_isotropic_small": dict(iso=True, depth=12, heads=12, dim=384, mlp=4, k=7, iso_dil=2),
    "dinat_isotropic_base": dict(iso=True, depth=12, heads=24, dim=768, mlp=4, k=7, iso_dil=2),
}

# Exact parameter counts (1000 classes). They equal the sum over the official checkpoint layout below, and
# round to the official numbers: NAT-M 19.98M, NAT-T 27.90M, NAT-S 51M, NAT-B 90M; DiNAT-L 200M;
# DiNAT_s-T 28M, -S 50M, -B 88M, -L 197M; NAT/DiNAT-iso-S 22M, -B 86M (README tables).
PARAMS = {
    "nat_mini": 19_984_174, "nat_tiny": 27_901_582, "nat_small": 50_743_297, "nat_base": 89_769_652,
    "dinat_mini": 19_984_174, "dinat_tiny": 27_901_582, "dinat_small": 50_719_681, "dinat_base": 89_769_652,
    "dinat_large": 200_943_514, "dinat_large_384": 200_943_514, "dinat_large_384_11x11": 201_144_250,
    "dinat_s_tiny": 28_288_354, "dinat_s_small": 49_606_258, "dinat_s_base": 87_768_224,
    "dinat_s_large": 196_532_476, "dinat_s_large_384": 196_532_476,
    "nat_isotropic_small": 21_999_736, "nat_isotropic_base": 86_465_800,
    "dinat_isotropic_small": 21_999_736, "dinat_isotropic_base": 86_465_800,
}
README_MPARAMS = {
    "nat_mini": 19.98, "nat_tiny": 27.90, "nat_small": 51, "nat_base": 90, "dinat_mini": 20, "dinat_tiny": 28,
    "dinat_small": 51, "dinat_base": 90, "dinat_large": 200, "dinat_large_384": 200, "dinat_large_384_11x11": 200,
    "dinat_s_tiny": 28, "dinat_s_small": 50, "dinat_s_base": 88, "dinat_s_large": 197, "dinat_s_large_384": 197,
    "nat_isotropic_small": 22, "nat_isotropic_base": 86, "dinat_isotropic_small": 22, "dinat_isotropic_base": 86,
}


def official_shapes(cfg: dict, num_classes: int = 1000, in_chans: int = 3) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official checkpoint (nat.py: ``levels``, conv tokenizer/downsampler; dinats.py:
    ``layers``, Swin patch embedding and patch merging; isotropic.py: ``layers.{i}`` blocks after a 16x16
    patch embedding; NATTEN module ``attn.{qkv,rpb,proj}``)."""
    if cfg.get("iso"):
        return _official_isotropic_shapes(cfg, num_classes, in_chans)
    e, k, n = cfg["dim"], cfg["k"], len(cfg["depths"])
    s: dict[str, tuple[int, ...]] = {}
    if cfg["swin"]:
        s["patch_embed.proj.weight"], s["patch_embed.proj.bias"] = (e, in_chans, 4, 4), (e,)
    else:
        s["patch_embed.proj.0.weight"], s["patch_embed.proj.0.bias"] = (e // 2, in_chans, 3, 3), (e // 2,)
        s["patch_embed.proj.1.weight"], s["patch_embed.proj.1.bias"] = (e, e // 2, 3, 3), (e,)
    s["patch_embed.norm.weight"] = s["patch_embed.norm.bias"] = (e,)
    level = "layers" if cfg["swin"] else "levels"
    for i in range(n):
        d = e * 2 ** i
        for j in range(cfg["depths"][i]):
            p = f"{level}.{i}.blocks.{j}."
            s.update(_official_block_shapes(p, d, cfg["heads"][i], int(d * cfg["mlp"]), k))
            if cfg["ls"] is not None:
                s[p + "gamma1"] = s[p + "gamma2"] = (d,)
        if i < n - 1:
            p = f"{level}.{i}.downsample."
            if cfg["swin"]:
                s[p + "norm.weight"] = s[p + "norm.bias"] = (4 * d,)
                s[p + "reduction.weight"] = (2 * d, 4 * d)
            else:
                s[p + "reduction.weight"] = (2 * d, d, 3, 3)
                s[p + "norm.weight"] = s[p + "norm.bias"] = (2 * d,)
    f = e * 2 ** (n - 1)
    s["norm.weight"] = s["norm.bias"] = (f,)
    s["head.weight"], s["head.bias"] = (num_classes, f), (num_classes,)
    return s


def _official_block_shapes(p: str, d: int, h: int, hid: int, k: int) -> dict[str, tuple[int, ...]]:
    s: dict[str, tuple[int, ...]] = {}
    s[p + "norm1.weight"] = s[p + "norm1.bias"] = (d,)
    s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"] = (3 * d, d), (3 * d,)
    s[p + "attn.rpb"] = (h, 2 * k - 1, 2 * k - 1)
    s[p + "attn.proj.weight"], s[p + "attn.proj.bias"] = (d, d), (d,)
    s[p + "norm2.weight"] = s[p + "norm2.bias"] = (d,)
    s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"] = (hid, d), (hid,)
    s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"] = (d, hid), (d,)
    return s


def _official_isotropic_shapes(cfg: dict, num_classes: int, in_chans: int) -> dict[str, tuple[int, ...]]:
    e = cfg["dim"]
    s: dict[str, tuple[int, ...]] = {"patch_embed.proj.weight": (e, in_chans, 16, 16), "patch_embed.proj.bias": (e,)}
    s["patch_embed.norm.weight"] = s["patch_embed.norm.bias"] = (e,)
    for i in range(cfg["depth"]):
        s.update(_official_block_shapes(f"layers.{i}.", e, cfg["heads"], int(e * cfg["mlp"]), cfg["k"]))
    s["norm.weight"] = s["norm.bias"] = (e,)
    s["head.weight"], s["head.bias"] = (num_classes, e), (num_classes,)
    return s


def model_kwargs(cfg: dict) -> dict:
    """timm.create_model kwargs that build ``cfg`` (for reduced configs)."""
    if cfg.get("iso"):
        return dict(depth=cfg["depth"], num_heads=cfg["heads"], embed_dim=cfg["dim"], mlp_ratio=cfg["mlp"],
                    kernel_size=cfg["k"], dilation=cfg["iso_dil"])
    kw = dict(depths=cfg["depths"], num_heads=cfg["heads"], embed_dim=cfg["dim"], mlp_ratio=cfg["mlp"],
              kernel_size=cfg["k"], layer_scale=cfg["ls"], dilations=cfg.get("dil"))
    return kw


def random_official_state_dict(cfg: dict, num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """An official-layout state dict with random values (norm weights near 1, layer scales ~0.5)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in official_shapes(cfg, num_classes).items():
        t = torch.randn(shape, generator=gen)
        if "norm" in key and key.endswith("weight"):
            t = 1 + 0.1 * t
        elif key.endswith(("gamma1", "gamma2")):
            t = 0.5 + 0.1 * t
        elif t.dim() >= 2:
            t = t / math.sqrt(math.prod(shape[1:]))  # fan-in scaled, keeps activations O(1)
        else:
            t = 0.1 * t
        sd[key] = t
    return sd


# ----------------------------------------------------------------------------------------------------------
# Independent float64 re-statement of the official forward.


def _ln(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[p + "weight"].double(), sd[p + "bias"].double(), eps=1e-5)


def _lin(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    b = sd.get(p + "bias")
    return F.linear(x, sd[p + "weight"].double(), None if b is None else b.double())


def _official_na(x: torch.Tensor, sd: dict, p: str, heads: int, k: int, dil: int) -> torch.Tensor:
    """NATTEN 0.14 NeighborhoodAttention2D: pad to the dilated window, qkv, NA with rpb, crop, proj."""
    B, H0, W0, C = x.shape
    window = k * dil
    if H0 < window or W0 < window:
        x = F.pad(x, (0, 0, 0, max(0, window - W0), 0, max(0, window - H0)))
    _, H, W, _ = x.shape
    q, kk, v = _lin(x, sd, p + "qkv.").reshape(B, H, W, 3, heads, C // heads).unbind(3)
    out, _ = na_reference(q, kk, v, k, dilation=dil, rpb=sd[p + "rpb"].double(), scale=(C // heads) ** -0.5)
    return _lin(out.reshape(B, H, W, C)[:, :H0, :W0], sd, p + "proj.")


def _official_block(x: torch.Tensor, sd: dict, p: str, heads: int, k: int, dil: int, ls: float | None) -> torch.Tensor:
    a = _official_na(_ln(x, sd, p + "norm1."), sd, p + "attn.", heads, k, dil)
    x = x + (a if ls is None else sd[p + "gamma1"].double() * a)
    m = _lin(F.gelu(_lin(_ln(x, sd, p + "norm2."), sd, p + "mlp.fc1.")), sd, p + "mlp.fc2.")
    return x + (m if ls is None else sd[p + "gamma2"].double() * m)


def official_forward(sd: dict, cfg: dict, img: torch.Tensor) -> torch.Tensor:
    """Logits of the official model holding state dict ``sd``, for images (B, 3, H, W), in float64."""
    x = img.double()
    if cfg.get("iso"):  # isotropic.py: 16x16 patches (padded), blocks with dilation 1 / iso_dil alternating
        x = F.pad(x, (0, (-x.shape[3]) % 16, 0, (-x.shape[2]) % 16))
        x = F.conv2d(x, sd["patch_embed.proj.weight"].double(), sd["patch_embed.proj.bias"].double(), stride=16)
        x = _ln(x.permute(0, 2, 3, 1), sd, "patch_embed.norm.")
        for i in range(cfg["depth"]):
            x = _official_block(x, sd, f"layers.{i}.", cfg["heads"], cfg["k"], 1 if i % 2 == 0 else cfg["iso_dil"],
                                None)
        return _lin(_ln(x, sd, "norm.").mean(dim=(1, 2)), sd, "head.")
    if cfg["swin"]:
        ph, pw = (-x.shape[2]) % 4, (-x.shape[3]) % 4
        x = F.conv2d(F.pad(x, (0, pw, 0, ph)), sd["patch_embed.proj.weight"].double(),
                     sd["patch_embed.proj.bias"].double(), stride=4)
    else:
        for c in ("0", "1"):
            x = F.conv2d(x, sd[f"patch_embed.proj.{c}.weight"].double(), sd[f"patch_embed.proj.{c}.bias"].double(),
                         stride=2, padding=1)
    x = _ln(x.permute(0, 2, 3, 1), sd, "patch_embed.norm.")
    level = "layers" if cfg["swin"] else "levels"
    n = len(cfg["depths"])
    for i in range(n):
        for j in range(cfg["depths"][i]):
            dil = cfg["dil"][i][j] if cfg.get("dil") else 1
            x = _official_block(x, sd, f"{level}.{i}.blocks.{j}.", cfg["heads"][i], cfg["k"], dil, cfg["ls"])
        if i < n - 1:
            p = f"{level}.{i}.downsample."
            if cfg["swin"]:
                B, H, W, C = x.shape
                x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
                x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
                x = _lin(_ln(x, sd, p + "norm."), sd, p + "reduction.")
            else:
                x = F.conv2d(x.permute(0, 3, 1, 2), sd[p + "reduction.weight"].double(), stride=2, padding=1)
                x = _ln(x.permute(0, 2, 3, 1), sd, p + "norm.")
    x = _ln(x, sd, "norm.").mean(dim=(1, 2))
    return _lin(x, sd, "head.")


# Reduced configs: few blocks and channels, but the official stems, downsamplers, kernel size 7, layer scale,
# and dilations whose windows exceed the small maps (so the zero-padding path runs).
SMALL_NAT = dict(depths=[1, 2, 1, 1], heads=[2, 2, 4, 4], dim=16, mlp=2, k=7, ls=0.5, swin=False,
                 dil=[[2], [1, 3], [1], [1]])
SMALL_DINAT_S = dict(depths=[1, 2, 1, 1], heads=[1, 2, 2, 4], dim=16, mlp=4, k=7, ls=None, swin=True,
                     dil=[[2], [1, 2], [1], [1]])
SMALL_ISO = dict(iso=True, depth=3, heads=2, dim=16, mlp=4, k=5, iso_dil=2)


def _create(name: str, cfg: dict, **kw) -> NAT:
    return timm.create_model(name, **model_kwargs(cfg), **kw)


# ----------------------------------------------------------------------------------------------------------


def test_registered_names() -> None:
    assert set(timm.list_models(module="nat")) == set(OFFICIAL)  # everything attnzoo/vision/nat.py registers
    assert set(OFFICIAL) <= set(attnzoo.vision.list_models())
    for name in OFFICIAL:
        assert timm.is_model(name)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_param_count_matches_official(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    assert isinstance(model, NATIsotropic if "isotropic" in name else NAT) and model.attnzoo_kernels == ("na2d",)
    ours = {k: tuple(v.shape) for k, v in checkpoint_filter_fn(
        {k: torch.empty(s, device="meta") for k, s in official_shapes(OFFICIAL[name]).items()}, model).items()}
    assert ours == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == PARAMS[name] == sum(math.prod(s) for s in official_shapes(OFFICIAL[name]).values())
    if README_MPARAMS[name] % 1:  # given to 0.01M
        assert round(n_params / 1e6, 2) == README_MPARAMS[name]
    else:  # whole millions; the README rounds DiNAT-L loosely (all three variants "200M")
        assert abs(n_params / 1e6 - README_MPARAMS[name]) <= max(0.5, 0.01 * README_MPARAMS[name])
    cfg = model.pretrained_cfg
    assert cfg["url"].startswith("https://shi-labs.com/projects/") and cfg["url"].endswith(".pth")


def test_pretrained_cfgs_and_tags() -> None:
    tags = timm.list_pretrained("*nat*")
    assert "dinat_large_384_11x11.in22k_ft_in1k" in tags and "dinat_s_large.in22k" in tags
    cfg = timm.get_pretrained_cfg("dinat_large_384.in22k_ft_in1k").to_dict()
    assert cfg["input_size"] == (3, 384, 384) and cfg["crop_pct"] == 1.0
    assert cfg["url"].endswith("imagenet1k/dinat_large_in22k_in1k_384.pth")
    assert timm.get_pretrained_cfg("dinat_large.in22k").num_classes == 21841
    with torch.device("meta"):
        m = timm.create_model("dinat_large_384_11x11")
    assert {b.attn.kernel_size for s in m.stages for b in s.blocks} == {11}
    assert [b.attn.dilation for b in m.stages[0].blocks] == [1, 8, 1]


@pytest.mark.parametrize("cfg, name, seed", [(SMALL_NAT, "nat_small", 0), (SMALL_DINAT_S, "dinat_s_tiny", 1),
                                             (SMALL_ISO, "dinat_isotropic_small", 7)])
def test_official_checkpoint_converts_and_matches_official_forward(cfg, name, seed) -> None:
    official = random_official_state_dict(cfg, num_classes=10, seed=seed)
    converted = checkpoint_filter_fn(official, None)
    model = _create(name, cfg, num_classes=10).double().eval()
    model.load_state_dict(converted, strict=True)
    # 72x60: stage maps 18x15 / 9x8 / 5x4 / 3x2 -- odd sizes, and maps smaller than the (dilated) window;
    # isotropic: 5x4 patches (60 is not a multiple of 16: padded), all windows padded.
    img = torch.randn(2, 3, 72, 60, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        out = model(img)
    assert_close(out, official_forward(official, cfg, img), dtype=torch.float64, scale=1e3,
                 msg="(float64 model vs float64 re-statement; 1e3: ~40 chained layers, roundoff ~1e-13)")


def test_filter_fn_unwraps_and_passes_through() -> None:
    official = random_official_state_dict(SMALL_NAT, num_classes=10, seed=2)
    direct = checkpoint_filter_fn(official, None)
    wrapped = checkpoint_filter_fn({"state_dict": {"module." + k: v for k, v in official.items()}}, None)
    assert direct.keys() == wrapped.keys()
    assert "stages.1.downsample.reduction.weight" in direct and "stages.0.blocks.0.ls1.gamma" in direct
    assert "head.fc.weight" in direct and not any(k.startswith("levels.") for k in direct)
    again = checkpoint_filter_fn(direct, None)  # already converted: unchanged
    assert again.keys() == direct.keys() and all(again[k] is direct[k] for k in direct)


def test_rpb_resized_to_model_kernel() -> None:
    cfg7 = dict(SMALL_NAT, k=7)
    official = random_official_state_dict(cfg7, num_classes=10, seed=3)
    official["levels.0.blocks.0.attn.rpb"] = torch.full((2, 13, 13), 0.25)
    model = _create("nat_small", dict(SMALL_NAT, k=11), num_classes=10)
    converted = checkpoint_filter_fn(official, model)
    model.load_state_dict(converted, strict=True)
    assert converted["stages.1.blocks.0.attn.rpb"].shape == (2, 21, 21)
    assert_close(converted["stages.0.blocks.0.attn.rpb"], torch.full((2, 21, 21), 0.25))


def test_timm_pretrained_from_local_official_file(tmp_path) -> None:
    official = random_official_state_dict(SMALL_NAT, num_classes=1000, seed=4)
    path = tmp_path / "nat_small.pth"
    torch.save(official, path)
    model = _create("nat_small", SMALL_NAT, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    expected = checkpoint_filter_fn(official, None)
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    # A different head size keeps the backbone and re-initialises the classifier (timm's rule).
    model10 = _create("nat_small", SMALL_NAT, pretrained=True, num_classes=10,
                      pretrained_cfg_overlay=dict(file=str(path)))
    assert model10.get_classifier().out_features == 10
    assert torch.equal(model10.stages[2].blocks[0].attn.rpb, official["levels.2.blocks.0.attn.rpb"])


@pytest.mark.parametrize("name", ["dinat_tiny", "dinat_s_tiny"])
@pytest.mark.parametrize("size", [(224, 224), (97, 130)])
def test_forward_shapes(name: str, size: tuple[int, int]) -> None:
    cfg = dict(SMALL_DINAT_S if "_s_" in name else SMALL_NAT, dil=[[8], [1, 4], [2], [1]])
    model = _create(name, cfg, num_classes=7).eval()
    img = torch.randn(1, 3, *size)
    grid = [math.ceil(size[0] / 4), math.ceil(size[1] / 4)]
    expected_maps = []
    for i in range(4):
        expected_maps.append((1, cfg["dim"] * 2 ** i, *grid))
        grid = [math.ceil(g / 2) for g in grid]
    with torch.no_grad():
        logits = model(img)
        final, inter = model.forward_intermediates(img)
        only = model.forward_intermediates(img, indices=[1], intermediates_only=True, stop_early=True)
    assert logits.shape == (1, 7) and torch.isfinite(logits).all()
    assert final.shape == (1, *expected_maps[-1][2:], cfg["dim"] * 8)  # forward_features: normed, NHWC
    assert [tuple(t.shape) for t in inter] == expected_maps
    assert_close(inter[-1].permute(0, 2, 3, 1), model.stages[-1](model.stages[:-1](model.patch_embed(img))))
    assert len(only) == 1 and tuple(only[0].shape) == expected_maps[1]
    assert_close(model.forward_head(final), logits)
    assert model.forward_head(final, pre_logits=True).shape == (1, cfg["dim"] * 8)


@pytest.mark.parametrize("name, cfg", [("nat_mini", SMALL_NAT), ("dinat_s_tiny", SMALL_DINAT_S)])
def test_features_only(name: str, cfg: dict) -> None:
    model = _create(name, cfg, features_only=True, out_indices=(1, 3)).eval()
    assert model.feature_info.channels() == [cfg["dim"] * 2, cfg["dim"] * 8]
    assert model.feature_info.reduction() == [8, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 96, 128))
    assert [tuple(f.shape) for f in feats] == [(1, cfg["dim"] * 2, 12, 16), (1, cfg["dim"] * 8, 3, 4)]
    full = _create(name, cfg).eval()
    full.load_state_dict(model.model.state_dict(), strict=False)
    with torch.no_grad():
        ref = full.forward_intermediates(torch.zeros(1, 3, 96, 128), indices=(1, 3), intermediates_only=True)
        got = model(torch.zeros(1, 3, 96, 128))
    for a, b in zip(got, ref, strict=True):
        assert_close(a, b)


def test_classifier_reset_checkpointing_and_weight_decay() -> None:
    torch.manual_seed(0)
    model = _create("nat_small", SMALL_NAT, num_classes=5, drop_path_rate=0.0)  # deterministic in train()
    img = torch.randn(2, 3, 40, 40)
    model.train()
    model(img).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in model.stages)
    model(img).square().sum().backward()
    for n, p in model.named_parameters():
        assert_close(p.grad, grads[n], msg=n)
    assert grads["stages.3.blocks.0.attn.rpb"].abs().sum() > 0
    assert model.no_weight_decay() == {n for n in grads if n.endswith("attn.rpb")}
    model.reset_classifier(3)
    assert model(img).shape == (2, 3)
    model.reset_classifier(0)
    assert model(img).shape == (2, SMALL_NAT["dim"] * 8)


def test_invalid_configs_raise() -> None:
    with pytest.raises(ValueError, match="dilations for a stage of depth"):
        timm.create_model("dinat_tiny", depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="attention dropout"):
        timm.create_model("nat_mini", attn_drop_rate=0.1)
    with pytest.raises(ValueError, match="odd"):
        timm.create_model("nat_mini", kernel_size=6)


def _tiny_backend_model() -> NAT:
    """A reduced DiNAT (kernel 3, dilation 2 in stage 0, padded small maps after) for interpreter-speed tests."""
    torch.manual_seed(0)
    return timm.create_model("dinat_tiny", depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), embed_dim=16,
                             dilations=((2,), (1,), (1,), (1,)), kernel_size=3, num_classes=4, drop_path_rate=0.0,
                             layer_scale=0.5)


def _run(model: NAT, img: torch.Tensor, backend: str, backward: bool):
    model.zero_grad()
    with use_backend(backend):
        if not backward:
            with torch.no_grad():
                return model(img), {}
        out = model(img)
        out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_backends_agree_in_model_triton() -> None:
    """Fused Triton na2d (interpreter) vs the torch backend inside the model, forward and backward."""
    model, img = _tiny_backend_model(), torch.randn(1, 3, 24, 20, generator=torch.Generator().manual_seed(5))
    ref_out, ref_grads = _run(model, img, "torch", backward=True)
    out, grads = _run(model, img, "triton", backward=True)
    assert_close(out, ref_out)
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], msg=name)
    assert ref_grads["stages.0.blocks.0.attn.rpb"].abs().sum() > 0


def test_backends_agree_in_model_flex() -> None:
    """FlexAttention na2d vs the torch backend inside the model (forward; flex has no CPU backward)."""
    model, img = _tiny_backend_model().eval(), torch.randn(1, 3, 24, 20, generator=torch.Generator().manual_seed(6))
    ref_out, _ = _run(model, img, "torch", backward=False)
    out, _ = _run(model, img, "flex", backward=False)
    assert_close(out, ref_out)


def test_isotropic_shapes_and_features() -> None:
    model = _create("dinat_isotropic_small", SMALL_ISO, num_classes=3).eval()
    img = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        logits = model(img)
        final, inter = model.forward_intermediates(img, indices=2)
    assert logits.shape == (1, 3) and final.shape == (1, 14, 14, SMALL_ISO["dim"])
    assert [tuple(t.shape) for t in inter] == [(1, SMALL_ISO["dim"], 14, 14)] * 2
    assert_close(model.forward_head(final), logits)
    features = _create("dinat_isotropic_small", SMALL_ISO, features_only=True, out_indices=(0, 2)).eval()
    assert features.feature_info.reduction() == [16, 16] and len(features.model.blocks) == 3
    with torch.no_grad():
        maps = features(torch.randn(1, 3, 96, 130))  # 130 is padded to 144: 6x9 patches
    assert [tuple(t.shape) for t in maps] == [(1, SMALL_ISO["dim"], 6, 9)] * 2
