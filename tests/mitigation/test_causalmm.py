"""CausalMM against the official code's semantics, re-stated here: counterfactual maps (cf_encoder.py and the
README's LLM counterfactual attention) and the contrast of causalmm_sm / causalmm_mm, each step recomputed with
separate full forwards of an independent reference model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from contrastive_testing import NEW_TOKENS, assert_same_contrast, batch, live_steps, models, reference_logits
from helpers import assert_close

from attnzoo import mitigation
from attnzoo.mitigation.causalmm import language_counterfactual, vision_counterfactual
from attnzoo.mitigation.contrastive import contrastive_generate

# ------------------------------------------------------------------------------ counterfactual patterns


def test_vision_counterfactual_patterns(rng):
    maps = torch.softmax(torch.randn(3, 4, 5, 5, generator=rng), -1)
    uniform = vision_counterfactual(maps, "uniform")
    assert_close(uniform, maps.mean(dim=(2, 3), keepdim=True).expand_as(maps))
    reversed_ = vision_counterfactual(maps, "reversed")
    for n in range(3):
        for h in range(4):
            assert_close(reversed_[n, h], maps[n, h].max() - maps[n, h])
    noise = vision_counterfactual(maps, "random", torch.Generator().manual_seed(0))
    assert noise.shape == maps.shape and noise.min() >= 0 and noise.max() < 2 and noise.max() > 1
    shuffled = vision_counterfactual(maps, "shuffle", torch.Generator().manual_seed(0))
    for h in range(4):
        # one permutation per head, shared by every row: find it from row 0 and check it on the others
        flat, out = maps[:, h].flatten(1), shuffled[:, h].flatten(1)
        assert torch.equal(out.sort(-1).values, flat.sort(-1).values)
        perm = torch.tensor([int((flat[0] == v).nonzero()[0]) for v in out[0]])
        assert torch.equal(out, flat[:, perm])
        assert not torch.equal(perm, torch.arange(25))
    with pytest.raises(ValueError, match="vision_kind 'flip'"):
        vision_counterfactual(maps, "flip")


def _official_language(attention, kind, noise=None):
    """The README's functions for one unpadded sample at prefill (triu mask over a square map), written out."""
    seq = attention.shape[-1]
    mask = torch.triu(torch.ones(seq, seq), diagonal=1)[None, None]
    if kind == "reverse":
        return (attention.max(dim=-1, keepdim=True)[0] - attention) * (1 - mask)
    if kind == "reverse_normalize":
        r = _official_language(attention, "reverse")
        return r / r.sum(dim=-1, keepdim=True) * (1 - mask)
    if kind == "random":
        return noise / noise.sum(dim=-1, keepdim=True) * (1 - mask)
    return torch.ones_like(attention) / attention.size(-1) * (1 - mask)


@pytest.mark.parametrize("kind", ["reverse", "reverse_normalize", "random", "uniform"])
def test_language_counterfactual_matches_readme(kind, rng):
    q = 6
    causal = torch.ones(q, q).tril().bool()[None, None]
    scores = torch.randn(1, 2, q, q, generator=rng).masked_fill(~causal, -math.inf)
    weights = torch.softmax(scores, -1)
    real = torch.ones(1, q, dtype=torch.bool)
    ours = language_counterfactual(weights, causal, real, kind, torch.Generator().manual_seed(3))
    noise = torch.rand(weights.shape, generator=torch.Generator().manual_seed(3))
    official = _official_language(weights, kind, noise)
    if kind == "reverse_normalize":
        # the first query has one key, reversed to 0: the official code divides 0 by 0 (NaN), ours keeps 0
        assert official[..., 0, :].isnan().all() and (ours[..., 0, :] == 0).all()
        ours, official = ours[..., 1:, :], official[..., 1:, :]
        assert_close(ours.sum(-1), torch.ones(1, 2, q - 1))
    assert_close(ours, official)
    assert (ours[~causal[..., q - ours.shape[2]:, :].expand_as(ours)] == 0).all()


