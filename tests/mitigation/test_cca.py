"""CCA against a plain re-statement of the official procedure, on a tiny LLaVA with a 4 x 4 image grid.

The reference builds the concentric positions the official way (shrinking rectangles from the centre,
written with loops), runs the plain model with explicit ``position_ids`` and an explicitly edited 4-D
mask, and decodes greedily by hand with the KV cache (positions of generated tokens shifted by
``n_image_tokens - n_rings`` as the official decode step does).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from mitigation_testing import PROMPTS, REF, images, tiny_pair

from attnzoo import mitigation
from attnzoo.mitigation.cca import concentric_rings


def _official_rings(side: int) -> torch.Tensor:
    """Ring ids as the official code assigns them: the centre 2x2 gets the highest id, then outwards."""
    rings = torch.zeros(side, side, dtype=torch.long)
    top, left, bottom, right = side // 2 - 1, side // 2 - 1, side // 2, side // 2
    for value in range(side // 2 - 1, -1, -1):
        rings[top:bottom + 1, left] = value
        rings[top:bottom + 1, right] = value
        rings[top, left:right + 1] = value
        rings[bottom, left:right + 1] = value
        top, left, bottom, right = top - 1, left - 1, bottom + 1, right + 1
    return rings


def test_rings_match_official_layout():
    for side in (4, 6, 24):
        assert torch.equal(concentric_rings(side, side), _official_rings(side))
    assert concentric_rings(24, 24).max() == 11


def _reference_positions_and_mask(ids, attention_mask, image_token_id):
    """Per sample: CCA position ids (B, L), ring of each token (-1 off the image), decode shift (B,)."""
    batch, length = ids.shape
    positions = torch.zeros(batch, length, dtype=torch.long)
    rings = torch.full((batch, length), -1, dtype=torch.long)
    shift = torch.zeros(batch, dtype=torch.long)
    for b in range(batch):
        image = [int(i) for i in (ids[b] == image_token_id).nonzero().flatten()]
        side = int(len(image) ** 0.5)
        ring = _official_rings(side).flatten()
        n_rings = side // 2
        pos = 0
        first = image[0]
        for t in range(length):
            if attention_mask[b, t] == 0:
                positions[b, t] = 0
                continue
            if t < first:
                positions[b, t] = pos
                pos += 1
            elif t in image:
                positions[b, t] = pos + int(ring[t - first])
                rings[b, t] = int(ring[t - first])
            else:
                if t == image[-1] + 1:
                    pos += n_rings
                positions[b, t] = pos
                pos += 1
        shift[b] = positions[b, -1] + 1
    return positions, rings, shift


def _reference_mask_edit(rings, prompt_length):
    def edit(layer, mask):
        if mask.shape[-2] != prompt_length:  # decode steps keep the plain mask
            return mask
        out = mask.clone()
        low = torch.finfo(mask.dtype).min
        for b in range(rings.shape[0]):
            image = (rings[b] >= 0).nonzero().flatten().tolist()
            for q in image:
                for k in image:
                    out[b, :, q, k] = 0.0 if rings[b, k] <= rings[b, q] else low
        return out

    return edit


def test_cca_matches_reference_prefill_and_decode():
    lvlm, ref_model = tiny_pair()
    batch = lvlm.prepare(images(), PROMPTS)
    ids, attn = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    assert int(batch.layout.num_pad.max()) > 0
    positions, rings, next_position = _reference_positions_and_mask(ids, attn, ref_model.config.image_token_id)
    new_tokens = 3
    with torch.no_grad():
        plain = lvlm.forward(batch).logits
        with mitigation.CCA().apply(lvlm):
            ours = lvlm.forward(batch).logits
            with lvlm.use_layout(batch.layout):
                ours_gen = lvlm.model.generate(**batch.inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                               do_sample=False, output_logits=True, return_dict_in_generate=True,
                                               pad_token_id=lvlm.tokenizer.pad_token_id)
        REF["mask"] = _reference_mask_edit(rings, ids.shape[1])
        try:
            out = ref_model(**batch.inputs, position_ids=positions, use_cache=True)
            ref_logits = [out.logits[:, -1]]
            cache, mask, token = out.past_key_values, attn, out.logits[:, -1].argmax(-1)
            for step in range(new_tokens - 1):
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
                out = ref_model(input_ids=token[:, None], attention_mask=mask, past_key_values=cache,
                                position_ids=(next_position + step)[:, None], use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1].argmax(-1)
                ref_logits.append(out.logits[:, -1])
        finally:
            REF["mask"] = None
    real = attn.bool()
    assert not torch.allclose(ours[real], plain[real], atol=1e-4)
    REF["mask"] = _reference_mask_edit(rings, ids.shape[1])
    try:
        with torch.no_grad():
            ref_prefill = ref_model(**batch.inputs, position_ids=positions).logits
    finally:
        REF["mask"] = None
    assert_close(ours[real], ref_prefill[real], torch.float32, msg="prefill logits")
    for step, (a, b) in enumerate(zip(ours_gen.logits, ref_logits)):
        assert_close(a, b, torch.float32, msg=f"decode step {step}")
    with torch.no_grad():
        assert torch.equal(lvlm.forward(batch).logits, plain)


def test_cca_positions_only_and_mask_only_differ():
    lvlm, _ = tiny_pair()
    batch = lvlm.prepare(images(), PROMPTS)
    real = batch.layout.attention_mask.bool()
    with torch.no_grad():
        plain = lvlm.forward(batch).logits[real]
        outs = []
        for kw in (dict(mask=False), dict(positions=False), {}):
            with mitigation.CCA(**kw).apply(lvlm):
                outs.append(lvlm.forward(batch).logits[real])
    for a in outs:
        assert not torch.allclose(a, plain, atol=1e-4)
    assert not torch.allclose(outs[0], outs[2], atol=1e-4) and not torch.allclose(outs[1], outs[2], atol=1e-4)


class _Cache:
    def __init__(self, length):
        self.length = length

    def get_seq_length(self, layer_idx=0):
        return self.length


def test_cca_position_shift_of_prompt_decode_and_a_chunk_across_the_prompt_end():
    """The position rewrite's three cases (whole prompt, decode step, a chunk spanning the prompt's end) against
    the reference positions (the model's plain position ids count real tokens from 0, as ``generate`` does)."""
    lvlm, _ = tiny_pair()
    batch = lvlm.prepare(images(), PROMPTS)
    ids, attn = batch.layout.input_ids, batch.layout.attention_mask
    positions, _, shift = _reference_positions_and_mask(ids, attn, lvlm.image_token_id)
    length = batch.layout.prompt_length
    pad = batch.layout.num_pad.cpu()
    cca = mitigation.CCA()
    cca.on_layout(batch.layout)
    for past, q_len in ((0, length), (length + 2, 1), (length - 3, 5)):
        slots = torch.arange(past, past + q_len)  # KV-cache slots (padded positions) of the queries
        plain = slots[None, :] - pad[:, None]
        kwargs = dict(inputs_embeds=torch.zeros(2, q_len, 8), past_key_values=_Cache(past), position_ids=plain,
                      attention_mask=torch.ones(2, past + q_len, dtype=torch.long))
        _, new = cca._rewrite_positions(None, (), kwargs)
        in_prompt = slots < length
        expected = torch.where(in_prompt[None, :], positions[:, slots.clamp_max(length - 1)],
                               shift[:, None] + slots[None, :] - length)
        real = attn.bool()[:, slots.clamp_max(length - 1)] | ~in_prompt[None, :]  # padding is never attended
        assert real.sum() >= q_len
        assert torch.equal(new["position_ids"][real], expected[real]), (past, q_len)


@pytest.mark.parametrize("family, message", [("qwen2_vl", "M-RoPE"), ("llava_next", "tiles")])
def test_cca_refuses_other_families(family, message):
    from attnzoo.mllm import build_tiny, wrap

    lvlm = wrap(*build_tiny(family, seed=0))
    with pytest.raises(ValueError, match=message):
        mitigation.CCA().apply(lvlm)
    assert lvlm.passes == ()


def test_cca_hyper_parameter_errors():
    with pytest.raises(ValueError, match="does nothing"):
        mitigation.CCA(positions=False, mask=False)
