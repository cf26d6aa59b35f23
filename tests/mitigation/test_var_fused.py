"""VAR's fused path (key-group attention) against its explicit-weights path, and the runtime's key-group hook.

Both VAR paths are checked against the independent reference in test_var.py with the PyTorch backend; here they
are compared with each other directly, with the Triton kernel (interpreter) in the fused path, on a left-padded
batch (different image positions) at prefill and at every decode step.
"""

from __future__ import annotations

import contextlib

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


def _recording(var, name, log):
    """Wrap ``var.<name>`` so that every call appends ``(layer, q_length)`` to ``log``."""
    original = getattr(var, name)

    def wrapper(ctx, *args):
        log.append((ctx.layer, ctx.q_length))
        return original(ctx, *args)

    setattr(var, name, wrapper)
    return var


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_var_epilogue_equals_group_combine_and_explicit(backend):
    """Three implementations of VAR on a left-padded batch of 2, at prefill and at every decode step: the kernel
    epilogue (var_attention, the default), key-group attention + combine_groups, and explicit weights."""
    lvlm, _ = tiny_pair()
    batch = lvlm.prepare(images(), PROMPTS)
    assert int(batch.layout.num_pad.max()) > 0 and batch.layout.batch_size == 2
    dims = find_sink_dims(lvlm, images(), first_layer=FIRST)
    # the Triton interpreter is slow: VAR edits one layer (2) here instead of two (1 and 2) as in test_var.py
    kw = dict(tau=_calibrate(lvlm, batch, dims), sink_dims=dims, first_layer=2)
    real = batch.layout.attention_mask.bool()

    calls = []
    explicit, explicit_gen = _run(lvlm, batch, _recording(mitigation.VAR(fused=False, **kw), "edit_weights", calls))
    assert calls, "the explicit path never ran"

    epilogue_calls, combine_calls = [], []
    epilogue_var = _recording(mitigation.VAR(fused=True, **kw), "fused_key_groups", epilogue_calls)
    groups_var = _recording(mitigation.VAR(fused=True, **kw), "combine_groups", combine_calls)
    groups_var.fused_key_groups = lambda *args: None  # the runtime falls back to key_groups + combine_groups
    with use_backend(backend):
        epilogue, epilogue_gen = _run(lvlm, batch, epilogue_var)
        grouped, grouped_gen = _run(lvlm, batch, groups_var)
    prompt = batch.layout.prompt_length
    assert {q for _, q in epilogue_calls} == {prompt, 1}, "the fused epilogue must run at prefill and decode"
    assert {q for _, q in combine_calls} == {prompt, 1}, "combine_groups must run at prefill and decode"
    with torch.no_grad():
        plain = lvlm.forward(batch).logits
    assert not torch.allclose(epilogue[real], plain[real], atol=1e-4), "VAR changed nothing: the test could not fail"
    assert_close(epilogue[real], grouped[real], torch.float32, msg="prefill logits: epilogue vs combine_groups")
    assert_close(epilogue[real], explicit[real], torch.float32, msg="prefill logits: epilogue vs explicit")
    for step, (a, b, c) in enumerate(zip(epilogue_gen.logits, grouped_gen.logits, explicit_gen.logits)):
        assert_close(a, b, torch.float32, msg=f"decode step {step}: epilogue vs combine_groups")
        assert_close(a, c, torch.float32, msg=f"decode step {step}: epilogue vs explicit")
    assert torch.equal(epilogue_gen.sequences, explicit_gen.sequences)
    assert torch.equal(grouped_gen.sequences, explicit_gen.sequences)


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


class _CountedLaunch:
    """Stands in for a Triton kernel: each launch runs inside a profiler range, so that the host ops the
    interpreter issues for it (copies to and from numpy) are counted as the one launch a GPU would see."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            with torch.profiler.record_function("triton_launch"):
                return self.kernel[grid](*args, **kwargs)

        return launch


def _host_ops(profile) -> int:
    """Top-level aten ops (not called from inside another aten op or a kernel launch) plus the launches."""
    count = 0
    for event in profile.events():
        if event.name == "triton_launch":
            count += 1
            continue
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not (parent.name.startswith("aten::") or parent.name == "triton_launch"):
            parent = parent.cpu_parent
        count += parent is None
    return count


def test_var_decode_adds_at_most_three_host_ops_per_edited_layer(monkeypatch):
    """Decode is launch-bound on the GPU: VAR's fused path must cost about what SDPA costs per layer. Counts aten
    ops (torch.profiler, CPU) per decode step of the tiny LLaVA with the Triton path, VAR vs no pass."""
    from torch.profiler import ProfilerActivity, profile

    import attnzoo.kernels._grouped_attention_triton as triton_module

    monkeypatch.setattr(triton_module.VAR_LAUNCHES, "kernel", _CountedLaunch(triton_module._var_fwd_kernel))
    lvlm, _ = tiny_pair()
    batch = lvlm.prepare(images(), PROMPTS)
    dims = find_sink_dims(lvlm, images(), first_layer=FIRST)
    var = mitigation.VAR(tau=_calibrate(lvlm, batch, dims), sink_dims=dims, first_layer=FIRST)
    edited = lvlm.num_layers - 1 - FIRST  # the last layer is skipped
    # op counts are deterministic: one decode step more is enough (the Triton interpreter is slow)

    def ops(new_tokens, warm_up=False):
        gen = {**generation_kwargs(lvlm, new_tokens=new_tokens), "output_logits": False}
        if warm_up:  # Triton compiles, caches fill
            lvlm.model.generate(**batch.inputs, **gen)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            lvlm.model.generate(**batch.inputs, **gen)
        return _host_ops(prof), sum(e.name == "triton_launch" for e in prof.events())

    per_step = {}
    with torch.no_grad(), use_backend("triton"), lvlm.use_layout(batch.layout):
        for name in ("no pass", "var"):
            with var.apply(lvlm) if name == "var" else contextlib.nullcontext():
                (short, short_launches), (long, long_launches) = ops(2, warm_up=True), ops(3)
            per_step[name] = long - short
            if name == "var":
                assert long_launches - short_launches == edited, "VAR's kernel must run in every edited layer"
    extra = (per_step["var"] - per_step["no pass"]) / edited
    print(f"aten ops per decode step: no pass {per_step['no pass']}, VAR {per_step['var']} "
          f"({extra:+.1f} per edited layer)")
    assert extra <= 3, per_step
