"""Passes change attention exactly as an independent eager re-computation predicts, at prefill and at every
decode step with the KV cache, on left-padded batches of 2.

The reference is a plain eager attention function written here (registered under its own name on an unwrapped
copy of the same tiny model) that applies the edit from scratch: image keys come from ``input_ids ==
image_token_id``, not from attnzoo's TokenLayout, and no attnzoo code runs in the reference model.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close
from mllm_testing import ALL_FAMILIES, PROMPTS, images, plain_model, wrapped

from attnzoo.mllm import AttentionContext, AttentionPass, Plan

REF: dict = {}  # the reference function's configuration for the current test


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention (softmax in float32, as the models' eager code) + the edit described by REF."""
    n_rep = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)
    value = value.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    layer = getattr(module, "layer_idx", None)
    edit = REF.get("kind") if layer is not None and layer in REF.get("layers", ()) else None
    heads = list(REF.get("heads") or range(query.shape[1]))
    kv = key.shape[2]
    if edit is not None:
        image = REF["image_keys"]  # (B, L) from input_ids
        image = torch.cat([image, image.new_zeros(image.shape[0], kv - image.shape[1])], 1)[:, None, None, :]
    if edit == "scores":
        bonus = torch.where(image, math.log(REF["alpha"]), 0.0)
        scores[:, heads] = scores[:, heads] + bonus
    if edit == "mask":
        # generated tokens (positions >= prompt length) may not look at image keys
        q_pos = torch.arange(kv - query.shape[2], kv)[None, None, :, None]
        blocked = image & (q_pos >= REF["prompt_length"])
        scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if edit == "weights":
        scaled = probs[:, heads] * torch.where(image, REF["alpha"], 1.0)
        probs[:, heads] = scaled / scaled.sum(-1, keepdim=True)
    out = torch.matmul(probs, value)
    if edit == "outputs":
        out[:, heads] = out[:, heads] * REF["alpha"]
    return out.transpose(1, 2).contiguous(), None


def _register_reference():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register("mllm_test_ref", reference_attention)
    AttentionMaskInterface.register("mllm_test_ref", ALL_MASK_ATTENTION_FUNCTIONS["eager"])


class ImageAttentionScale(AttentionPass):
    """The test pass: multiplies image-key attention by ``alpha`` in the given layers/heads, at one stage."""

    def __init__(self, kind: str, alpha: float, layers: set[int], heads: list[int] | None):
        self.kind, self.alpha, self.layers, self.heads = kind, alpha, layers, heads

    def plan(self, ctx: AttentionContext) -> Plan | None:
        if ctx.site != "text" or ctx.layer not in self.layers:
            return None
        return Plan(heads=self.heads, scores=self.kind == "scores", weights=self.kind == "weights",
                    mask=self.kind == "mask", outputs=self.kind == "outputs")

    def _image(self, ctx: AttentionContext) -> torch.Tensor:
        return ctx.layout.image_keys(ctx.kv_length)[:, None, None, :]

    def edit_scores(self, ctx, scores):
        assert scores.shape[1] == (len(self.heads) if self.heads else ctx.num_heads)
        return scores + torch.where(self._image(ctx), math.log(self.alpha), 0.0)

    def edit_weights(self, ctx, weights):
        assert weights.dtype == torch.float32 and weights.shape[1] == len(ctx.heads)
        w = weights * torch.where(self._image(ctx), self.alpha, 1.0)
        return w / w.sum(-1, keepdim=True)

    def edit_mask(self, ctx, mask):
        generated = (ctx.query_positions >= ctx.layout.prompt_length)[None, None, :, None]
        return mask & ~(self._image(ctx) & generated)

    def edit_outputs(self, ctx, outputs):
        heads = self.heads or list(range(ctx.num_heads))
        outputs = outputs.clone()
        outputs[:, :, heads] *= self.alpha
        return outputs


CASES = {
    # kind, alpha, layers, heads
    "weights-some-heads": ("weights", 3.0, {1}, [0, 3]),
    "weights-all": ("weights", 0.25, {0, 1}, None),
    "scores-all": ("scores", 4.0, {0, 1}, None),
    "scores-one-head": ("scores", 4.0, {0}, [2]),
    "mask-decode": ("mask", 1.0, {0, 1}, None),
    "outputs": ("outputs", 0.5, {1}, [1, 2]),
}