def test_language_counterfactual_ignores_padding(rng):
    """A left-padded sample gets the counterfactual of the same sample unpadded (normalisers count real keys)."""
    q, pad = 5, 2
    causal = torch.ones(q, q).tril().bool()[None, None]
    weights = torch.softmax(torch.randn(1, 1, q, q, generator=rng).masked_fill(~causal, -math.inf), -1)
    padded = torch.zeros(1, 1, q + pad, q + pad)
    padded[..., pad:, pad:] = weights
    keep = torch.zeros(1, 1, q + pad, q + pad, dtype=torch.bool)
    keep[..., pad:, pad:] = causal
    real = torch.tensor([[False] * pad + [True] * q])
    for kind in ("uniform", "reverse_normalize"):
        full = language_counterfactual(padded, keep, real, kind)
        alone = language_counterfactual(weights, causal, torch.ones(1, q, dtype=torch.bool), kind)
        assert_close(full[..., pad:, pad:], alone)


# ------------------------------------------------------------------------------ hyper-parameters


@pytest.mark.parametrize(("kwargs", "text"), [
    (dict(gamma=-1.0), r"gamma = -1.0 is outside the valid range \[0.0, inf\)"),
    (dict(epsilon=0.0), r"epsilon = 0.0 is outside the valid range \(0.0, 1.0\]"),
    (dict(epsilon=1.2), r"epsilon = 1.2 is outside the valid range \(0.0, 1.0\]"),
    (dict(counterfactual="audio"), "counterfactual = 'audio' is not one of"),
    (dict(vision_kind="flip"), "vision_kind = 'flip' is not one of"),
    (dict(language_kind="flip"), "language_kind = 'flip' is not one of"),
])
def test_causalmm_bad_hyper_parameters(kwargs, text):
    with pytest.raises(ValueError, match=text):
        mitigation.CausalMM(**kwargs)


def test_causalmm_official_defaults():
    p = mitigation.get("causalmm")
    assert (p.gamma, p.epsilon, p.counterfactual, p.vision_kind, p.do_sample) == (1.0, 0.6, "vision", "shuffle", True)


# ------------------------------------------------------------------------------ contrast vs re-computation


def _reference_attention_map(ref, pixel_values, layer):
    """Post-softmax attention of CLIP layer ``layer`` (N, H, S, S), computed by hand from its input."""
    tower = ref.model.vision_tower
    hidden = tower(pixel_values, output_hidden_states=True).hidden_states
    block = getattr(tower, "vision_model", tower).encoder.layers[layer]
    x = block.layer_norm1(hidden[layer])
    attn = block.self_attn
    N, S, _ = x.shape
    H, D = attn.num_heads, attn.head_dim

    def heads(t):
        return t.view(N, S, H, D).transpose(1, 2)

    q, k = heads(attn.q_proj(x)), heads(attn.k_proj(x))
    return torch.softmax((q @ k.transpose(-1, -2)) * D ** -0.5, dim=-1), hidden[layer + 1][:, 1:]


def _counterfactual_embeds(inputs, kind):
    """The official vision counterfactual: features x head-mean of the bilinearly resized edited map, projected."""
    lvlm, ref = models()
    maps, features = _reference_attention_map(ref, inputs["pixel_values"], lvlm.vision_feature_layer)
    edited = {"uniform": maps.mean(dim=(2, 3), keepdim=True).expand_as(maps),
              "reversed": maps.amax(dim=(2, 3), keepdim=True) - maps}[kind]
    side = math.isqrt(features.shape[1])
    weight = F.interpolate(edited, size=(side, side), mode="bilinear", align_corners=False).mean(1)
    image = ref.model.multi_modal_projector(features * weight.reshape(features.shape[0], -1, 1))

    def embeds(ids):
        e = ref.get_input_embeddings()(ids).clone()
        e[ids == ref.config.image_token_id] = image.reshape(-1, image.shape[-1])
        return e

    return embeds


def _reverse(probs, keep):
    return (probs.max(dim=-1, keepdim=True)[0] - probs) * keep


@pytest.mark.parametrize(("counterfactual", "vision_kind"), [("vision", "uniform"), ("vision", "reversed"),
                                                              ("language", "uniform"), ("both", "reversed")])
