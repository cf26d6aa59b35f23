"""The fused Triton kernels under torch.compile: no graph breaks, same outputs and gradients as eager.

The fused paths are torch.library custom ops (``attnzoo::na_forward`` ...); ``fullgraph=True`` raises on any
graph break, so each compiled call below is also the graph-break check. ``aot_eager`` traces forward and
backward through the fake implementations and the registered autograd formula, then runs the same kernels:
results must equal the eager call's. Kernels run in the Triton interpreter (conftest), so shapes are tiny.
"""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import assert_close

import attnzoo  # noqa: F401  (registers the timm models)
from attnzoo.kernels import halo_attention, na1d, na2d, na3d, region_routing, routed_attention, use_backend
from attnzoo.kernels.na import _na_backward_op, _na_forward_op
from attnzoo.vision import use_fused_attention
from attnzoo.vision.biformer import BiLevelRoutingAttention
from attnzoo.vision.halonet import FusedHaloAttn


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _leaf(rng: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=rng)).requires_grad_()


def _compare_compiled(fn, inputs: list[torch.Tensor]) -> None:
    """Run ``fn`` eagerly and compiled (fullgraph, aot_eager) on the triton backend; outputs and the
    gradients of a loss over every output must agree."""

    def loss_and_grads(f):
        outs = f(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs)
        grads = torch.autograd.grad(loss, [t for t in inputs if t.requires_grad])
        return [o.detach() for o in outs], grads

    with use_backend("triton"):
        want_outs, want_grads = loss_and_grads(fn)
        got_outs, got_grads = loss_and_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"))
    for i, (got, want) in enumerate(zip(got_outs, want_outs)):
        assert_close(got, want, msg=f"output {i}")
    assert len(got_grads) == len(want_grads)
    for i, (got, want) in enumerate(zip(got_grads, want_grads)):
        assert want.abs().sum() > 0, f"gradient {i} is zero: the check would be vacuous"
        assert_close(got, want, msg=f"gradient of input {i}")


def test_na2d_compiles_with_rpb_extras_gqa_and_lse(rng):
    """rpb, dilation, GQA, additional keys/values and the returned lse (its gradient folds into the backward)."""
    q, k, v = _leaf(rng, 1, 6, 5, 2, 16), _leaf(rng, 1, 6, 5, 1, 16), _leaf(rng, 1, 6, 5, 1, 16)
    rpb, extra_k, extra_v = _leaf(rng, 2, 5, 5, scale=0.5), _leaf(rng, 1, 2, 1, 16), _leaf(rng, 1, 2, 1, 16)

    def fn(q, k, v, rpb, extra_k, extra_v):
        return na2d(q, k, v, 3, dilation=(2, 1), rpb=rpb, additional_keys=extra_k, additional_values=extra_v,
                    return_lse=True)

    _compare_compiled(fn, [q, k, v, rpb, extra_k, extra_v])


def test_na1d_frozen_rpb_strided_and_causal_compile(rng):
    """A frozen rpb (no gradient asked for it) with strided windows, and per-axis causal masking; the output
    is used without its lse."""
    q, k, v = (_leaf(rng, 1, 13, 2, 16) for _ in range(3))
    rpb = 0.5 * torch.randn(2, 9, generator=rng)
    _compare_compiled(lambda q, k, v: na1d(q, k, v, 5, stride=2, rpb=rpb), [q, k, v])
    _compare_compiled(lambda q, k, v: na1d(q, k, v, 4, dilation=2, is_causal=True, scale=0.3), [q, k, v])


def test_na3d_compiles(rng):
    q, k, v = (_leaf(rng, 1, 2, 4, 4, 1, 16) for _ in range(3))
    rpb = _leaf(rng, 1, 3, 5, 5, scale=0.5)
    _compare_compiled(lambda q, k, v, rpb: na3d(q, k, v, (2, 3, 3), rpb=rpb), [q, k, v, rpb])


def test_routed_attention_compiles_with_routing(rng):
    """Routing (region means, top-k) and the fused token-to-token stage in one graph, as in BiFormer."""
    q, k, v = _leaf(rng, 1, 8, 12, 2, 16), _leaf(rng, 1, 8, 12, 2, 16), _leaf(rng, 1, 8, 12, 2, 8)

    def fn(q, k, v):
        _, index = region_routing(q.detach().flatten(3), k.detach().flatten(3), (2, 3), topk=2)
        return routed_attention(q, k, v, index, (2, 3), scale=0.2)

    _compare_compiled(fn, [q, k, v])


