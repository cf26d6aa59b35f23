"""VHR against a plain re-statement of the paper's procedure (Eq. 4, 6, 7 and Algorithm 1), on a tiny LLaVA.

The reference knows nothing of attnzoo's passes: it runs the plain model on the image-free prompts with forward
pre-hooks on ``o_proj`` (whose input is the concatenation of the per-head outputs) to record each head's output
at the last prompt position, then runs the image prompts with hooks that, at the first generation step (the
prefill call), compute per sample and head the Euclidean distance with Python loops in float64, zero the
outliers of Eq. 6 (sample standard deviation), keep the heads above the median (Eq. 7) and scale them by alpha
at every position; decode calls reuse those heads. Earlier layers are reinforced before later ones are scored
because the hooks run in layer order inside the same forward.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from helpers import assert_close
from mitigation_testing import PROMPTS, generation_kwargs, images, tiny_pair

from attnzoo import mitigation
from attnzoo.mitigation.vhr import VHR, default_layers

# 8 heads on 4 KV heads (GQA); with this seed the outlier rule of Eq. 6 fires in the reinforced layers
MODEL = dict(num_heads=8, num_kv_heads=4, seed=2)
LAYERS, ALPHA = (1, 2, 3), 2.0


@pytest.fixture(scope="module")
def pair():
    return tiny_pair(**MODEL)


def _reference_hooks(ref_model, free_inputs, layers, alpha, num_heads, lockstep=False):
    """Register the reference VHR on the plain model; returns (handles, record) with record['scores'/'heads'/...].

    ``lockstep``: layer l is scored against an image-free forward whose earlier layers are scaled with the heads
    already chosen (run from inside layer l's hook); otherwise against one plain image-free forward run first.
    """
    decoder = ref_model.model.language_model.layers
    free_out: dict[int, torch.Tensor] = {}
    state = {"free": False}
    record = {"scores": {}, "heads": {}, "outliers": {}}

    def run_free():
        state["free"] = True
        try:
            with torch.no_grad():
                ref_model(**free_inputs)
        finally:
            state["free"] = False

    def scale(per_head, layer):
        new = per_head.clone()
        for b, heads in enumerate(record["heads"][layer]):
            for h in heads:
                new[b, :, h] = per_head[b, :, h] * alpha
        return new

    def hook_for(layer):
        def hook(module, args):
            x = args[0]
            batch, q_len, _ = x.shape
            per_head = x.reshape(batch, q_len, num_heads, -1)
            if state["free"]:  # inside an image-free forward
                free_out[layer] = per_head[:, -1].double()
                if lockstep and layer in record["heads"]:
                    return (scale(per_head, layer).reshape(batch, q_len, -1),)
                return None
            if q_len > 1:  # the prefill call predicts the first token: choose the heads here
                if lockstep:
                    run_free()
                chosen, scores, outliers = [], [], []
                for b in range(batch):
                    a, f = per_head[b, -1].double(), free_out[layer][b]
                    dim = a.shape[-1]
                    vhd = [math.sqrt(sum(float(a[h, d] - f[h, d]) ** 2 for d in range(dim))) for h in range(num_heads)]
                    ta = [sum(float(f[h, d]) ** 2 for d in range(dim)) for h in range(num_heads)]
                    vhd_bound = statistics.mean(vhd) + statistics.stdev(vhd)
                    ta_bound = statistics.mean(ta) + statistics.stdev(ta)
                    out = [vhd[h] > vhd_bound and ta[h] > ta_bound for h in range(num_heads)]
                    filtered = [0.0 if out[h] else vhd[h] for h in range(num_heads)]
                    median = statistics.median(filtered)
                    chosen.append([h for h in range(num_heads) if filtered[h] > median])
                    scores.append(vhd)
                    outliers.append(out)
                record["heads"][layer] = chosen
                record["scores"][layer] = torch.tensor(scores)
                record["outliers"][layer] = torch.tensor(outliers)
            return (scale(per_head, layer).reshape(batch, q_len, -1),)
        return hook

    handles = [decoder[i].self_attn.o_proj.register_forward_pre_hook(hook_for(i)) for i in layers]
    if not lockstep:
        run_free()
    return handles, record


@pytest.mark.parametrize("lockstep", [False, True], ids=["plain-image-free", "reinforced-image-free"])
def test_vhr_matches_reference_prefill_and_decode(pair, lockstep):
    lvlm, ref_model = pair
    batch = lvlm.prepare(images(), PROMPTS)
    assert int(batch.layout.num_pad.max()) > 0  # left padding: the two samples' images sit at different positions
    free_inputs = lvlm.prepare(None, PROMPTS).inputs
    vhr = VHR(alpha=ALPHA, layers=LAYERS, reinforce_image_free=lockstep)
    gen = generation_kwargs(lvlm, new_tokens=3)
    real = batch.layout.attention_mask.bool()
    handles, record = _reference_hooks(ref_model, free_inputs, LAYERS, ALPHA, lvlm.num_heads, lockstep)
    try:
        with torch.no_grad():
            plain = lvlm.forward(batch).logits
            with vhr.apply(lvlm):
                ours = lvlm.forward(batch).logits
                scores, heads, outliers = vhr.scores(), vhr.heads(), vhr.outliers()
                with lvlm.use_layout(batch.layout):
                    ours_gen = lvlm.model.generate(**batch.inputs, **gen)
                ours_ids = lvlm.generate_ids(batch, max_new_tokens=3, min_new_tokens=3)
            ref = ref_model(**batch.inputs).logits
            ref_gen = ref_model.generate(**batch.inputs, **gen)
    finally:
        for h in handles:
            h.remove()

    assert sorted(scores) == list(LAYERS)
    for layer in LAYERS:
        assert_close(scores[layer].cpu(), record["scores"][layer].float(), torch.float32, msg=f"VHD layer {layer}")
        expected = torch.zeros(2, lvlm.num_heads, dtype=torch.bool)
        for b, hs in enumerate(record["heads"][layer]):
            expected[b, hs] = True
        assert torch.equal(heads[layer].cpu(), expected), f"layer {layer} heads differ"
        assert torch.equal(outliers[layer].cpu(), record["outliers"][layer]), f"layer {layer} outliers differ"
    # the outlier rule fired somewhere, and the samples got different heads somewhere
    assert any(o.any() for o in outliers.values()), "no outlier: Eq. 6 is not exercised"
    assert any(not torch.equal(h[0], h[1]) for h in heads.values()), "per-sample selection is not exercised"
    assert not torch.allclose(ours[real], plain[real], atol=1e-4), "VHR changed nothing: the test would not fail"
    assert_close(ours[real], ref[real], torch.float32, msg="prefill logits")
    for step, (a, b) in enumerate(zip(ours_gen.logits, ref_gen.logits)):
        assert_close(a, b, torch.float32, msg=f"decode step {step}")
    prompt_length = batch.layout.prompt_length
    assert torch.equal(ours_gen.sequences, ref_gen.sequences)
    assert torch.equal(ours_ids, ref_gen.sequences[:, prompt_length:])  # lvlm.generate goes through the pass too
    with torch.no_grad():  # removed: the model is bit-identical to before
        assert torch.equal(lvlm.forward(batch).logits, plain)


def test_vhr_outlier_filter_and_layers(pair):
    lvlm, _ = pair
    batch = lvlm.prepare(images(), PROMPTS)
    with torch.no_grad():
        with VHR(layers=LAYERS).apply(lvlm) as handle:
            lvlm.forward(batch)
            filtered = handle.pass_obj.heads()
        with VHR(layers=LAYERS, outlier_filter=False).apply(lvlm) as handle:
            lvlm.forward(batch)
            unfiltered, none = handle.pass_obj.heads(), handle.pass_obj.outliers()
    assert not any(o.any() for o in none.values())
    assert any(not torch.equal(filtered[i], unfiltered[i]) for i in LAYERS)
    # a text-only sample gets no reinforced heads; only the listed layers are scored
    vhr = VHR(layers=(2,))
    with torch.no_grad(), vhr.apply(lvlm):
        lvlm.forward(lvlm.prepare([images()[0], None], PROMPTS))
    assert sorted(vhr.scores()) == [2]
    assert vhr.heads()[2][0].sum() == lvlm.num_heads // 2 and not vhr.heads()[2][1].any()


def test_default_layers():
    assert default_layers(32) == (1, *range(18, 32))  # LLaVA-1.5-7B: "the second and last 14 layers"
    assert default_layers(4) == (0, 1, 2, 3)
    assert default_layers(32, last_layers=0) == (1,)
    assert default_layers(32, last_layers=2, second_layer=False) == (30, 31)


def test_vhr_hyper_parameter_errors(pair):
    with pytest.raises(ValueError, match=r"alpha = 0 is outside the valid range \(0.0, inf\)"):
        VHR(alpha=0)
    with pytest.raises(ValueError, match="alpha"):
        VHR(alpha=-1.0)
    with pytest.raises(ValueError, match="last_layers = -1 is outside"):
        VHR(last_layers=-1)
    with pytest.raises(ValueError, match="distance"):
        VHR(distance="cosine")
    with pytest.raises(ValueError, match="layers is empty"):
        VHR(layers=())
    with pytest.raises(ValueError, match="outlier_min_std"):
        VHR(outlier_min_std=-0.5)
    lvlm, _ = pair
    with pytest.raises(ValueError, match=r"layers \[9\] are outside the valid range \[0, 3\]"):
        VHR(layers=(1, 9)).apply(lvlm)
    assert lvlm.passes == ()
    assert "vhr" in mitigation.available()
    assert isinstance(mitigation.get("vhr", alpha=3.0), VHR)