def _compare(family: str, case: str, new_tokens: int = 4):
    kind, alpha, layers, heads = CASES[case]
    _register_reference()
    lvlm = wrapped(family)
    ref_model, _ = plain_model(family, attn="mllm_test_ref")
    batch = lvlm.prepare(images(), PROMPTS)
    assert int(batch.layout.num_pad.max()) > 0
    ids = batch.inputs["input_ids"]
    REF.clear()
    REF.update(kind=kind, alpha=alpha, layers=layers, heads=heads, prompt_length=ids.shape[1],
               image_keys=ids == ref_model.config.image_token_id)
    real = batch.layout.attention_mask.bool()
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, output_logits=True,
               return_dict_in_generate=True, pad_token_id=lvlm.tokenizer.pad_token_id)
    with torch.no_grad():
        plain_logits = lvlm.forward(batch).logits
        with lvlm.attach(ImageAttentionScale(kind, alpha, layers, heads)):
            ours = lvlm.forward(batch).logits
            with lvlm.use_layout(batch.layout):
                ours_gen = lvlm.model.generate(**batch.inputs, **gen)
        ref = ref_model(**batch.inputs).logits
        ref_gen = ref_model.generate(**batch.inputs, **gen)
    assert_close(ours[real], ref[real], torch.float32, msg=f"prefill {family} {case}")
    if kind != "mask":  # the mask edit only acts on generated queries
        assert not torch.allclose(ours[real], plain_logits[real], atol=1e-4), "the pass had no effect"
    for step, (a, b) in enumerate(zip(ours_gen.logits, ref_gen.logits)):
        assert_close(a, b, torch.float32, msg=f"decode step {step} {family} {case}")
    assert torch.equal(ours_gen.sequences, ref_gen.sequences)
    # detached: back to the plain model, bit for bit
    with torch.no_grad():
        after = lvlm.forward(batch).logits
    assert torch.equal(after, plain_logits)


@pytest.mark.parametrize("case", sorted(CASES))
def test_pass_matches_eager_recomputation_llava(case):
    _compare("llava", case)


@pytest.mark.parametrize("family", [f for f in ALL_FAMILIES if f != "llava"])
def test_pass_matches_eager_recomputation_other_families(family):
    _compare(family, "weights-some-heads")


def test_mask_pass_changes_decode():
    """The mask case acts only on generated queries: prefill unchanged, the first decode logits changed."""
    lvlm = wrapped("llava")
    batch = lvlm.prepare(images(), PROMPTS)
    gen = dict(max_new_tokens=2, min_new_tokens=2, do_sample=False, output_logits=True,
               return_dict_in_generate=True, pad_token_id=lvlm.tokenizer.pad_token_id)
    with torch.no_grad(), lvlm.use_layout(batch.layout):
        plain = lvlm.model.generate(**batch.inputs, **gen)
        with lvlm.attach(ImageAttentionScale("mask", 1.0, {0, 1}, None)):
            masked = lvlm.model.generate(**batch.inputs, **gen)
    assert torch.equal(plain.logits[0], masked.logits[0])
    assert not torch.allclose(plain.logits[1], masked.logits[1], atol=1e-4)


