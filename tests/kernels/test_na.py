"""Neighborhood attention: the float64 reference's semantics, validation, and the torch backend."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

import attnzoo.kernels as K
from attnzoo.kernels import na1d, na2d, na3d
from attnzoo.kernels._na_torch import axis_neighbors
from attnzoo.kernels.reference import na_reference, na_window_positions

NA = {1: na1d, 2: na2d, 3: na3d}


# --- semantics of the reference, checked by hand-worked examples and invariants ---------------------------

@pytest.mark.parametrize("index,expected", [(0, [0, 2, 4]), (1, [1, 3, 5]), (2, [0, 2, 4]), (4, [2, 4, 6]),
                                            (5, [1, 3, 5]), (6, [2, 4, 6])])
def test_window_dilated_borders_by_hand(index, expected):
    # length 7, kernel 3, dilation 2: sub-grids {0,2,4,6} and {1,3,5}; windows shift inside each sub-grid.
    assert na_window_positions(index, 7, 3, 1, 2, False) == expected


def test_window_causal_and_strided_by_hand():
    assert [na_window_positions(i, 5, 3, 1, 1, True) for i in range(5)] == [[0], [0, 1], [0, 1, 2], [1, 2, 3],
                                                                             [2, 3, 4]]
    # stride 2: queries (0,1), (2,3), ... share the window of the group's centre query (the right one).
    assert [na_window_positions(i, 8, 3, 2, 1, False) for i in range(8)] == [
        [0, 1, 2], [0, 1, 2], [2, 3, 4], [2, 3, 4], [4, 5, 6], [4, 5, 6], [5, 6, 7], [5, 6, 7]]
    # causal stride 2: the leader is the group's last query; the window still ends at the query itself.
    assert [na_window_positions(i, 6, 3, 2, 1, True) for i in range(6)] == [
        [0], [0, 1], [1, 2], [1, 2, 3], [3, 4], [3, 4, 5]]
    # even kernel: one more key on the left of the centre.
    assert na_window_positions(3, 8, 4, 1, 1, False) == [1, 2, 3, 4]


@pytest.mark.parametrize("length,ks,dil", [(9, 3, 1), (13, 5, 2), (12, 4, 3), (7, 7, 1), (10, 2, 5)])
def test_window_invariants(length, ks, dil):
    for i in range(length):
        w = na_window_positions(i, length, ks, 1, dil, False)
        assert len(w) == ks and i in w, (i, w)
        assert all(x % dil == i % dil and 0 <= x < length for x in w)
        assert all(b - a == dil for a, b in zip(w, w[1:]))
        r = ks // 2
        if r * dil <= i < length - (ks - 1 - r) * dil:  # interior: centred on the query
            assert w[r] == i


def test_axis_tables_match_reference_windows():
    for length, ks, s, d, c in [(11, 3, 1, 2, False), (10, 4, 3, 1, False), (9, 5, 2, 1, True), (14, 3, 3, 3, True)]:
        keys, valid, rel = axis_neighbors(length, ks, s, d, c)
        for i in range(length):
            w = na_window_positions(i, length, ks, s, d, c)
            assert keys[i][valid[i]].tolist() == w
            assert ((keys[i][valid[i]] - i) // d + ks - 1 == rel[i][valid[i]]).all()


# --- torch backend against the float64 reference ------------------------------------------------------------

CASES = [
    # na_dim, spatial, kernel, stride, dilation, causal, heads, kv_heads, head_dim, rpb, n_extra
    (1, (19,), 5, 1, 3, False, 2, 2, 8, True, 0),
    (1, (16,), 6, 2, 1, True, 4, 1, 8, False, 3),
    (2, (7, 9), (3, 5), 1, (2, 1), False, 2, 1, 16, True, 0),
    (2, (8, 6), 3, (2, 3), 1, (True, False), 2, 2, 8, False, 2),
    (2, (6, 7), (4, 2), (1, 2), 1, False, 3, 3, 8, False, 1),
    (3, (4, 5, 6), 3, 1, (1, 1, 2), (False, True, False), 2, 2, 8, False, 0),
    (3, (5, 3, 4), (3, 3, 2), (2, 1, 1), 1, False, 4, 2, 8, True, 2),
]


def _inputs(case, dtype, rng, requires_grad=False, batch=2):
    na_dim, spatial, ks, stride, dil, causal, heads, kv_heads, dim, with_rpb, n_extra = case
    q = torch.randn(batch, *spatial, heads, dim, generator=rng, dtype=dtype)
    k = torch.randn(batch, *spatial, kv_heads, dim, generator=rng, dtype=dtype)
    v = torch.randn(batch, *spatial, kv_heads, dim, generator=rng, dtype=dtype)
    kst = ks if isinstance(ks, tuple) else (ks,) * na_dim
    rpb = torch.randn(heads, *(2 * x - 1 for x in kst), generator=rng, dtype=torch.float32) if with_rpb else None
    ak = torch.randn(batch, n_extra, kv_heads, dim, generator=rng, dtype=dtype) if n_extra else None
    av = torch.randn(batch, n_extra, kv_heads, dim, generator=rng, dtype=dtype) if n_extra else None
    tensors = dict(q=q, k=k, v=v, rpb=rpb, additional_keys=ak, additional_values=av)
    if requires_grad:
        for t in tensors.values():
            if t is not None:
                t.requires_grad_(True)
    kwargs = dict(kernel_size=ks, stride=stride, dilation=dil, is_causal=causal)
    return tensors, kwargs


def _check_backend(backend, case, dtype, rng, grad_scale=4.0, backward=True, batch=2):
    """Forward output + lse and (with ``backward``) the gradients of every input against the float64 reference."""
    tensors, kwargs = _inputs(case, dtype, rng, requires_grad=backward, batch=batch)
    fn = NA[case[0]]
    with K.use_backend(backend):
        out, lse = fn(**tensors, **kwargs, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_in = {n: (t.detach().double().requires_grad_(True) if t is not None else None) for n, t in tensors.items()}
    ref, ref_lse = na_reference(**ref_in, **kwargs)
    assert_close(out, ref, dtype)
    assert_close(lse, ref_lse, dtype)
    if not backward:
        return
    # The loss uses the logsumexp too, so its gradient path is checked as well.
    grad = torch.randn(ref.shape, generator=rng, dtype=torch.float64)
    grad_lse = torch.randn(ref_lse.shape, generator=rng, dtype=torch.float64)
    ((out.double() * grad).sum() + (lse.double() * grad_lse).sum()).backward()
    ((ref * grad).sum() + (ref_lse * grad_lse).sum()).backward()
    for name, t in tensors.items():
        if t is not None:
            # Gradients sum over a window and go through the softmax's backward: a few more roundings.
            assert_close(t.grad, ref_in[name].grad, dtype, scale=grad_scale, msg=f"grad {name}")


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}d-{i}" for i, c in enumerate(CASES)])
def test_torch_backend_matches_reference(case, rng):
    _check_backend("torch", case, torch.float32, rng)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_backend_half(dtype, rng):
    _check_backend("torch", CASES[2], dtype, rng)


def test_torch_backend_gradcheck():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 5, 4, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 5, 4, 1, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 5, 4, 1, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    rpb = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    ak = torch.randn(1, 2, 1, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    av = torch.randn(1, 2, 1, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    with K.use_backend("torch"):
        assert torch.autograd.gradcheck(
            lambda *t: na2d(*t[:3], (3, 2), dilation=(1, 2), rpb=t[3], additional_keys=t[4],
                            additional_values=t[5]), (q, k, v, rpb, ak, av), fast_mode=True)
        assert torch.autograd.gradcheck(lambda *t: na2d(*t, 3, stride=(2, 1), is_causal=(True, False)), (q, k, v),
                                        fast_mode=True)


def test_default_backend_on_cpu_is_torch_and_kernel_equal_full_attention(rng):
    # kernel_size == the whole axis and no mask: neighborhood attention is plain attention.
    q, k, v = (torch.randn(2, 6, 5, 2, 8, generator=rng) for _ in range(3))
    out = na2d(q, k, v, (6, 5))
    dense = torch.nn.functional.scaled_dot_product_attention(
        *(t.flatten(1, 2).transpose(1, 2) for t in (q, k, v))).transpose(1, 2).reshape(q.shape)
    assert_close(out, dense.double(), torch.float32)
    assert K.resolve_backend(q.device, "na2d") == "torch"


def test_registered_self_checks_pass():
    checks = K.list_checks()
    for name in ("na1d", "na2d", "na3d"):
        out, ref, backend = checks[name](torch.device("cpu"))
        assert backend == "torch"
        assert_close(out, ref, torch.float32)


# --- validation ----------------------------------------------------------------------------------------------

def _qkv(spatial=(7, 7), heads=2, kv_heads=2, dim=8, dtype=torch.float32):
    return (torch.randn(1, *spatial, heads, dim, dtype=dtype), torch.randn(1, *spatial, kv_heads, dim, dtype=dtype),
            torch.randn(1, *spatial, kv_heads, dim, dtype=dtype))


@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel_size=9), r"kernel_size 9 \* dilation 1 = 9 > feature map size 7 on axis 0"),
    (dict(kernel_size=(3, 5), dilation=(1, 2)), r"kernel_size 5 \* dilation 2 = 10 > feature map size 7 on axis 1"),
    (dict(kernel_size=1), r"kernel_size must be >= 2 on every axis, got 1 on axis 0"),
    (dict(kernel_size=(3, 3, 3)), r"kernel_size must be an int or a tuple of 2 ints"),
    (dict(kernel_size=3.0), r"kernel_size must be an int"),
    (dict(kernel_size=3, stride=4), r"stride 4 > kernel_size 3 on axis 0"),
    (dict(kernel_size=3, stride=0), r"stride must be >= 1"),
    (dict(kernel_size=3, dilation=(1, 0)), r"dilation must be >= 1 on every axis, got 0 on axis 1"),
    (dict(kernel_size=3, is_causal=1), r"is_causal must be a bool"),
    (dict(kernel_size=3, scale="x"), r"scale must be a float"),
    (dict(kernel_size=3, rpb=torch.zeros(2, 5, 4)), r"rpb must have shape .* = \(2, 5, 5\), got \(2, 5, 4\)"),
    (dict(kernel_size=3, rpb=torch.zeros(2, 5, 5), is_causal=(False, True)), r"rpb cannot be combined with causal"),
    (dict(kernel_size=3, additional_keys=torch.zeros(1, 2, 2, 8)), r"together"),
    (dict(kernel_size=3, additional_keys=torch.zeros(1, 2, 2, 8), additional_values=torch.zeros(1, 3, 2, 8)),
     r"token counts differ: 2 != 3"),
    (dict(kernel_size=3, additional_keys=torch.zeros(1, 2, 1, 8), additional_values=torch.zeros(1, 2, 1, 8)),
     r"additional_keys must have shape"),
    (dict(kernel_size=3, additional_keys=torch.zeros(1, 2, 2, 8, dtype=torch.float64),
          additional_values=torch.zeros(1, 2, 2, 8)), r"additional_keys must be torch.float32"),
])
def test_argument_errors(kwargs, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        na2d(q, k, v, **kwargs)


def test_rpb_rejected_with_causal():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"rpb cannot be combined with causal masking"):
        na2d(q, k, v, 3, rpb=torch.zeros(2, 5, 5), is_causal=(False, True))


def test_tensor_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q must be 4-D"):
        na1d(q, k, v, 3)
    with pytest.raises(ValueError, match=r"one dtype"):
        na2d(q, k.double(), v, 3)
    with pytest.raises(ValueError, match=r"k spatial shape \(7, 6\) != q's \(7, 7\)"):
        na2d(q, k[:, :, :6], v, 3)
    with pytest.raises(ValueError, match=r"batch sizes differ"):
        na2d(q, torch.cat([k, k]), v, 3)
    with pytest.raises(ValueError, match=r"head_dim differ: 8 != 4"):
        na2d(q, k[..., :4], v, 3)
    with pytest.raises(ValueError, match=r"kv heads \(3\) must divide q heads \(2\)"):
        q3, k3, v3 = _qkv(kv_heads=3)
        na2d(q3, k3, v3, 3)
    with pytest.raises(ValueError, match=r"k and v must have the same number of heads"):
        na2d(q, k, v[..., :1, :], 3)
    with pytest.raises(ValueError, match=r"floating point"):
        na2d(*(t.long() for t in (q, k, v)), 3)
    with pytest.raises(ValueError, match=r"q must be 6-D"):
        na3d(q, k, v, 3)
    with pytest.raises(ValueError, match=r"must be a torch.Tensor"):
        na2d(q.numpy(), k, v, 3)


def test_remembered_valid_calls_still_reject_invalid_ones():
    """Valid call signatures are remembered (host time); a call differing only in a type, a device/dtype or a
    combination of arguments is still checked in full."""
    q, k, v = _qkv()
    rpb = torch.zeros(2, 5, 5)
    na2d(q, k, v, 3)
    na2d(q, k, v, 3, rpb=rpb)
    na2d(q, k, v, [3, 3])  # a list (unhashable signature): checked every time
    for kwargs, match in [(dict(kernel_size=3.0), r"kernel_size must be an int"),
                          (dict(kernel_size=(3, True)), r"kernel_size must be an int"),
                          (dict(kernel_size=3, scale="x"), r"scale must be a float"),
                          (dict(kernel_size=3, rpb=rpb, is_causal=(False, True)), r"rpb cannot be combined"),
                          (dict(kernel_size=3, rpb=rpb[:1]), r"rpb must have shape"),
                          (dict(kernel_size=[3, 9]), r"kernel_size 9 \* dilation 1 = 9 > feature map size 7")]:
        for _ in range(2):
            with pytest.raises(ValueError, match=match):
                na2d(q, k, v, **kwargs)
    with pytest.raises(ValueError, match=r"one dtype"):
        na2d(q, k.double(), v, 3)


def test_torch_compile_traces_na(rng):
    # Dynamo traces the torch backend; the triton path is a compiler-disabled region (graph break).
    q, k, v = (torch.randn(1, 6, 7, 2, 8, generator=rng) for _ in range(3))
    compiled = torch.compile(lambda q, k, v: na2d(q, k, v, 3, dilation=(2, 1)), backend="eager")
    assert_close(compiled(q, k, v), na_reference(q, k, v, 3, dilation=(2, 1))[0], torch.float32)
