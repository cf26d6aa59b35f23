"""Neighborhood attention: the fused Triton kernels (forward and backward) against the float64 reference,
under the Triton CPU interpreter (``TRITON_INTERPRET=1``, set by conftest). Shapes are tiny because the
interpreter costs milliseconds per program and per block dot."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from test_na import _check_backend

import attnzoo.kernels as K
from attnzoo.kernels import na1d, na2d
from attnzoo.kernels.reference import na_reference

TRITON_CASES = [
    # na_dim, spatial, kernel, stride, dilation, causal, heads, kv_heads, head_dim, rpb, n_extra
    (1, (19,), 5, 1, 3, False, 2, 1, 16, True, 0),  # dilation with uneven sub-grids, rpb, GQA
    (1, (13,), 6, 2, 1, True, 2, 2, 16, False, 3),  # causal, even kernel, stride, extra tokens
    (2, (7, 9), (3, 5), 1, (2, 1), False, 2, 1, 16, True, 0),  # per-axis dilation, borders, rpb, GQA
    (2, (6, 5), 3, (2, 3), 1, (True, False), 1, 1, 24, False, 2),  # per-axis causal, stride, head_dim 24, extras
    (3, (3, 4, 6), (3, 3, 2), (1, 2, 1), (1, 1, 2), (False, True, False), 2, 1, 16, False, 0),
    (3, (3, 4, 5), 3, 1, 1, False, 1, 1, 16, True, 1),  # rpb + extra token
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=[f"{c[0]}d-{i}" for i, c in enumerate(TRITON_CASES)])
def test_triton_matches_reference(case, rng):
    _check_backend("triton", case, torch.float32, rng, batch=1)


HALF_CASE = (2, (5, 6), 3, 1, (1, 2), False, 2, 1, 16, True, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half(dtype, rng):
    _check_backend("triton", HALF_CASE, dtype, rng, batch=1)


def test_triton_rejects_what_it_cannot_run():
    q = torch.randn(1, 5, 5, 1, 16, dtype=torch.float64)
    with K.use_backend("triton"), pytest.raises(ValueError, match=r"float64"):
        na2d(q, q, q, 3)
    q = torch.randn(1, 5, 5, 1, 16)
    with K.use_backend("triton"), pytest.raises(ValueError, match=r"head_dim_v == head_dim"):
        na2d(q, q, torch.randn(1, 5, 5, 1, 8), 3)


def test_triton_output_only_backward(rng):
    """Without return_lse the logsumexp's gradient arrives as None (not materialised); grads still match."""
    q, k, v = (torch.randn(1, 16, 1, 16, generator=rng, requires_grad=True) for _ in range(3))
    with K.use_backend("triton"):
        out = na1d(q, k, v, 5, dilation=2)
    grad = torch.randn(out.shape, generator=rng)
    out.backward(grad)
    ref_in = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref, _ = na_reference(*ref_in, 5, dilation=2)
    ref.backward(grad.double())
    assert_close(out, ref, torch.float32)
    for t, r in zip((q, k, v), ref_in):
        assert_close(t.grad, r.grad, torch.float32, scale=4.0)


def test_triton_backward_gqa_extra_tokens(rng):
    """Gradients with a loss on the output and the logsumexp: GQA with dilation and rpb in 2-D (batch 2); MQA with
    dilation and extra tokens in 1-D (their delta comes from the dq kernel)."""
    _check_backend("triton", (2, (6, 7), (3, 5), 1, (2, 1), False, 4, 2, 16, True, 0), torch.float32, rng, batch=2)
    _check_backend("triton", (1, (17,), 5, 1, 3, False, 4, 1, 16, False, 2), torch.float32, rng, batch=2)


def test_triton_reads_strided_views(rng):
    """q, k, v as views of one qkv tensor (as NAT builds them) are read in place and give the same result."""
    qkv = torch.randn(1, 5, 6, 3, 2, 16, generator=rng)
    q, k, v = qkv.unbind(3)
    assert not q.is_contiguous()
    with K.use_backend("triton"):
        out = na2d(q, k, v, 3, dilation=(1, 2))
    assert_close(out, na_reference(q, k, v, 3, dilation=(1, 2))[0], torch.float32)


def test_triton_backward_strided_views_and_lse_grad(rng):
    """Gradients reach a packed qkv through strided views, with a loss on both the output and the logsumexp
    (the dq kernel computes delta = rowsum(dO * O) - dlse itself)."""
    qkv = torch.randn(1, 6, 5, 3, 2, 16, generator=rng, requires_grad=True)
    g_out = torch.randn(1, 6, 5, 2, 16, generator=rng)
    g_lse = torch.randn(1, 6, 5, 2, generator=rng)
    with K.use_backend("triton"):
        out, lse = na2d(*qkv.unbind(3), 3, dilation=(2, 1), return_lse=True)
    ((out * g_out).sum() + (lse * g_lse).sum()).backward()
    ref_qkv = qkv.detach().double().requires_grad_(True)
    ref, ref_lse = na_reference(*ref_qkv.unbind(3), 3, dilation=(2, 1))
    ((ref * g_out.double()).sum() + (ref_lse * g_lse.double()).sum()).backward()
    assert_close(out, ref, torch.float32)
    assert_close(lse, ref_lse, torch.float32)
    assert_close(qkv.grad, ref_qkv.grad, torch.float32, scale=4.0)
