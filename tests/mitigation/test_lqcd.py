"""LQCD against the paper's formula written out on two separate full forwards of an independent reference model."""

from __future__ import annotations

import math

import pytest
import torch
from contrastive_testing import NEW_TOKENS, assert_same_contrast, batch, live_steps, models, reference_logits

from attnzoo import mitigation
from attnzoo.mitigation.contrastive import contrastive_generate

LEADING = ["There is a dog in the image, isn't there?",
           "Please describe this image in detail. Isn't there a person on the street?"]
NEUTRAL = ["Is there a dog in the image?", "Please describe this image in detail. Isn't there a person on the street?"]


@pytest.mark.parametrize(("leading", "neutral"), [
    ("There is a dog in the image, isn't there?", "Is there a dog in the image?"),
    ("there are two cats on the sofa, aren't there?", "Are there two cats on the sofa?"),
    ("There isn't an apple in the image, is there?", "Is there an apple in the image?"),
    ("Isn't there a car in the picture?", "Is there a car in the picture?"),
    ("Don't you think that there is a bus in the image?", "Is there a bus in the image?"),
    ("I think there is a kite in the image.", "Is there a kite in the image?"),
    ("Is there a cup in the image? It seems like there isn't.", "Is there a cup in the image?"),
    ("Is there a cup in the image? I'm sure there is one.", "Is there a cup in the image?"),
    ("There is a dog in the image, isn't there?\nAnswer the question using a single word or phrase.",
     "Is there a dog in the image?\nAnswer the question using a single word or phrase."),
    ("Is there a dog in the image?", "Is there a dog in the image?"),
    ("Describe the image. It is sunny.", "Describe the image. It is sunny."),
])
def test_neutralize_query_rules(leading, neutral):
    assert mitigation.neutralize_query(leading) == neutral


@pytest.mark.parametrize(("field", "value", "text"), [
    ("alpha", -0.5, "alpha = -0.5 is outside the valid range [0.0, inf)"),
    ("beta", 0.0, "beta = 0.0 is outside the valid range (0.0, 1.0]"),
    ("beta", 1.5, "beta = 1.5 is outside the valid range (0.0, 1.0]"),
])
def test_lqcd_bad_hyper_parameters(field, value, text):
    with pytest.raises(ValueError, match=text.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        mitigation.LQCD(**{field: value})
    with pytest.raises(ValueError, match="neutralizer"):
        mitigation.LQCD(neutralizer="not callable")


def test_lqcd_defaults_and_registry():
    p = mitigation.get("lqcd")
    assert isinstance(p, mitigation.LQCD) and (p.alpha, p.beta, p.do_sample) == (1.0, 0.1, None)
    assert p.config() == {"alpha": 1.0, "beta": 0.1, "neutralizer": "neutralize_query", "do_sample": None}
    assert "lqcd" in mitigation.available() and "causalmm" in mitigation.available()


def test_lqcd_each_step_equals_recomputation():
    """Every step: softmax[(1+a) l(neutral) - a l(leading)] with the cut-off, from two separate no-cache forwards."""
    lvlm, _ = models()
    alpha, beta = 0.7, 0.05
    lqcd = mitigation.LQCD(alpha=alpha, beta=beta)
    leading = batch(LEADING)
    neutral = batch([mitigation.neutralize_query(p) for p in LEADING])
    assert [*neutral.layout.prompts] == NEUTRAL
    with lqcd.apply(lvlm):
        tokens, steps = contrastive_generate(lvlm, leading, lqcd, max_new_tokens=NEW_TOKENS, return_logits=True)
        assert torch.equal(lvlm.generate_ids(leading, max_new_tokens=NEW_TOKENS), tokens)  # generate routes here
    n = live_steps(tokens, lvlm.tokenizer.eos_token_id)
    assert n >= 2
    for t in range(n):
        l_neutral = reference_logits(neutral.inputs, tokens[:, :t])
        l_leading = reference_logits(leading.inputs, tokens[:, :t])
        contrast = (1 + alpha) * l_neutral - alpha * l_leading
        p_neutral = torch.softmax(l_neutral, -1)
        plausible = p_neutral >= beta * p_neutral.max(-1, keepdim=True).values
        expected = contrast.masked_fill(~plausible, -math.inf)
        assert_same_contrast(steps[t], expected)
        assert torch.equal(tokens[:, t], expected.argmax(-1))


def test_lqcd_neutral_prompts_per_call_and_identity():
    """neutral_prompts overrides the neutraliser; contrasting a prompt with itself is plain greedy decoding."""
    lvlm, _ = models()
    b = batch(NEUTRAL)
    plain = lvlm.generate_ids(b, max_new_tokens=NEW_TOKENS)
    with mitigation.LQCD(neutralizer=lambda p: "Describe the image.").apply(lvlm):
        same = lvlm.generate_ids(b, max_new_tokens=NEW_TOKENS, neutral_prompts=NEUTRAL)
        with pytest.raises(ValueError, match="neutral_prompts must be 2 strings"):
            lvlm.generate_ids(b, max_new_tokens=NEW_TOKENS, neutral_prompts=NEUTRAL[:1])
    assert torch.equal(plain, same)
