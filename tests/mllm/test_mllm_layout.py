"""TokenLayout against independent facts: the embeddings the model actually puts at each position, each
sample prepared alone (so left padding must shift every position by exactly the pad count), the decoded
instruction text, and the family's grid geometry."""

from __future__ import annotations

import pytest
import torch
from mllm_testing import ALL_FAMILIES, FAMILIES, PROMPTS, images, wrapped

from attnzoo.mllm import AttentionPass


def _merged_embeddings(lvlm, batch) -> torch.Tensor:
    """The inputs_embeds the language model receives (image features already scattered in)."""
    seen = {}

    def hook(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    h = lvlm.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            lvlm.forward(batch)
    finally:
        h.remove()
    return seen["embeds"]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_layout_matches_single_sample_layouts(family):
    lvlm = wrapped(family)
    imgs = images()
    batch = lvlm.prepare(imgs, PROMPTS)
    lay = batch.layout
    assert lay.padding_side == "left" and lay.batch_size == 2
    pads = lay.num_pad.tolist()
    assert min(pads) == 0 and max(pads) > 0
    for b in range(2):
        alone = lvlm.prepare([imgs[b]], [PROMPTS[b]]).layout
        pad = pads[b]
        assert alone.prompt_length + pad == lay.prompt_length
        assert torch.equal(lay.input_ids[b, pad:], alone.input_ids[0])
        assert lay.attention_mask[b, :pad].eq(0).all() and lay.attention_mask[b, pad:].eq(1).all()
        for name in ("image_mask", "newline_mask", "instruction_mask"):
            full = getattr(lay, name)[b]
            assert not full[:pad].any(), name
            assert torch.equal(full[pad:], getattr(alone, name)[0]), name
        assert [(s.start - pad, s.end - pad, s.grid, s.highres_grid) for s in lay.images[b]] == \
            [(s.start, s.end, s.grid, s.highres_grid) for s in alone.images[0]]
        # the instruction decodes back to the user's text
        text = lvlm.tokenizer.decode(lay.input_ids[b, lay.instruction_mask[b]])
        assert text.strip() == PROMPTS[b]
        start, end = lay.instruction_span(b)
        assert lay.instruction_mask[b, start:end].all() and end - start == int(lay.instruction_mask[b].sum())
    # image tokens are exactly the placeholder tokens, and the instruction follows the image
    assert torch.equal(lay.image_mask, lay.input_ids == lvlm.image_token_id)
    assert not (lay.image_mask & lay.instruction_mask).any()
    assert all(lay.images[b][0].end <= lay.instruction_span(b)[0] for b in range(2))
    assert lay.template_mask.sum() > 0


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_image_positions_hold_image_features(family):
    """Image spans hold the projected vision features, in order; text positions hold token embeddings;
    LLaVA-NeXT newline positions hold the learned image_newline vector and nothing else does."""
    lvlm = wrapped(family)
    batch = lvlm.prepare(images(), PROMPTS)
    lay = batch.layout
    embeds = _merged_embeddings(lvlm, batch)
    token_embeds = lvlm.model.get_input_embeddings()(lay.input_ids)
    text = ~lay.image_mask
    assert torch.equal(embeds[text], token_embeds[text])
    assert not torch.isclose(embeds[lay.image_mask], token_embeds[lay.image_mask]).all(-1).any()
    inputs = batch.inputs
    with torch.no_grad():
        if family.startswith("qwen"):
            feats = lvlm.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        elif family == "llava_next":
            feats = lvlm.model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
        else:
            feats = lvlm.model.model.get_image_features(inputs["pixel_values"])
    feats = getattr(feats, "pooler_output", feats)
    feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1])
    assert torch.equal(embeds[lay.image_mask], feats)
    if family == "llava_next":
        newline = lvlm.model.model.image_newline
        is_newline = (embeds == newline).all(-1)
        assert torch.equal(is_newline, lay.newline_mask)
        assert lay.newline_mask.sum() > 0
    else:
        assert not lay.newline_mask.any()


