"""With no pass attached, the wrapped model is the plain model: same logits at every real position (eager and
SDPA, left-padded batches) and token-identical greedy generation."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from mllm_testing import ALL_FAMILIES, FAMILIES, PROMPTS, images, plain_model, wrapped


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_logits_equal_plain_model(family, backend):
    lvlm = wrapped(family, attn_backend=backend)
    plain, _ = plain_model(family, attn=backend)
    batch = lvlm.prepare(images(), PROMPTS)
    assert int(batch.layout.num_pad.max()) > 0, "the test batch must be left-padded"
    with torch.no_grad():
        ours = lvlm.forward(batch).logits
        ref = plain(**batch.inputs).logits
    real = batch.layout.attention_mask.bool()
    # Same computation in the same order: the no-pass path hands transformers' own function the same tensors
    # (SDPA), or computes the same eager formula; equal to float32 rounding at every real position.
    assert_close(ours[real], ref[real], torch.float32)
    if backend == "sdpa":
        assert torch.equal(ours[real], ref[real])


@pytest.mark.parametrize("family", FAMILIES)
def test_wrapped_sdpa_matches_plain_eager(family):
    """Guards the mask registration: without the mask function a custom attention gets no causal mask, and
    logits differ from eager at all but the last position."""
    lvlm = wrapped(family)
    plain, _ = plain_model(family, attn="eager")
    batch = lvlm.prepare(images(), PROMPTS)
    with torch.no_grad():
        ours = lvlm.forward(batch).logits
        ref = plain(**batch.inputs).logits
    real = batch.layout.attention_mask.bool()
    assert_close(ours[real], ref[real], torch.float32)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_greedy_generation_token_identical(family):
    lvlm = wrapped(family)
    plain, _ = plain_model(family)
    batch = lvlm.prepare(images(), PROMPTS)
    ours = lvlm.generate_ids(batch, max_new_tokens=6, min_new_tokens=6)
    with torch.no_grad():
        ref = plain.generate(**batch.inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             pad_token_id=lvlm.tokenizer.pad_token_id)
    assert torch.equal(ours, ref[:, batch.layout.prompt_length:])
    assert lvlm.generate(images(), PROMPTS, max_new_tokens=6, min_new_tokens=6) == lvlm.decode(ours)


def test_bfloat16_logits_match_plain_model():
    lvlm = wrapped("llava")
    plain, _ = plain_model("llava")
    lvlm.model.to(torch.bfloat16)
    plain.to(torch.bfloat16)
    batch = lvlm.prepare(images(), PROMPTS)
    with torch.no_grad():
        ours = lvlm.forward(batch).logits
        ref = plain(**batch.inputs).logits
    real = batch.layout.attention_mask.bool()
    assert torch.equal(ours[real], ref[real])