@pytest.mark.parametrize(("block_stride", "position_logits"), [(1, False), (2, True)])
def test_halo_attention_compiles(rng, block_stride, position_logits):
    """Without position tables, and with them (their gradient through the fused backward), query subsampling
    and scaled position logits."""
    q = _leaf(rng, 1, 8 // block_stride, 8 // block_stride, 2, 16)
    k, v = _leaf(rng, 1, 8, 8, 2, 16), _leaf(rng, 1, 8, 8, 2, 8)
    tables = [_leaf(rng, 2 * 6 - 1, 16, scale=0.3) for _ in range(2)] if position_logits else []

    def fn(q, k, v, *tables):
        rel_h, rel_w = tables or (None, None)
        return halo_attention(q, k, v, 4, 1, rel_h, rel_w, block_stride=block_stride,
                              scale_pos_embed=position_logits)

    _compare_compiled(fn, [q, k, v, *tables])


def test_tiny_dinat_compiles_as_one_graph():
    """A reduced DiNAT (dilated and plain layers, padded small maps) compiles with ``fullgraph=True`` (the
    stricter form of ``torch._dynamo.explain`` reporting 0 graph breaks, at half its cost) into one graph."""
    torch.manual_seed(0)
    model = timm.create_model("dinat_tiny", depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), embed_dim=16,
                              dilations=((2,), (1,), (1,), (1,)), kernel_size=3, num_classes=4).eval()
    img = torch.randn(1, 3, 24, 20, generator=torch.Generator().manual_seed(1))
    graphs = []

    def count_graphs(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    with use_backend("triton"), torch.no_grad():
        want = model(img)
        got = torch.compile(model, fullgraph=True, backend=count_graphs)(img)
    assert len(graphs) == 1
    na_calls = [n for n in graphs[0].graph.nodes if n.target is torch.ops.attnzoo.na_forward]
    assert len(na_calls) == 4  # one per block: the fused kernels are in the graph, not around it
    assert_close(got, want)


class _GraphCaptured(Exception):
    pass


@pytest.mark.parametrize(("name", "size", "op", "layer"), [
    ("biformer_tiny", 224, "routed_forward", BiLevelRoutingAttention),
    ("halonet26t", 256, "halo_forward", FusedHaloAttn),
])
def test_full_size_models_trace_as_one_graph(name, size, op, layer):
    """BiFormer (routing inside the model) and timm's HaloNet on the fused halo kernel, full size: dynamo
    captures one graph holding every fused attention call. The graph is not run (the interpreter would take
    minutes); the backend only inspects it."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    if layer is FusedHaloAttn:
        use_fused_attention(model)
    graphs = []

    def capture(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)

        def do_not_run(*args):
            raise _GraphCaptured

        return do_not_run

    with use_backend("triton"), torch.no_grad(), pytest.raises(_GraphCaptured):
        torch.compile(model, fullgraph=True, backend=capture)(torch.randn(1, 3, size, size))
    calls = [n for n in graphs[0].graph.nodes if n.target is getattr(torch.ops.attnzoo, op)]
    assert len(graphs) == 1
    assert len(calls) == sum(isinstance(m, layer) for m in model.modules()) > 0


def test_opcheck_custom_ops(rng):
    """torch.library.opcheck: schema, fake tensor shapes and strides, autograd registration, AOT dispatch."""
    q, k, v = _leaf(rng, 1, 7, 2, 16), _leaf(rng, 1, 7, 1, 16), _leaf(rng, 1, 7, 1, 16)
    rpb, extra_k, extra_v = _leaf(rng, 2, 5, scale=0.5), _leaf(rng, 1, 2, 1, 16), _leaf(rng, 1, 2, 1, 16)
    geometry = ([3], [1], [2], [False], 0.25)
    torch.library.opcheck(_na_forward_op, (q, k, v, rpb, extra_k, extra_v, *geometry))
    with torch.no_grad():
        out, lse = _na_forward_op(q, k, v, rpb, extra_k, extra_v, *geometry)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    plain = [t.detach() for t in (q, k, v, out, lse, rpb, extra_k, extra_v)]
    # the backward op has no autograd of its own: its schema and fake implementation are what compile needs
    torch.library.opcheck(_na_backward_op, (grad_out, grad_lse, *plain, *geometry, True),
                          test_utils=("test_schema", "test_faketensor"))

    # routed / halo: AOT dispatch (the costly part) is what their compile tests above run, on real checks
    cheap = ("test_schema", "test_autograd_registration", "test_faketensor")
    q, k, v = _leaf(rng, 1, 4, 4, 1, 16), _leaf(rng, 1, 4, 4, 1, 16), _leaf(rng, 1, 4, 4, 1, 16)
    index = torch.tensor([[[1], [0], [3], [2]]])
    torch.library.opcheck(torch.ops.attnzoo.routed_forward.default, (q, k, v, index, 2, 2, 0.25), test_utils=cheap)
    qr = _leaf(rng, 1, 4, 4, 1, 2 * (2 * 4 - 1))
    torch.library.opcheck(torch.ops.attnzoo.halo_forward.default, (q, k, v, qr, 2, 1, 1, 0.25, 1.0),
                          test_utils=cheap)
