"""routed_attention / region_routing against the float64 reference and BiFormer's official semantics."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from attnzoo.kernels import bilevel_routing_attention, region_routing, routed_attention, use_backend
from attnzoo.kernels.reference import routed_attention_reference

BACKENDS = ["torch", "flex", "triton"]


def _inputs(rng, b, h, w, heads, dqk, dv, dtype=torch.float32):
    q = torch.randn(b, h, w, heads, dqk, generator=rng).to(dtype).requires_grad_()
    k = torch.randn(b, h, w, heads, dqk, generator=rng).to(dtype).requires_grad_()
    v = torch.randn(b, h, w, heads, dv, generator=rng).to(dtype).requires_grad_()
    return q, k, v


def _random_index(rng, b, regions, topk):
    """Distinct regions per row, in random order (as torch.topk gives distinct indices)."""
    return torch.stack([torch.stack([torch.randperm(regions, generator=rng)[:topk] for _ in range(regions)])
                        for _ in range(b)])


def _check_against_reference(q, k, v, index, num_regions, backend, scale=None, grad_scale=4.0):
    ref = routed_attention_reference(q, k, v, index, num_regions, scale=scale)
    if backend == "flex":  # FlexAttention has no backward on the CPU; its backward is checked on the GPU
        with use_backend(backend):
            out = routed_attention(q.detach(), k.detach(), v.detach(), index, num_regions, scale=scale)
        assert_close(out, ref, dtype=q.dtype)
        return
    with use_backend(backend):
        out = routed_attention(q, k, v, index, num_regions, scale=scale)
    assert_close(out, ref, dtype=q.dtype, msg=f"forward, {backend}")
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    want = torch.autograd.grad(ref, (q, k, v), grad)
    # gradients go through two more rounded matmuls than the output: a few ulps more
    for name, g, r in zip("qkv", got, want):
        assert_close(g, r, dtype=q.dtype, scale=grad_scale, msg=f"d{name}, {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("b", "h", "w", "nreg", "topk", "dqk", "dv"), [
    (2, 8, 12, (2, 3), 2, 16, 16),    # non-square map and region grid, batch > 1
    (1, 4, 6, (2, 3), 1, 8, 24),      # topk = 1, d_v != d_qk
    (1, 6, 6, 3, 4, 16, 8),           # 2x2-token regions, several regions per key tile
    (1, 12, 12, (1, 2), 2, 16, 16),   # 72-token regions: several query and key chunks per region
])
def test_routed_matches_reference(rng, backend, b, h, w, nreg, topk, dqk, dv):
    nh, nw = (nreg, nreg) if isinstance(nreg, int) else nreg
    q, k, v = _inputs(rng, b, h, w, 2, dqk, dv)
    index = _random_index(rng, b, nh * nw, topk)
    _check_against_reference(q, k, v, index, nreg, backend, scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_all_regions_is_full_attention(rng, backend):
    q, k, v = _inputs(rng, 1, 4, 8, 2, 16, 16)
    index = _random_index(rng, 1, 4, 4)
    q, k, v = q.detach(), k.detach(), v.detach()
    with use_backend(backend):
        out = routed_attention(q, k, v, index, (2, 2))
    flat = [t.double().flatten(1, 2).transpose(1, 2) for t in (q, k, v)]
    full = torch.nn.functional.scaled_dot_product_attention(*flat).transpose(1, 2).reshape(out.shape)
    assert_close(out, full, msg=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_repeated_region_counts_twice(rng, backend):
    """A region named twice weighs twice, exactly as the official gather does."""
    q, k, v = _inputs(rng, 1, 4, 4, 1, 16, 16)
    index = torch.tensor([[[0, 0, 1], [3, 2, 3], [1, 1, 1], [2, 3, 0]]])
    _check_against_reference(q, k, v, index, 2, backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("size", "nreg", "topk"), [
    (8, 2, 2),   # 16-token regions: the sparse kernels
    (6, 3, 4),   # 2x2-token regions, 4 of 9 routed: the dense region-masked kernels
])
def test_routed_triton_half(rng, dtype, size, nreg, topk):
    q, k, v = _inputs(rng, 1, size, size, 2, 16, 16, dtype)
    index = _random_index(rng, 1, nreg * nreg, topk)
    _check_against_reference(q, k, v, index, nreg, "triton")


def test_region_routing_matches_official_semantics(rng):
    """TopkRouting of bra_legacy.py restated: region means, (q * scale) @ k^T, top-k, softmax of kept logits."""
    q = torch.randn(2, 6, 8, 12, generator=rng, dtype=torch.float64)
    k = torch.randn(2, 6, 8, 12, generator=rng, dtype=torch.float64)
    weight, index = region_routing(q, k, (3, 2), topk=3)
    for b in range(2):
        regions_q, regions_k = [], []
        for ry in range(3):
            for rx in range(2):
                regions_q.append(q[b, ry * 2:ry * 2 + 2, rx * 4:rx * 4 + 4].reshape(-1, 12).mean(0))
                regions_k.append(k[b, ry * 2:ry * 2 + 2, rx * 4:rx * 4 + 4].reshape(-1, 12).mean(0))
        logits = torch.stack(regions_q) * 12 ** -0.5 @ torch.stack(regions_k).T
        top = logits.sort(-1, descending=True)
        torch.testing.assert_close(index[b], top.indices[:, :3])
        torch.testing.assert_close(weight[b], top.values[:, :3].softmax(-1))
    assert index.dtype == torch.int64


def test_routing_then_attention_gradients_flow(rng):
    q, k, v = _inputs(rng, 1, 4, 4, 2, 8, 8)
    weight, index = region_routing(q.flatten(3), k.flatten(3), 2, topk=2)
    assert weight.requires_grad and not index.requires_grad
    out = routed_attention(q, k, v, index, 2, scale=16 ** -0.5)
    out.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None


def test_routed_errors_name_the_fix(rng):
    q = torch.randn(1, 6, 8, 2, 8)
    with pytest.raises(ValueError, match=r"height 6 is not divisible by 4 regions; pad it by 2"):
        routed_attention(q, q, q, torch.zeros(1, 16, 1, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"region_index must be \(batch, nh\*nw, topk\)"):
        routed_attention(q, q, q, torch.zeros(1, 5, 1, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"values must lie in \[0, 4\)"):
        routed_attention(q, q, q, torch.full((1, 4, 1), 4), 2)
    with pytest.raises(ValueError, match=r"topk 5 must lie in \[1, 4\]"):
        region_routing(q.flatten(3), q.flatten(3), 2, topk=5)
    with pytest.raises(ValueError, match=r"width 8 is not divisible by 3 regions; pad it by 1"):
        region_routing(q.flatten(3)[:, :3], q.flatten(3)[:, :3], 3, topk=1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_views_of_a_fused_qkv(rng, backend):
    """q, k, v as chunks of one fused projection (non-contiguous views), as BiFormer produces them."""
    qkv = torch.randn(1, 8, 8, 3, 2, 16, generator=rng).requires_grad_()
    q, k, v = qkv.unbind(3)
    assert not q.is_contiguous()
    index = _random_index(rng, 1, 4, 2)
    ref = routed_attention_reference(q, k, v, index, 2)
    with use_backend(backend):
        out = routed_attention(q, k, v, index, 2)
    assert_close(out, ref, dtype=torch.float32)
    grad = torch.randn_like(ref)
    (got,) = torch.autograd.grad(out, qkv, grad.float())
    (want,) = torch.autograd.grad(ref, qkv, grad)
    assert_close(got, want, dtype=torch.float32, scale=4.0, msg="d(qkv) through strided views")


@pytest.fixture(params=["sparse", "dense"])
def small_region_path(request, monkeypatch):
    """Runs a test with the sparse kernels or the dense region-masked ones wherever the shape allows them
    (16-query tiles, key tiles of 32 forward and 16 backward, so that maps span several of each)."""
    from attnzoo.kernels import _routed_triton

    if request.param == "sparse":
        monkeypatch.setattr(_routed_triton, "DENSE_MIN_ROUTED_FRACTION", 2.0)
    else:
        monkeypatch.setattr(_routed_triton, "DENSE_MIN_ROUTED_FRACTION", 0.0)
        monkeypatch.setattr(_routed_triton, "DENSE_BLOCK_M", 16)
        monkeypatch.setattr(_routed_triton, "DENSE_BLOCK_N", 32)
        monkeypatch.setattr(_routed_triton, "DENSE_BWD_BLOCK_N", 16)
    return request.param


@pytest.mark.parametrize(("b", "h", "w", "nreg", "topk"), [
    (2, 6, 8, (3, 4), 1),     # 2x2-token regions (BiFormer stage 3), non-square, topk = 1
    (1, 6, 4, (3, 2), 6),     # 2x2-token regions, topk = all regions
    (1, 4, 12, (2, 2), 3),    # 2x6-token regions: several regions per key tile
    (1, 6, 9, (2, 3), 4),     # 3x3-token regions: key tiles start inside a region
    (1, 5, 6, (5, 3), 4),     # 1x2-token regions: sparse dk/dv programs of 8 key regions, the last group short
    (1, 4, 5, (4, 5), 3),     # 1-token regions: dk/dv programs of 16 key regions
    (1, 8, 8, (4, 2), 3),     # 2x4-token regions: dk/dv programs of 2 key regions
])
def test_routed_triton_small_regions(rng, small_region_path, b, h, w, nreg, topk):
    q, k, v = _inputs(rng, b, h, w, 2, 16, 8)
    index = _random_index(rng, b, nreg[0] * nreg[1], topk)
    _check_against_reference(q, k, v, index, nreg, "triton", scale=0.4)


def test_routed_triton_repeats_small_regions(rng, small_region_path):
    """Repeated regions (a multiplicity > 1 in the inverse routing table, a counted weight in the dense masks)
    with 2x2-token regions; rows without repeats in the same call."""
    q, k, v = _inputs(rng, 1, 4, 6, 2, 16, 16)
    index = torch.tensor([[[0, 0, 5], [3, 3, 3], [1, 2, 1], [4, 5, 0], [2, 2, 5], [5, 1, 5]]])
    _check_against_reference(q, k, v, index, (2, 3), "triton")


def test_routed_triton_dense_masks_64_regions(rng, monkeypatch):
    """The dense region-masked kernels at their limit of 64 regions (the routing word's top bit in use), with
    their default tiles, 2x2-token regions and topk 16 as at BiFormer stage 3; repeat-free rows (the bit masks)
    and, in two query tiles, one row naming a region several times (counted weights for those tiles)."""
    from attnzoo.kernels import _routed_triton

    assert _routed_triton._dense_tiles(64, 4, 16) is not None
    q, k, v = _inputs(rng, 1, 16, 16, 1, 16, 16)
    index = _random_index(rng, 1, 64, 16)
    if 63 not in index[0, 63]:
        index[0, 63, 0] = 63  # still distinct
    index[0, 5, :3] = 63  # the word's top bit, named three times
    index[0, 40, :2] = 7  # a region of the low half twice
    _check_against_reference(q, k, v, index, 8, "triton", scale=0.3)


def test_routed_triton_path_choice():
    """Dense masks only for at most 64 regions of under 16 tokens with a routed fraction of at least 1/4."""
    from attnzoo.kernels._routed_triton import _dense_tiles

    assert _dense_tiles(49, 4, 16) is not None      # BiFormer stage 3 at 224
    assert _dense_tiles(49, 16, 4) is None          # stage 2: 16-token regions, sparse
    assert _dense_tiles(256, 4, 16) is None         # stage 3 at 512: 256 regions
    assert _dense_tiles(49, 4, 1) is None           # topk 1 of 49: sparse
    assert _dense_tiles(49, 1, 16) is None          # 1-token regions: a key tile spans too many regions


@pytest.mark.parametrize("r", [300, 200])
def test_routed_inverse_table(rng, r):
    """The inverse routing table kernel against a plain loop: many regions (several key chunks; 300 rows: a
    counting pass over two row tiles, then a placing pass; 200: one tile, read once) and repeated regions."""
    from attnzoo.kernels._routed_triton import _routed_inverse

    b, topk = 2, 4
    idx = torch.randint(0, r, (b, r, topk), generator=rng)
    idx[1, 7, 1:] = 3  # region 3 named three times by query region 7
    starts, counts = torch.empty(b, r, dtype=torch.int32), torch.empty(b, r, dtype=torch.int32)
    qlist = torch.empty(b * r * topk, dtype=torch.int32)
    _routed_inverse[(-(-r // 32), b)](idx, starts, counts, qlist, *idx.stride(), r, TOPK=topk, KP=topk,
                                             SB=32, RQ=256, ONE_TILE=r <= 256)
    for bi in range(b):
        for s in range(r):
            want = (idx[bi] == s).nonzero()[:, 0].tolist()  # query regions in order, one per choice
            got = qlist[starts[bi, s]:starts[bi, s] + counts[bi, s]].tolist()
            assert got == want, (bi, s)
        assert starts[bi, 0] == bi * r * topk
    assert qlist[starts[1, 3]:starts[1, 3] + counts[1, 3]].tolist().count(7) == 3


@pytest.mark.parametrize("one_kernel", [True, False])
@pytest.mark.parametrize(("b", "h", "w", "c", "nreg", "topk"), [
    (2, 12, 12, 80, (6, 6), 5),   # 36 regions (several row blocks), channels over one chunk
    (1, 18, 18, 24, (1, 2), 2),   # 162-token regions (several token chunks), topk = all
    (2, 6, 8, 16, (3, 4), 1),     # 2x2-token regions, topk = 1
    (2, 8, 16, 80, (4, 4), 3),    # 2x4-token regions, channels in a full and a partial slice
])
def test_region_routing_triton_matches_torch(rng, monkeypatch, one_kernel, b, h, w, c, nreg, topk):
    """The fused routing (triton backend, no gradient; one kernel where the shape allows it, or region means
    then top-k) picks the torch ops' regions in the same order."""
    from attnzoo.kernels import _routed_triton

    monkeypatch.setattr(_routed_triton, "FUSED_ROUTING_MAX_ELEMENTS", 1 << 30 if one_kernel else 0)
    q = torch.randn(b, h, w, c, generator=rng)
    k = torch.randn(b, h, w, c, generator=rng)
    weight, index = region_routing(q, k, nreg, topk, scale=0.3)
    with use_backend("triton"):
        got_weight, got_index = region_routing(q, k, nreg, topk, scale=0.3)
    assert got_index.dtype == torch.int64 and got_index.shape == index.shape
    torch.testing.assert_close(got_index, index)
    assert_close(got_weight, weight, dtype=torch.float32)
    with use_backend("triton"):  # a gradient is needed: the differentiable torch ops run instead
        w_grad, _ = region_routing(q.requires_grad_(), k, nreg, topk, scale=0.3)
    assert w_grad.requires_grad


def test_region_routing_triton_half_inputs_and_ties(rng):
    """bf16 inputs: the fused routing equals the torch ops on the same values in fp32 (it keeps fp32 means and
    logits); equal logits go to the lower region id."""
    q = torch.randn(2, 8, 8, 32, generator=rng).bfloat16()
    k = torch.randn(2, 8, 8, 32, generator=rng).bfloat16()
    with use_backend("triton"):
        weight, index = region_routing(q, k, 4, 5)
    want_weight, want_index = region_routing(q.float(), k.float(), 4, 5)
    torch.testing.assert_close(index, want_index)
    assert weight.dtype == torch.bfloat16
    assert_close(weight, want_weight, dtype=torch.bfloat16)
    flat = torch.ones(1, 4, 4, 16)
    with use_backend("triton"):
        _, index = region_routing(flat, -flat, 2, 3)
    assert index.tolist() == [[[0, 1, 2]] * 4]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("b", "h", "w", "heads", "nreg", "topk"), [
    (2, 14, 14, 3, 7, 16),        # BiFormer stage 3 at 224 (2x2-token regions): the routing-words path
    (1, 9, 12, 12, (3, 4), 4),    # 3x3-token regions, more heads than a group's rows: routing words
    (1, 7, 7, 2, 7, 13),          # 1-token regions: routing kernel, then routed_attention
    (2, 8, 8, 2, 2, 1),           # 16-token regions, topk 1
])
def test_bilevel_routing_attention(rng, backend, b, h, w, heads, nreg, topk):
    """Both stages in one call: the index equals region_routing's on the detached q, k over all heads'
    channels (in order), and out and the gradients equal the float64 reference on that index."""
    q, k, v = _inputs(rng, b, h, w, heads, 16, 16)
    _, want_index = region_routing(q.detach().flatten(3), k.detach().flatten(3), nreg, topk)
    with use_backend(backend):
        out, index = bilevel_routing_attention(q, k, v, nreg, topk, scale=0.3)
    assert index.dtype == torch.int64 and not index.requires_grad
    torch.testing.assert_close(index, want_index)
    ref = routed_attention_reference(q, k, v, index, nreg, scale=0.3)
    assert_close(out, ref, dtype=q.dtype, msg=f"forward, {backend}")
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, g, r in zip("qkv", got, want):
        assert_close(g, r, dtype=q.dtype, scale=4.0, msg=f"d{name}, {backend}")


