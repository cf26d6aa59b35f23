"""VAR's fused path (key-group attention) against its explicit-weights path, and the runtime's key-group hook.

Both VAR paths are checked against the independent reference in test_var.py with the PyTorch backend; here they
are compared with each other directly, with the Triton kernel (interpreter) in the fused path, on a left-padded
batch (different image positions) at prefill and at every decode step.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from mitigation_testing import PROMPTS, generation_kwargs, images, tiny_pair
from test_var import FIRST, _calibrate

from attnzoo import mitigation
from attnzoo.kernels import use_backend
from attnzoo.mitigation.var import find_sink_dims
from attnzoo.mllm import AttentionPass, Plan


def _run(lvlm, batch, var):
    gen = generation_kwargs(lvlm, new_tokens=3)
    with torch.no_grad(), var.apply(lvlm):
        logits = lvlm.forward(batch).logits
        with lvlm.use_layout(batch.layout):
            out = lvlm.model.generate(**batch.inputs, **gen)
    return logits, out


def test_var_fused_equals_explicit_with_the_triton_kernel():
    lvlm, _ = tiny_pair()
    batch = lvlm.prepare(images(), PROMPTS)
    assert int(batch.layout.num_pad.max()) > 0 and batch.layout.batch_size == 2
    dims = find_sink_dims(lvlm, images(), first_layer=FIRST)
    # the Triton interpreter is slow: VAR edits one layer (2) here instead of two (1 and 2) as in test_var.py
    kw = dict(tau=_calibrate(lvlm, batch, dims), sink_dims=dims, first_layer=2)
    real = batch.layout.attention_mask.bool()

    explicit_var = mitigation.VAR(fused=False, **kw)
    calls = []
    original = explicit_var.edit_weights
    explicit_var.edit_weights = lambda ctx, w: calls.append(ctx.layer) or original(ctx, w)
    explicit, explicit_gen = _run(lvlm, batch, explicit_var)
    assert calls, "the explicit path never ran"

    fused_var = mitigation.VAR(fused=True, **kw)
    combined = []
    original_combine = fused_var.combine_groups
    fused_var.combine_groups = lambda ctx, o, m: combined.append((ctx.layer, ctx.q_length)) or original_combine(
        ctx, o, m)
    with use_backend("triton"):
        fused, fused_gen = _run(lvlm, batch, fused_var)
    assert {q for _, q in combined} == {batch.layout.prompt_length, 1}, "fused path must run at prefill and decode"
    with torch.no_grad():
        plain = lvlm.forward(batch).logits
    assert not torch.allclose(fused[real], plain[real], atol=1e-4), "VAR changed nothing: the test could not fail"
    assert_close(fused[real], explicit[real], torch.float32, msg="prefill logits")
    for step, (a, b) in enumerate(zip(fused_gen.logits, explicit_gen.logits)):
        assert_close(a, b, torch.float32, msg=f"decode step {step}")
    assert torch.equal(fused_gen.sequences, explicit_gen.sequences)


class _GroupSum(AttentionPass):
    """Plans key groups on some heads of one layer and combines them by plain summation: must change nothing."""

    def __init__(self, heads):
        self.heads = heads
        self.seen = 0

    def plan(self, ctx):
        return Plan(key_groups=True, heads=self.heads) if ctx.site == "text" and ctx.layer == 1 else None

    def key_groups(self, ctx):
        ids = (torch.arange(ctx.kv_length, device=ctx.device) % 3).expand(ctx.batch_size, -1)
        return ids, 3

    def combine_groups(self, ctx, outputs, masses):
        self.seen += 1
        assert outputs.shape[1] == masses.shape[1] == len(ctx.heads)
        return outputs.sum(-2)


@pytest.mark.parametrize("heads", [None, [0, 3]], ids=["all", "two"])
def test_key_group_plan_on_head_subsets_is_exact(heads):
    lvlm, _ = tiny_pair()
    batch = lvlm.prepare(images(), PROMPTS)
    real = batch.layout.attention_mask.bool()
    probe = _GroupSum(heads)
    with torch.no_grad():
        plain = lvlm.forward(batch).logits
        with lvlm.attach(probe):
            ours = lvlm.forward(batch).logits
    assert probe.seen == 1
    assert_close(ours[real], plain[real], torch.float32)


def test_key_group_plan_conflicts_with_explicit_weights():
    class Reader(AttentionPass):
        def plan(self, ctx):
            return Plan(weights=True) if ctx.site == "text" else None

        def edit_weights(self, ctx, weights):
            return weights

    lvlm, _ = tiny_pair()
    batch = lvlm.prepare(images(), PROMPTS)
    with lvlm.attach(_GroupSum(None)), lvlm.attach(Reader()), pytest.raises(ValueError, match="attach only one"):
        lvlm.forward(batch)


class _Layout:
    """The two TokenLayout methods VAR reads, for a hand-made batch."""

    def __init__(self, image_mask):
        self.image_mask = image_mask

    def keys(self, mask, kv_length):
        return torch.nn.functional.pad(mask, (0, kv_length - mask.shape[1]), value=False)

    def image_keys(self, kv_length):
        return self.keys(self.image_mask, kv_length)


@pytest.mark.parametrize("q_length,kv_length", [(12, 12), (1, 15)], ids=["prefill", "decode"])
def test_combine_groups_equals_edited_weights_cell_by_cell(q_length, kv_length, rng):
    """Group outputs combined by VAR == attention with VAR's edited weights, on random weights, including a
    sample without visual sinks and one whose image keys are all sinks (no receiver: the budget is dropped)."""
    from attnzoo.kernels.reference import key_group_attention_reference
    from attnzoo.mllm.attention import AttentionContext

    batch, heads, length, dim = 3, 2, 12, 8
    image = torch.zeros(batch, length, dtype=torch.bool)
    image[:, 3:9] = True
    sinks = torch.zeros(batch, length, dtype=torch.bool)
    sinks[0, [0, 4, 5]] = True  # text and visual sinks
    sinks[1, [1]] = True  # text sink only: no visual sink, nothing is selected
    sinks[2, 3:9] = True  # every image key is a sink
    var = mitigation.VAR(sink_dims=(0,), tau=1.0, summ=0.0, rho=1.0)
    var._sinks = {5: sinks}
    ctx = AttentionContext(site="text", layer=5, num_layers=8, num_heads=heads, num_kv_heads=heads, head_dim=dim,
                           batch_size=batch, q_length=q_length, kv_length=kv_length,
                           is_prefill=q_length == kv_length, step=kv_length - length, layout=_Layout(image),
                           image_free=False, module=None, scaling=dim ** -0.5, causal=True,
                           device=torch.device("cpu"))
    q = torch.randn(batch, heads, q_length, dim, generator=rng, dtype=torch.float64)
    k, v = (torch.randn(batch, heads, kv_length, dim, generator=rng, dtype=torch.float64) for _ in range(2))
    ids, groups = var.key_groups(ctx)
    outputs, masses = key_group_attention_reference(q, k, v, ids, groups)
    fused = var.combine_groups(ctx, outputs.float(), masses.float())

    causal = torch.arange(kv_length - q_length, kv_length)[:, None] >= torch.arange(kv_length)[None, :]
    weights = (q @ k.transpose(-1, -2) * dim ** -0.5).masked_fill(~causal, float("-inf")).softmax(-1)
    explicit = var.edit_weights(ctx, weights.float()).double() @ v
    assert_close(fused, explicit, torch.float32)
    changed = (fused.double() - weights @ v).abs().amax((1, 2, 3))
    assert changed[0] > 1e-3 and changed[1] < 1e-6, "sample 0 must be edited, sample 1 (no visual sink) not"
