"""The shared contrastive loop: batched (one k*B-row forward) == sequential (separate forwards), greedy and sampled;
the cut-off; routing of LVLM.generate; clean detach; composition with attention passes and its refusals."""

from __future__ import annotations

import pytest
import torch
from contrastive_testing import NEW_TOKENS, batch, models
from mitigation_testing import PROMPTS, images

from attnzoo import mitigation
from attnzoo.mitigation.contrastive import contrastive_generate, plausibility_cutoff

LEADING = ["There is a dog in the image, isn't there?", "There isn't a person on the street, is there?"]


def test_plausibility_cutoff_keeps_tokens_above_eps_max_probability(rng):
    logits = torch.randn(4, 50, generator=rng) * 3
    contrasted = torch.randn(4, 50, generator=rng)
    for eps in (0.05, 0.3, 1.0):
        out = plausibility_cutoff(logits, contrasted, eps)
        p = torch.softmax(logits.double(), -1)
        keep = p >= eps * p.max(-1, keepdim=True).values
        assert torch.equal(torch.isfinite(out), keep)
        assert torch.equal(out[keep], contrasted[keep])
    blocked = logits.clone()
    blocked[:, 0] = float("-inf")  # e.g. EOS under min_new_tokens: stays excluded
    assert torch.isinf(plausibility_cutoff(blocked, contrasted, 1e-30)[:, 0]).all()


def _passes():
    return [
        mitigation.LQCD(alpha=1.0, beta=0.1),
        mitigation.CausalMM(counterfactual="vision", vision_kind="shuffle", do_sample=False, seed=1),
        mitigation.CausalMM(counterfactual="both", vision_kind="random", language_kind="random", do_sample=False,
                            seed=2, gamma=0.5, epsilon=0.1),
    ]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_batched_equals_sequential_greedy(index):
    lvlm, _ = models()
    p = _passes()[index]
    b = batch(LEADING if isinstance(p, mitigation.LQCD) else PROMPTS)
    with p.apply(lvlm):
        batched, steps_b = contrastive_generate(lvlm, b, p, max_new_tokens=4, return_logits=True)
        sequential, steps_s = contrastive_generate(lvlm, b, p, batched=False, max_new_tokens=4, return_logits=True)
    assert torch.equal(batched, sequential)
    for a, s in zip(steps_b, steps_s):
        kept = torch.isfinite(s)
        assert torch.equal(torch.isfinite(a), kept)
        torch.testing.assert_close(a[kept], s[kept], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("index", [0, 1])
def test_batched_equals_sequential_sampling(index):
    lvlm, _ = models()
    p = _passes()[index]
    b = batch(LEADING if index == 0 else PROMPTS)
    kw = dict(max_new_tokens=5, do_sample=True, temperature=1.5, top_k=40)
    with p.apply(lvlm):
        p.do_sample = None  # follow generate(do_sample=True)
        runs = [contrastive_generate(lvlm, b, p, batched=batched, generator=torch.Generator().manual_seed(7), **kw)
                for batched in (True, False, True)]
        other = contrastive_generate(lvlm, b, p, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    assert not torch.equal(runs[0], other)  # the generator really drives the sampling


def test_apply_remove_leaves_model_bit_identical():
    lvlm, _ = models()
    b = batch()
    state = {k: v.clone() for k, v in lvlm.model.state_dict().items()}
    with torch.no_grad():
        before = lvlm.forward(b).logits
    plain = lvlm.generate_ids(b, max_new_tokens=NEW_TOKENS)
    for p in _passes():
        with p.apply(lvlm):
            assert lvlm.passes == (p,)
            lvlm.generate_ids(b, max_new_tokens=NEW_TOKENS)
        assert lvlm.passes == ()
    assert not lvlm.model.model.multi_modal_projector._forward_pre_hooks
    with torch.no_grad():
        after = lvlm.forward(b).logits
    assert torch.equal(before, after)
    assert torch.equal(plain, lvlm.generate_ids(b, max_new_tokens=NEW_TOKENS))
    assert all(torch.equal(v, lvlm.model.state_dict()[k]) for k, v in state.items())


def test_generate_strings_route_through_the_pass():
    lvlm, _ = models()
    p = mitigation.LQCD()
    b = lvlm.prepare(images(), LEADING)
    with p.apply(lvlm):
        expected = lvlm.decode(contrastive_generate(lvlm, b, p, max_new_tokens=NEW_TOKENS))
        assert lvlm.generate(images(), LEADING, max_new_tokens=NEW_TOKENS) == expected


def test_composes_with_an_attention_pass():
    """VAR + LQCD: VAR acts on the one 2B-row forward (sinks found per row of both branches)."""
    lvlm, _ = models()
    b = batch(LEADING)
    dims = mitigation.find_sink_dims(lvlm, images(), first_layer=1)
    var = mitigation.VAR(tau=1.0, sink_dims=dims, first_layer=1, summ=0.0, rho=1.0)
    lqcd = mitigation.LQCD()
    with lqcd.apply(lvlm):
        alone = lvlm.generate_ids(b, max_new_tokens=NEW_TOKENS)
        with var.apply(lvlm):
            both = lvlm.generate_ids(b, max_new_tokens=NEW_TOKENS)
            sinks = var.sinks()
    assert sinks and all(s.shape[0] == 2 * len(LEADING) for s in sinks.values())
    assert any(bool(s.any()) for s in sinks.values())
    assert both.shape == alone.shape


def test_refused_combinations_and_options():
    lvlm, _ = models()
    b = batch()
    with mitigation.LQCD().apply(lvlm):
        with pytest.raises(ValueError, match="both replace the decoding loop"):
            mitigation.CausalMM().apply(lvlm)
        with pytest.raises(ValueError, match="num_beams=2"):
            lvlm.generate_ids(b, num_beams=2)
    b_free = type(b)(inputs=b.inputs, layout=b.layout)
    with pytest.raises(ValueError, match="records no images"):
        contrastive_generate(lvlm, b_free, mitigation.LQCD())


def test_branch_batch_tiles_what_prepare_builds():
    """CausalMM's branches share the batch's prompts: the tiled batch equals re-preparing k * B samples."""
    from attnzoo.mitigation.contrastive import branch_batch

    lvlm, _ = models()
    b = batch()
    k = 3
    tiled = branch_batch(lvlm, b, [list(PROMPTS)] * k)
    prepared = lvlm.prepare(images() * k, list(PROMPTS) * k)
    assert set(tiled.inputs.keys()) == set(prepared.inputs.keys())
    for key in prepared.inputs.keys():
        assert torch.equal(tiled.inputs[key], prepared.inputs[key]), key
    for field in ("input_ids", "attention_mask", "image_mask", "newline_mask", "instruction_mask", "vision_rows"):
        assert torch.equal(getattr(tiled.layout, field), getattr(prepared.layout, field)), field
    assert (tiled.layout.images, tiled.layout.prompts, tiled.layout.has_image) == \
        (prepared.layout.images, prepared.layout.prompts, prepared.layout.has_image)
    # branches with their own prompts (LQCD) are prepared from scratch
    other = branch_batch(lvlm, b, [list(PROMPTS), LEADING])
    assert other.layout.prompts == (*PROMPTS, *LEADING)