class Recorder(AttentionPass):
    """Records the contexts it is shown; changes nothing (plans an outputs edit that returns its input)."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.layouts: list = []

    def plan(self, ctx):
        self.calls.append((ctx.site, ctx.layer, ctx.is_prefill, ctx.step, ctx.q_length, ctx.kv_length,
                           ctx.query_positions.tolist(), ctx.layout))
        return Plan(outputs=True) if ctx.site == "text" else None

    def edit_outputs(self, ctx, outputs):
        assert outputs.shape == (ctx.batch_size, ctx.q_length, ctx.num_heads, ctx.head_dim)
        return outputs

    def on_layout(self, layout):
        self.layouts.append(layout)


def test_context_prefill_and_decode_steps():
    lvlm = wrapped("llava")
    batch = lvlm.prepare(images(), PROMPTS)
    L = batch.layout.prompt_length
    rec = Recorder()
    with lvlm.attach(rec):
        out = lvlm.generate_ids(batch, max_new_tokens=3, min_new_tokens=3)
    assert out.shape == (2, 3)
    text = [c for c in rec.calls if c[0] == "text"]
    vision = [c for c in rec.calls if c[0] == "vision"]
    assert [c[1] for c in vision] == [0, 1] and all(c[7] is batch.layout for c in vision)
    # prefill (both layers) then 2 decode steps (the 3rd token needs no forward)
    assert [(c[1], c[2], c[3], c[4], c[5]) for c in text] == [
        (0, True, 0, L, L), (1, True, 0, L, L),
        (0, False, 1, 1, L + 1), (1, False, 1, 1, L + 1),
        (0, False, 2, 1, L + 2), (1, False, 2, 1, L + 2)]
    assert text[0][6] == list(range(L)) and text[2][6] == [L] and text[4][6] == [L + 1]
    assert all(c[7] is batch.layout for c in text)
    assert rec.layouts[0] is batch.layout and rec.layouts[-1] is None
    assert lvlm.passes == ()


class ResidualProbe(AttentionPass):
    def __init__(self, add: float = 0.0):
        self.seen: dict[int, torch.Tensor] = {}
        self.add = add

    def edit_residual(self, ctx, hidden):
        self.seen[ctx.layer] = hidden.clone()
        return hidden + self.add if self.add else None


def test_residual_hook_sees_layer_inputs():
    lvlm = wrapped("llava")
    batch = lvlm.prepare(images(), PROMPTS)
    probe = ResidualProbe()
    with torch.no_grad():
        with lvlm.attach(probe) as handle:
            out = lvlm.forward(batch, output_hidden_states=True)
        assert handle.removed
        plain = lvlm.forward(batch)
    # hidden_states[i] is the residual stream entering decoder layer i
    for i in range(lvlm.num_layers):
        assert torch.equal(probe.seen[i], out.hidden_states[i])
    assert torch.equal(out.logits, plain.logits)
    assert all(len(layer._forward_pre_hooks) == 0 for layer in lvlm.decoder_layers)
    # a returned tensor replaces the residual
    with torch.no_grad(), lvlm.attach(ResidualProbe(add=1.0)):
        shifted = lvlm.forward(batch).logits
    assert not torch.allclose(shifted, plain.logits)


class _OrderedProbe(AttentionPass):
    """Logs ``(name, layer, is_prefill)`` per residual call and whether decoder layer 0 carries hooks per text
    attention call; adds ``add`` to the residual."""

    def __init__(self, name, log, lvlm, at_decode, add=0.0):
        self.name, self.log, self.lvlm, self.add = name, log, lvlm, add
        self.residual_at_decode = at_decode
        self.hooked: list[tuple[bool, bool]] = []  # (is_prefill, layer 0 has pre-hooks) per text attention call

    def plan(self, ctx):
        if ctx.site == "text":
            self.hooked.append((ctx.is_prefill, bool(self.lvlm.decoder_layers[0]._forward_pre_hooks)))
        return None

    def edit_residual(self, ctx, hidden):
        self.log.append((self.name, ctx.layer, ctx.is_prefill))
        return hidden + self.add if self.add else None


def test_prefill_only_residual_hooks_are_off_while_decoding():
    """A pass with ``residual_at_decode = False`` sees every layer at prefill and no decode step, and decode steps
    run without per-layer hooks; next to an every-step residual pass both act in attach order, chained."""
    lvlm = wrapped("llava")
    batch = lvlm.prepare(images(), PROMPTS)
    n = lvlm.num_layers
    gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=lvlm.tokenizer.pad_token_id,
               output_logits=True, return_dict_in_generate=True)

    def generate():
        with torch.no_grad(), lvlm.use_layout(batch.layout):
            return lvlm.model.generate(**batch.inputs, **gen)

    plain = generate()
    log: list = []
    prefill_only = _OrderedProbe("prefill", log, lvlm, at_decode=False)
    with lvlm.attach(prefill_only):
        out = generate()
    assert log == [("prefill", i, True) for i in range(n)]
    hooked = prefill_only.hooked
    assert {h for p, h in hooked if p} == {True} and {h for p, h in hooked if not p} == {False}
    assert torch.equal(out.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, plain.logits))

    log.clear()
    always = _OrderedProbe("always", log, lvlm, at_decode=True)
    with lvlm.attach(_OrderedProbe("prefill", log, lvlm, at_decode=False, add=0.5)), lvlm.attach(always):
        shifted = generate()
    prefill_calls = [c for c in log if c[2]]
    assert prefill_calls == [(name, i, True) for i in range(n) for name in ("prefill", "always")]
    assert [c for c in log if not c[2]] == [("always", i, False) for _ in range(2) for i in range(n)]
    assert {h for _, h in always.hooked} == {True}  # an every-step pass keeps the hooks on while decoding
    assert not torch.allclose(shifted.logits[0], plain.logits[0]), "the residual edit must act"
    assert not lvlm.language_model._forward_pre_hooks
    assert all(not layer._forward_pre_hooks for layer in lvlm.decoder_layers)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_capture_vision_attention_matches_eager(family):
    lvlm = wrapped(family)
    batch = lvlm.prepare(images(), PROMPTS)
    with torch.no_grad(), lvlm.capture_vision_attention(layers=[0, 1]) as maps:
        lvlm.forward(batch)
    assert sorted(maps) == [0, 1]
    if family == "llava":
        plain, _ = plain_model(family, attn="eager")
        with torch.no_grad():
            ref = plain.model.vision_tower(batch.inputs["pixel_values"], output_attentions=True).attentions
        for i in (0, 1):
            assert len(maps[i]) == 1
            assert_close(maps[i][0], ref[i].float(), torch.float32)
    else:  # Qwen2-VL attends within each image: one map per image, of its own patch count
        patches = batch.inputs["image_grid_thw"].prod(-1).tolist()
        assert [m.shape[-1] for m in maps[0]] == patches
        assert [m.shape[-2] for m in maps[1]] == patches
    for ws in maps.values():
        for w in ws:
            assert_close(w.sum(-1), torch.ones_like(w.sum(-1)), torch.float32)


def test_image_free_forward_equals_plain_text_prompt():
    lvlm = wrapped("llava")
    plain, _ = plain_model("llava")
    batch = lvlm.prepare(images(), PROMPTS)
    seen = Recorder()
    with lvlm.attach(seen):
        out, free = lvlm.image_free_forward(batch)
    assert free.layout.num_image_tokens.tolist() == [0, 0]
    assert "pixel_values" not in free.inputs
    texts = [lvlm.render(p, with_image=False) for p in PROMPTS]
    enc = lvlm.processor(text=texts, return_tensors="pt", padding=True)
    assert torch.equal(enc["input_ids"], free.inputs["input_ids"])
    with torch.no_grad():
        ref = plain(**enc).logits
    real = enc["attention_mask"].bool()
    assert torch.equal(out.logits[real], ref[real])
    assert all(c[7] is free.layout for c in seen.calls if c[0] == "text")


def test_attach_errors_and_composition():
    lvlm = wrapped("llava")
    p = ImageAttentionScale("weights", 2.0, {0}, None)
    with lvlm.attach(p):
        with pytest.raises(ValueError, match="already attached"):
            lvlm.attach(p)
    with pytest.raises(TypeError, match="AttentionPass"):
        lvlm.attach(object())

    class Takeover(AttentionPass):
        def attend(self, ctx, query, key, value, mask):
            return query

    batch = lvlm.prepare(images(), PROMPTS)
    with lvlm.attach(Takeover()), lvlm.attach(ImageAttentionScale("weights", 2.0, {0}, None)):
        with pytest.raises(ValueError, match="attach only one of them"), torch.no_grad():
            lvlm.forward(batch)
    assert lvlm.passes == ()


class OwnSDPA(AttentionPass):
    """Takes over the whole computation (as a fused-kernel pass would) with plain SDPA on the given mask."""

    def __init__(self):
        self.calls = 0

    def plan(self, ctx):
        return Plan(replace=True) if ctx.site == "text" else None

    def attend(self, ctx, query, key, value, mask):
        self.calls += 1
        rep = ctx.num_heads // ctx.num_kv_heads
        key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
        mask = mask | ~mask.any(-1, keepdim=True)  # padding rows: any finite output
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                                scale=ctx.scaling)


def test_replace_path_matches_plain_model():
    lvlm = wrapped("llava_next")
    batch = lvlm.prepare(images(), PROMPTS)
    real = batch.layout.attention_mask.bool()
    own = OwnSDPA()
    gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True,
               return_dict_in_generate=True, pad_token_id=lvlm.tokenizer.pad_token_id)
    with torch.no_grad(), lvlm.use_layout(batch.layout):
        plain = lvlm.model(**batch.inputs).logits
        plain_gen = lvlm.model.generate(**batch.inputs, **gen)
        with lvlm.attach(own):
            ours = lvlm.model(**batch.inputs).logits
            ours_gen = lvlm.model.generate(**batch.inputs, **gen)
    assert own.calls == lvlm.num_layers * (1 + 1 + 2)  # forward, generate prefill, 2 decode steps
    assert_close(ours[real], plain[real], torch.float32)
    for a, b in zip(ours_gen.logits, plain_gen.logits):
        assert_close(a, b, torch.float32)
    assert torch.equal(ours_gen.sequences, plain_gen.sequences)