def test_causalmm_each_step_equals_recomputation(counterfactual, vision_kind):
    """Each step: (1+g) l - g l_cf (or (1+2g) l - g l_v - g l_l) with the cut-off, from separate full forwards."""
    lvlm, _ = models()
    gamma, eps = 0.8, 0.2
    cmm = mitigation.CausalMM(gamma=gamma, epsilon=eps, counterfactual=counterfactual, vision_kind=vision_kind,
                              language_kind="reverse", do_sample=False)
    b = batch()
    with cmm.apply(lvlm):
        tokens, steps = contrastive_generate(lvlm, b, cmm, max_new_tokens=NEW_TOKENS, return_logits=True)
    n = live_steps(tokens, lvlm.tokenizer.eos_token_id)
    assert n >= 2
    embeds = _counterfactual_embeds(b.inputs, vision_kind) if counterfactual != "language" else None
    with torch.no_grad():
        for t in range(n):
            factual = reference_logits(b.inputs, tokens[:, :t])
            cfs = []
            if counterfactual in ("vision", "both"):
                cfs.append(reference_logits(b.inputs, tokens[:, :t], embeds=embeds))
            if counterfactual in ("language", "both"):
                cfs.append(reference_logits(b.inputs, tokens[:, :t], edit=_reverse))
            contrast = (1 + len(cfs) * gamma) * factual - gamma * sum(cfs)
            p = torch.softmax(factual, -1)
            expected = contrast.masked_fill(p < eps * p.max(-1, keepdim=True).values, -math.inf)
            assert_same_contrast(steps[t], expected)
            assert torch.equal(tokens[:, t], expected.argmax(-1))


def test_causalmm_refuses_what_it_cannot_do():
    from attnzoo.mllm import AttentionPass, build_tiny_qwen2_vl, wrap

    class Fused(AttentionPass):
        def attend(self, ctx, q, k, v, mask):
            raise AssertionError("not called")

    lvlm, _ = models()
    with lvlm.attach(Fused()):
        with pytest.raises(ValueError, match="compute attention themselves"):
            mitigation.CausalMM(counterfactual="language").apply(lvlm)
        mitigation.CausalMM(counterfactual="vision").apply(lvlm).remove()  # the vision counterfactual is fine
    qwen = wrap(*build_tiny_qwen2_vl(seed=0))
    with pytest.raises(ValueError, match="qwen2_vl has none"):
        mitigation.CausalMM().apply(qwen)
    assert not qwen.passes


# ------------------------------------------------------------------------------ fused == explicit


_FLOAT64: dict = {}


def _lvlm64():
    """A float64 copy of the tiny LLaVA (the fused and explicit paths agree to float64 rounding there)."""
    if not _FLOAT64:
        from mitigation_testing import TINY

        from attnzoo.mllm import build_tiny_llava, wrap

        model, processor = build_tiny_llava(**TINY)
        _FLOAT64["lvlm"] = wrap(model.double(), processor)
    return _FLOAT64["lvlm"]


def _language_rows_logits(lvlm, b, cmm):
    """Logits ``(B, L, V)`` of every position of the language branch in one 2B-row prefill forward (left-padded
    rows, causal prefill rows), with ``cmm`` attached."""
    from attnzoo.mitigation.contrastive import BranchRows

    run = lvlm.prepare(list(b.images) * 2, list(b.layout.prompts) * 2)
    B = len(b.layout.prompts)
    with cmm.apply(lvlm), torch.no_grad():
        cmm.start(lvlm)
        cmm.begin(BranchRows.build(range(2), B, lvlm.device))
        try:
            with lvlm.use_layout(run.layout):
                out = lvlm.model(**run.inputs)
        finally:
            cmm.begin(None)
    mask = run.inputs["attention_mask"][B:].bool()
    return out.logits[B:], out.logits[:B], mask