def test_bilevel_routing_words_kernels(rng):
    """The routing-words kernels: bit s of a query region's word is set exactly for the regions of its top-k,
    the index is in decreasing affinity, bf16 inputs pick the fp32 torch ops' regions on the same values."""
    from attnzoo.kernels._routed_triton import routing_words

    q = torch.randn(2, 14, 14, 4, 16, generator=rng).bfloat16()
    k = torch.randn(2, 14, 14, 4, 16, generator=rng).bfloat16()
    index, words = routing_words(q, k, 7, 7, 16)
    _, want = region_routing(q.float().flatten(3), k.float().flatten(3), 7, 16)
    torch.testing.assert_close(index, want)
    bits = torch.zeros(2, 49, 64, dtype=torch.int64).scatter_(2, index, 1)
    assert torch.equal(words[..., 0], (bits << torch.arange(64)).sum(-1))
    assert torch.equal(words[..., 1], torch.zeros_like(words[..., 1]))


def test_bilevel_routing_attention_half_and_errors(rng):
    """bf16 on the routing-words path against float64 on its own index; shape errors name the fix."""
    q, k, v = _inputs(rng, 1, 14, 14, 2, 32, 32, dtype=torch.bfloat16)
    with use_backend("triton"):
        out, index = bilevel_routing_attention(q, k, v, 7, 16)
    ref = routed_attention_reference(q.double(), k.double(), v.double(), index, 7)
    assert_close(out, ref, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="pad it by 1"):
        bilevel_routing_attention(q[:, :13], k[:, :13], v[:, :13], 7, 16)
    with pytest.raises(ValueError, match=r"topk 50 must lie in \[1, 49\]"):
        bilevel_routing_attention(q, k, v, 7, 50)