@pytest.mark.parametrize("family", FAMILIES)
def test_grid_geometry(family):
    lvlm = wrapped(family)
    batch = lvlm.prepare(images(), PROMPTS)
    lay = batch.layout
    cfg = lvlm.model.config
    for b in range(2):
        (span,) = lay.images[b]
        assert span.num_tokens == int(lay.num_image_tokens[b])
        base = span.base_positions()
        assert base.shape == span.grid and base.flatten()[0] == span.start
        if family == "llava":
            side = cfg.vision_config.image_size // cfg.vision_config.patch_size
            assert span.grid == (side, side) and span.num_tokens == side * side
        elif family == "qwen2_vl":
            t, h, w = batch.inputs["image_grid_thw"][b].tolist()
            m = cfg.vision_config.spatial_merge_size
            assert span.grid == (h // m, w // m) and span.num_tokens == t * h * w // m // m
            vs = cfg.vision_start_token_id
            ve = cfg.vision_end_token_id
            assert lay.input_ids[b, span.start - 1] == vs and lay.input_ids[b, span.end] == ve
        else:
            rows, cols = span.highres_grid
            hr = span.highres_positions()
            assert hr.shape == (rows, cols)
            assert span.num_tokens == span.grid[0] * span.grid[1] + rows * (cols + 1)
            assert torch.equal(span.newline_positions(), lay.newline_mask[b].nonzero().flatten().cpu())
            assert int(hr.max()) < span.end and not lay.newline_mask[b, hr.flatten()].any()
    # the two test images have different aspect ratios: the any-resolution grids differ
    if family != "llava":
        assert lay.images[0][0].num_tokens != lay.images[1][0].num_tokens or \
            lay.images[0][0].grid != lay.images[1][0].grid


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_with_image_free_sample(family):
    lvlm = wrapped(family)
    imgs = images()
    batch = lvlm.prepare([imgs[0], None], [PROMPTS[1], PROMPTS[0]])
    lay = batch.layout
    assert lay.has_image == (True, False)
    assert len(lay.images[0]) == 1 and lay.images[1] == ()
    assert lay.num_image_tokens[1] == 0 and lay.num_image_tokens[0] > 0
    assert lvlm.tokenizer.decode(lay.input_ids[1, lay.instruction_mask[1]]).strip() == PROMPTS[0]
    with torch.no_grad():
        out = lvlm.forward(batch).logits
    assert torch.isfinite(out[lay.attention_mask.bool()]).all()


def test_select_keys_and_repr():
    lvlm = wrapped("llava")
    lay = lvlm.prepare(images(), PROMPTS).layout
    sub = lay.select([1])
    assert sub.batch_size == 1 and sub.prompts == (PROMPTS[1],)
    assert torch.equal(sub.image_mask[0], lay.image_mask[1]) and sub.images[0] == lay.images[1]
    keys = lay.image_keys(lay.prompt_length + 3)
    assert keys.shape == (2, lay.prompt_length + 3) and not keys[:, lay.prompt_length:].any()
    assert torch.equal(keys[:, :lay.prompt_length], lay.image_mask)
    with pytest.raises(ValueError, match="shorter than the prompt"):
        lay.image_keys(lay.prompt_length - 1)
    assert "TokenLayout(family='llava', batch=2" in repr(lay)


def test_prepare_errors():
    lvlm = wrapped("llava")
    with pytest.raises(ValueError, match="got 1 images for 2 prompts"):
        lvlm.prepare(images()[:1], PROMPTS)
    with pytest.raises(TypeError, match="sequence of str"):
        lvlm.prepare(None, [1, 2])


class _VisionBatch(AttentionPass):
    site = "vision"

    def __init__(self):
        self.rows: list[tuple[int, object]] = []

    def plan(self, ctx):
        if ctx.site == "vision" and ctx.layer == 0:
            self.rows.append((ctx.batch_size, ctx.layout))
        return None


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_vision_rows_map_vision_batch_to_samples(family):
    lvlm = wrapped(family)
    imgs = images()
    batch = lvlm.prepare([imgs[0], None, imgs[1]], [PROMPTS[0], PROMPTS[1], PROMPTS[1]])
    lay = batch.layout
    assert lay.image_samples == (0, 2)
    probe = _VisionBatch()
    with torch.no_grad(), lvlm.attach(probe):
        lvlm.forward(batch)
    assert all(layout is lay for _, layout in probe.rows)
    if family == "qwen2_vl":
        assert lay.vision_rows is None and len(probe.rows) == 2  # one call per image
        return
    assert [n for n, _ in probe.rows] == [len(lay.vision_rows)]
    if family == "llava":
        assert lay.vision_rows.tolist() == [0, 2]
    else:  # tiles of image 0 (sample 0), then of image 1 (sample 2); the aspect ratios give 3 tiles each
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = lvlm.model.config
        tiles = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                 for s in batch.inputs["image_sizes"]]
        assert lay.vision_rows.tolist() == [0] * tiles[0] + [2] * tiles[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_system_prompt(family):
    lvlm = wrapped(family)
    system = "You are a careful assistant. Is there a dog?"  # repeats the prompt: the instruction is the last one
    batch = lvlm.prepare(images(), PROMPTS, system=system)
    lay = batch.layout
    text = lvlm.tokenizer.decode(lay.input_ids[0, lay.attention_mask[0].bool()])
    assert "careful assistant" in text
    for b in range(2):
        assert lvlm.tokenizer.decode(lay.input_ids[b, lay.instruction_mask[b]]).strip() == PROMPTS[b]
    assert lay.template_mask.sum() > lvlm.prepare(images(), PROMPTS).layout.template_mask.sum()