@pytest.mark.parametrize("kind", ["reverse", "reverse_normalize", "random", "uniform"])
def test_fused_language_counterfactual_equals_explicit_float64(kind):
    """Closed form (fused=True) == explicit edited weights (fused=False): every prefill position, then each decode
    step's contrast, on a left-padded batch of the float64 model. The explicit path takes its softmax in float32
    (the runtime's explicit scores are float32, as the models' eager code), so the two agree to float32 rounding;
    the closed form itself is float64-exact (tests/kernels/test_counterfactual_attention.py)."""
    lvlm = _lvlm64()
    b = lvlm.prepare(batch().images, list(batch().layout.prompts))
    assert not b.inputs["attention_mask"].bool().all()  # the batch is left-padded
    results = {}
    for fused in (True, False):
        cmm = mitigation.CausalMM(counterfactual="language", language_kind=kind, do_sample=False, seed=5,
                                  epsilon=1e-9, fused=fused)
        cf, factual, mask = _language_rows_logits(lvlm, b, cmm)
        with cmm.apply(lvlm):
            tokens, steps = contrastive_generate(lvlm, b, cmm, max_new_tokens=NEW_TOKENS, return_logits=True)
        results[fused] = cf, factual, mask, tokens, steps
    (cf, factual, mask, tokens, steps), (cf_x, factual_x, _, tokens_x, steps_x) = results[True], results[False]
    assert cf.dtype == torch.float64
    assert_close(cf[mask], cf_x[mask], dtype=torch.float32)  # every real position
    assert_close(factual[mask], factual_x[mask], dtype=torch.float32)  # the other rows: plain attention
    assert not torch.allclose(cf[mask], factual[mask])  # the counterfactual changed something
    assert torch.equal(tokens, tokens_x)
    for a, e in zip(steps, steps_x):
        assert torch.equal(torch.isfinite(a), torch.isfinite(e))
        assert_close(a[torch.isfinite(a)], e[torch.isfinite(e)], dtype=torch.float32)


@pytest.mark.parametrize(("kind", "backend"), [("reverse_normalize", "torch"), ("uniform", "torch"),
                                               ("reverse", "triton")])
def test_fused_language_counterfactual_equals_explicit_float32(kind, backend):
    """The same on the float32 tiny LLaVA, both counterfactuals (three branches), float32 tolerances; with the Triton
    kernel (interpreter) too, whose decode calls go straight to the launch (checked at prefill only)."""
    from attnzoo.kernels import use_backend

    lvlm, _ = models()
    b = batch()
    steps = {}
    for fused in (True, False):
        cmm = mitigation.CausalMM(counterfactual="both", vision_kind="reversed", language_kind=kind,
                                  do_sample=False, epsilon=1e-9, fused=fused)
        with cmm.apply(lvlm), use_backend(backend):
            tokens, steps[fused] = contrastive_generate(lvlm, b, cmm, max_new_tokens=NEW_TOKENS, return_logits=True)
    for a, e in zip(steps[True], steps[False]):
        kept = torch.isfinite(e)
        assert torch.equal(torch.isfinite(a), kept)
        assert_close(a[kept], e[kept])


def test_explicit_path_when_another_pass_edits_weights():
    """A pass that edits weights composes with the counterfactual: CausalMM takes the explicit path then."""
    from attnzoo.mllm import AttentionPass

    class Sharpen(AttentionPass):
        def edit_weights(self, ctx, weights):
            return weights

    lvlm, _ = models()
    cmm = mitigation.CausalMM(counterfactual="language")
    with cmm.apply(lvlm):
        assert not cmm._explicit
    with lvlm.attach(Sharpen()), cmm.apply(lvlm):
        assert cmm._explicit


def test_fused_language_counterfactual_equals_explicit_on_qwen2_vl():
    """The language counterfactual needs no CLIP tower: on Qwen2-VL (M-RoPE) fused and explicit agree too."""
    from mitigation_testing import PROMPTS, images

    from attnzoo.mllm import build_tiny_qwen2_vl, wrap

    lvlm = wrap(*build_tiny_qwen2_vl(seed=0))
    b = lvlm.prepare(images(), PROMPTS)
    steps = {}
    for fused in (True, False):
        cmm = mitigation.CausalMM(counterfactual="language", language_kind="reverse_normalize", do_sample=False,
                                  epsilon=1e-9, fused=fused)
        with cmm.apply(lvlm):
            steps[fused] = contrastive_generate(lvlm, b, cmm, max_new_tokens=NEW_TOKENS, return_logits=True)
    assert torch.equal(steps[True][0], steps[False][0])
    for a, e in zip(steps[True][1], steps[False][1]):
        kept = torch.isfinite(e)
        assert torch.equal(torch.isfinite(a), kept)
        assert_close(a[kept], e[kept])
