"""VAR against a plain re-statement of the paper's / official code's procedure, on a tiny LLaVA.

The reference finds sinks with its own hooks (float64 RMS normalisation, per sample) and redistributes with
explicit loops over samples, heads and queries, following the official VARProcessor step by step. It knows
nothing of attnzoo: image keys come from ``input_ids == image_token_id``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from mitigation_testing import PROMPTS, REF, generation_kwargs, images, tiny_pair

from attnzoo import mitigation
from attnzoo.mitigation.var import find_sink_dims, known_sink_dims

RHO, SUMM, P, FIRST = 0.5, 0.2, 0.6, 1


def _reference_sinks(ref_model, dims, tau, attention_mask):
    """Forward pre-hooks on the plain model: layer -> (B, L) bool sinks at prefill."""
    store: dict[int, torch.Tensor] = {}

    def make(layer):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] == 1 or layer < FIRST:
                return
            h = hidden.double()
            rms = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            store[layer] = (rms.abs()[..., list(dims)].amax(-1) > tau) & attention_mask.bool()
        return hook

    handles = [layer.register_forward_pre_hook(make(i), with_kwargs=True)
               for i, layer in enumerate(ref_model.model.language_model.layers)]
    return store, handles


def _reference_redistribution(sinks, image_ids, num_layers):
    """The official redistribution written out with loops (float64 arithmetic on a copy)."""

    def edit(layer, probs):
        if layer not in sinks or layer == num_layers - 1:
            return probs
        out = probs.clone()
        batch, heads, q_len, kv = probs.shape
        for b in range(batch):
            image = [int(i) for i in image_ids[b].nonzero().flatten()]
            sink = [int(i) for i in sinks[layer][b].nonzero().flatten()]
            visual_sink = [i for i in sink if i in image]
            text_sink = [i for i in sink if i not in image]
            if not visual_sink:
                continue
            for h in range(heads):
                for qi in range(q_len):
                    position = kv - q_len + qi
                    if q_len > 1 and position <= max(image):
                        continue  # prefill: only queries after the image
                    a = probs[b, h, qi].double()
                    on_image = sum(a[i] for i in image)
                    portion = sum(a[i] for i in visual_sink) / sum(a[i] + 1e-6 for i in image)
                    if not (portion <= RHO and on_image >= SUMM):
                        continue
                    new = a.clone()
                    budget = (1 - P) * (sum(a[i] for i in visual_sink) + sum(a[i] for i in text_sink))
                    for i in sink:
                        new[i] = a[i] * P
                    rest = [i for i in image if i not in visual_sink]
                    denom = sum(a[i] for i in rest)
                    for i in rest:
                        new[i] = new[i] + budget * a[i] / denom
                    out[b, h, qi] = new.float()
        return out

    return edit


def _calibrate(lvlm, batch, dims):
    """A tau at which some but not all tokens are sinks (the tiny model has no 20x activations)."""
    values = []

    def hook(module, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).float()
        rms = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        values.append(rms.abs()[..., list(dims)].amax(-1)[batch.layout.attention_mask.bool()])

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in lvlm.decoder_layers[FIRST:]]
    with torch.no_grad():
        lvlm.forward(batch)
    for h in handles:
        h.remove()
    return float(torch.cat(values).quantile(0.85))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
def test_var_matches_reference_prefill_and_decode(fused):
    lvlm, ref_model = tiny_pair()
    batch = lvlm.prepare(images(), PROMPTS)
    assert int(batch.layout.num_pad.max()) > 0
    dims = find_sink_dims(lvlm, images(), first_layer=FIRST)
    assert len(dims) == 2 and all(0 <= d < lvlm.hidden_size for d in dims)
    tau = _calibrate(lvlm, batch, dims)
    var = mitigation.VAR(tau=tau, rho=RHO, summ=SUMM, p=P, sink_dims=dims, first_layer=FIRST, fused=fused)

    ids = batch.inputs["input_ids"]
    sinks, handles = _reference_sinks(ref_model, dims, tau, batch.inputs["attention_mask"])
    REF["weights"] = _reference_redistribution(sinks, ids == ref_model.config.image_token_id, lvlm.num_layers)
    REF["mask"] = None
    gen = generation_kwargs(lvlm)
    real = batch.layout.attention_mask.bool()
    try:
        with torch.no_grad():
            plain = lvlm.forward(batch).logits
            with var.apply(lvlm):
                ours = lvlm.forward(batch).logits
                found = var.sinks()
                with lvlm.use_layout(batch.layout):
                    ours_gen = lvlm.model.generate(**batch.inputs, **gen)
            ref = ref_model(**batch.inputs).logits
            ref_gen = ref_model.generate(**batch.inputs, **gen)
    finally:
        for h in handles:
            h.remove()
        REF["weights"] = None
    # the same sinks were found, some of them on the image, some not
    for layer, mask in sinks.items():
        assert torch.equal(found[layer].cpu(), mask.cpu()), f"layer {layer} sinks differ"
    image = ids == ref_model.config.image_token_id
    assert any((m & image).any() for m in sinks.values()) and any((m & ~image).any() for m in sinks.values())
    assert not torch.allclose(ours[real], plain[real], atol=1e-4), "VAR changed nothing: the test would not fail"
    assert_close(ours[real], ref[real], torch.float32, msg="prefill logits")
    for step, (a, b) in enumerate(zip(ours_gen.logits, ref_gen.logits)):
        assert_close(a, b, torch.float32, msg=f"decode step {step}")
    assert torch.equal(ours_gen.sequences, ref_gen.sequences)
    # removed: the model is bit-identical to before
    with torch.no_grad():
        assert torch.equal(lvlm.forward(batch).logits, plain)


def test_var_redistribution_preserves_mass_and_moves_it_to_the_image():
    lvlm, _ = tiny_pair()
    batch = lvlm.prepare(images(), PROMPTS)
    dims = find_sink_dims(lvlm, images(), first_layer=FIRST)
    var = mitigation.VAR(tau=_calibrate(lvlm, batch, dims), sink_dims=dims, first_layer=FIRST, summ=0.0, rho=1.0,
                         fused=False)
    seen = []
    original = var.edit_weights

    def spy(ctx, weights):
        out = original(ctx, weights)
        seen.append((ctx, weights.clone(), out))
        return out

    var.edit_weights = spy
    with torch.no_grad(), var.apply(lvlm):
        lvlm.forward(batch)
    assert seen
    for ctx, before, after in seen:
        torch.testing.assert_close(after.sum(-1), before.sum(-1), rtol=1e-5, atol=1e-5)
        image = ctx.layout.image_keys(ctx.kv_length)[:, None, None, :]
        assert ((after * image).sum(-1) >= (before * image).sum(-1) - 1e-6).all()


def test_var_hyper_parameter_errors():
    with pytest.raises(ValueError, match=r"p = 1.5 is outside the valid range \[0.0, 1.0\]"):
        mitigation.VAR(p=1.5)
    with pytest.raises(ValueError, match="rho"):
        mitigation.VAR(rho=-0.1)
    with pytest.raises(ValueError, match="tau"):
        mitigation.VAR(tau=0)
    with pytest.raises(ValueError, match="sink_dims is empty"):
        mitigation.VAR(sink_dims=())
    lvlm, _ = tiny_pair()
    with pytest.raises(ValueError, match=r"first_layer = 9 is outside the valid range \[0, 3\]"):
        mitigation.VAR(first_layer=9, sink_dims=(0, 1)).apply(lvlm)
    with pytest.raises(ValueError, match="no published sink dimensions"):
        mitigation.VAR().apply(lvlm)
    with pytest.raises(ValueError, match=r"sink_dims \[64\] are outside"):
        mitigation.VAR(sink_dims=(3, 64)).apply(lvlm)
    assert lvlm.passes == ()


def test_known_sink_dims_table():
    assert known_sink_dims("llava-hf/llava-1.5-7b-hf") == (2533, 1415)
    assert known_sink_dims("liuhaotian/llava-v1.5-13b") == (2100, 4743)
    assert known_sink_dims("Qwen/Qwen2-VL-7B-Instruct") is None


def test_registry():
    assert {"var", "cca", "vhr", "causalmm", "lqcd"} <= set(mitigation.available())
    assert isinstance(mitigation.get("VAR", p=0.5), mitigation.VAR)
    with pytest.raises(ValueError, match="did you mean 'var'"):
        mitigation.get("varr")
    with pytest.raises(ValueError, match="no hyper-parameter alpha"):
        mitigation.get("var", alpha=2)
