"""The decode fast path of the attention passes: the ``may_act`` pre-check, asked before any context is built,
lets through exactly the calls a pass acts in, and skipping the others changes no logit (prefill and every
decode step, left-padded batch of 2)."""

from __future__ import annotations

import pytest
import torch
from mitigation_testing import PROMPTS, generation_kwargs, images, tiny_pair
from test_var import FIRST, _calibrate

from attnzoo import mitigation
from attnzoo.mitigation.var import find_sink_dims


def _make(name, lvlm, batch):
    if name.startswith("var"):
        dims = find_sink_dims(lvlm, images(), first_layer=FIRST)
        return mitigation.VAR(tau=_calibrate(lvlm, batch, dims), sink_dims=dims, first_layer=FIRST,
                              fused=name == "var-fused")
    if name == "vhr":
        return mitigation.VHR(layers=(1, 3))
    return mitigation.CCA()


def _recording_plan(pass_obj, log):
    """Wrap ``pass_obj.plan`` so that every call appends ``(site, layer, is_prefill, acted)`` to ``log``."""
    original = pass_obj.plan

    def plan(ctx):
        result = original(ctx)
        log.append((ctx.site, ctx.layer, ctx.is_prefill, result is not None))
        return result

    pass_obj.plan = plan
    return pass_obj


@pytest.mark.parametrize("name", ["var-fused", "var-explicit", "vhr", "cca"])
def test_may_act_lets_through_exactly_the_calls_a_pass_acts_in(name):
    lvlm, _ = tiny_pair()
    batch = lvlm.prepare(images(), PROMPTS)
    gen = generation_kwargs(lvlm, new_tokens=3)

    def run(pass_obj):
        with torch.no_grad(), pass_obj.apply(lvlm):
            logits = lvlm.forward(batch).logits
            with lvlm.use_layout(batch.layout):
                out = lvlm.model.generate(**batch.inputs, **gen)
        return logits, out

    # every call asks plan (as before the pre-check existed); may_act must hold wherever the pass acts
    everywhere, everywhere_log = _make(name, lvlm, batch), []
    checked_may_act = type(everywhere).may_act

    def may_act_always(site, layer, is_prefill):
        return True

    _recording_plan(everywhere, everywhere_log)
    original_plan = everywhere.plan

    def plan_checking_may_act(ctx):
        result = original_plan(ctx)
        if result is not None:
            assert checked_may_act(everywhere, ctx.site, ctx.layer, ctx.is_prefill), (ctx.site, ctx.layer)
        return result

    everywhere.plan, everywhere.may_act = plan_checking_may_act, may_act_always
    logits_all, gen_all = run(everywhere)

    filtered, filtered_log = _make(name, lvlm, batch), []
    logits, out = run(_recording_plan(filtered, filtered_log))

    assert torch.equal(logits, logits_all), "prefill logits differ with the pre-check"
    assert torch.equal(out.sequences, gen_all.sequences)
    for step, (a, b) in enumerate(zip(out.logits, gen_all.logits)):
        assert torch.equal(a, b), f"decode step {step}: logits differ with the pre-check"
    acted_at_decode = {(s, layer) for s, layer, prefill, acted in everywhere_log if acted and not prefill}
    asked_at_decode = {(s, layer) for s, layer, prefill, _ in filtered_log if not prefill}
    assert asked_at_decode == acted_at_decode, "while decoding, plan must be asked exactly where the pass acts"
    skipped = {(s, layer) for s, layer, prefill, _ in everywhere_log if not prefill} - acted_at_decode
    assert skipped, "the pre-check skipped no decode call: the test could not fail"
    if name != "cca":
        assert acted_at_decode, f"{name} must act while decoding"
