"""Neighborhood attention (NAT / DiNAT): ``na1d``, ``na2d``, ``na3d`` with NATTEN's functional API.

Semantics are NATTEN's (https://natten.org): every query attends to the ``prod(kernel_size)`` keys of its
window; windows are shifted inside the map at borders (never zero-padded); ``dilation`` splits each axis
into interleaved sub-grids; ``stride`` makes groups of queries share one window; ``is_causal`` (per axis)
keeps keys at or before the query. On top of NATTEN's current API we keep NAT/DiNAT's relative positional
bias ``rpb`` (old NATTEN semantics), fused into the kernels with its gradient.

Backends (see :func:`attnzoo.kernels.set_backend`): fused Triton kernels on CUDA, a vectorised PyTorch
gather on the CPU, FlexAttention with a block mask for comparison.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._backend import resolve_backend
from ._checks import register_check

__all__ = ["na1d", "na2d", "na3d"]

_AXIS_ARG = int | Sequence[int]
_CAUSAL_ARG = bool | Sequence[bool]


def _per_axis_ints(name: str, value, na_dim: int, minimum: int) -> tuple[int, ...]:
    """Normalise an int-or-tuple argument to a tuple of ``na_dim`` ints >= ``minimum``."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * na_dim
    if len(values) != na_dim or not all(isinstance(x, int) and not isinstance(x, bool) for x in values):
        raise ValueError(f"{name} must be an int or a tuple of {na_dim} ints, got {value!r}")
    for axis, x in enumerate(values):
        if x < minimum:
            raise ValueError(f"{name} must be >= {minimum} on every axis, got {x} on axis {axis}")
    return values


def _per_axis_bools(value, na_dim: int) -> tuple[bool, ...]:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * na_dim
    if len(values) != na_dim or not all(isinstance(x, bool) for x in values):
        raise ValueError(f"is_causal must be a bool or a tuple of {na_dim} bools, got {value!r}")
    return values


def _geometry(fn: str, na_dim: int, spatial: tuple[int, ...], kernel_size, stride, dilation, is_causal):
    """Normalised (kernel_size, stride, dilation, is_causal) per axis, checked against the map size."""
    kernel_size = _per_axis_ints("kernel_size", kernel_size, na_dim, 2)
    stride = _per_axis_ints("stride", stride, na_dim, 1)
    dilation = _per_axis_ints("dilation", dilation, na_dim, 1)
    is_causal = _per_axis_bools(is_causal, na_dim)
    for axis in range(na_dim):
        ks, d, s, length = kernel_size[axis], dilation[axis], stride[axis], spatial[axis]
        if ks * d > length:
            raise ValueError(f"{fn}: kernel_size {ks} * dilation {d} = {ks * d} > feature map size {length} "
                             f"on axis {axis} (spatial shape {spatial}); use a smaller kernel_size or dilation")
        if s > ks:
            raise ValueError(f"{fn}: stride {s} > kernel_size {ks} on axis {axis}; stride must not exceed the "
                             "kernel size")
    return kernel_size, stride, dilation, is_causal


# Every eager call validates its geometry; models repeat a handful of them, so valid ones are remembered
# (host time: a dict lookup instead of ~40 Python checks). Only hashable argument forms are cached.
_VALID_GEOMETRY: dict[tuple, tuple] = {}


def _types(x) -> object:
    # part of the cache key: 7 and 7.0 (or 1 and True) hash alike but only one of them is valid
    return tuple(e.__class__ for e in x) if x.__class__ is tuple else x.__class__


def _checked_geometry(fn, na_dim, spatial, kernel_size, stride, dilation, is_causal):
    args = (kernel_size, stride, dilation, is_causal)
    if torch.compiler.is_compiling() or any(a.__class__ not in (int, bool, tuple) for a in args):
        return _geometry(fn, na_dim, spatial, *args)  # lists are not hashable; traced code checks once anyway
    key = (na_dim, spatial, *args, *map(_types, args))
    hit = _VALID_GEOMETRY.get(key)
    if hit is None:
        hit = _VALID_GEOMETRY[key] = _geometry(fn, na_dim, spatial, *args)
    return hit


def _validate(na_dim: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size, stride, dilation,
              is_causal, scale, rpb, additional_keys, additional_values):
    """Check every argument the way NATTEN does; return the normalised per-axis tuples and the scale."""
    fn = f"na{na_dim}d"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != na_dim + 3:
            raise ValueError(f"{fn}: {name} must be {na_dim + 3}-D (batch, {na_dim} spatial axes, heads, head_dim), "
                             f"got shape {tuple(t.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{fn}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{fn}: q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"{fn}: q, k, v must be floating point, got {q.dtype}")
    q_shape, k_shape, v_shape = q.shape, k.shape, v.shape
    if not (q_shape[0] == k_shape[0] == v_shape[0]):
        raise ValueError(f"{fn}: q, k, v batch sizes differ: {q_shape[0]}, {k_shape[0]}, {v_shape[0]}")
    spatial = tuple(q_shape[1:1 + na_dim])
    for name, t_shape in (("k", k_shape), ("v", v_shape)):
        if t_shape[1:1 + na_dim] != spatial:
            raise ValueError(f"{fn}: {name} spatial shape {tuple(t_shape[1:1 + na_dim])} != q's {spatial}")
    if q_shape[-1] != k_shape[-1]:
        raise ValueError(f"{fn}: q and k head_dim differ: {q_shape[-1]} != {k_shape[-1]}")
    if k_shape[-2] != v_shape[-2]:
        raise ValueError(f"{fn}: k and v must have the same number of heads, got {k_shape[-2]} and {v_shape[-2]}")
    heads, kv_heads = q_shape[-2], k_shape[-2]
    if heads % kv_heads != 0:
        raise ValueError(f"{fn}: kv heads ({kv_heads}) must divide q heads ({heads}) for GQA/MQA")

    kernel_size, stride, dilation, is_causal = _checked_geometry(fn, na_dim, spatial, kernel_size, stride,
                                                                 dilation, is_causal)

    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"{fn}: scale must be a float or None, got {scale!r}")

    if rpb is not None:
        expected = (heads, *(2 * ks - 1 for ks in kernel_size))
        if not isinstance(rpb, torch.Tensor) or tuple(rpb.shape) != expected:
            got = tuple(rpb.shape) if isinstance(rpb, torch.Tensor) else type(rpb).__name__
            raise ValueError(f"{fn}: rpb must have shape (heads, 2*kernel_size-1 per axis) = {expected}, got {got}")
        if any(is_causal):
            raise ValueError(f"{fn}: rpb cannot be combined with causal masking (is_causal={is_causal}); "
                             "NAT/DiNAT's relative positional bias is defined for full windows only")
        if rpb.device != q.device or not rpb.dtype.is_floating_point:
            raise ValueError(f"{fn}: rpb must be a floating tensor on {q.device}, got {rpb.dtype} on {rpb.device}")

    if (additional_keys is None) != (additional_values is None):
        raise ValueError(f"{fn}: pass additional_keys and additional_values together (or neither)")
    if additional_keys is not None:
        ak, av = additional_keys, additional_values
        for name, t, dim in (("additional_keys", ak, k.shape[-1]), ("additional_values", av, v.shape[-1])):
            if t.dim() != 4 or t.shape[0] != q.shape[0] or t.shape[2] != kv_heads or t.shape[3] != dim:
                raise ValueError(f"{fn}: {name} must have shape (batch={q.shape[0]}, n_extra, kv_heads={kv_heads}, "
                                 f"head_dim={dim}), got {tuple(t.shape)}")
            if t.device != q.device or t.dtype != q.dtype:
                raise ValueError(f"{fn}: {name} must be {q.dtype} on {q.device}, got {t.dtype} on {t.device}")
        if ak.shape[1] != av.shape[1]:
            raise ValueError(f"{fn}: additional_keys and additional_values token counts differ: "
                             f"{ak.shape[1]} != {av.shape[1]}")
        if ak.shape[1] == 0:
            raise ValueError(f"{fn}: additional_keys has no tokens; pass None instead")
    return kernel_size, stride, dilation, is_causal, float(scale)


# Whole calls are remembered too, per signature: shapes, dtypes and devices of plain tensors, the arguments and
# their types (host time: one lookup instead of ~60 checks). Extra tokens take the full check every time.
_VALID_CALLS: dict[tuple, tuple] = {}
_MAX_VALID_CALLS = 4096  # (a bound: a float scale of nan never finds its own entry)


def _validated(na_dim: int, q, k, v, kernel_size, stride, dilation, is_causal, scale, rpb, additional_keys,
               additional_values):
    """:func:`_validate`, remembered per call signature where the signature is hashable."""
    plain = torch.Tensor
    if (q.__class__ is not plain or k.__class__ is not plain or v.__class__ is not plain
            or additional_keys is not None or (rpb is not None and rpb.__class__ is not plain)
            or torch.compiler.is_compiling()):
        return _validate(na_dim, q, k, v, kernel_size, stride, dilation, is_causal, scale, rpb, additional_keys,
                         additional_values)
    args = (kernel_size, stride, dilation, is_causal, scale)
    key = (na_dim, q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, *args,
           *map(_types, args), None if rpb is None else (rpb.shape, rpb.dtype, rpb.device))
    try:
        hit = _VALID_CALLS.get(key)
    except TypeError:  # a list argument: not hashable
        return _validate(na_dim, q, k, v, kernel_size, stride, dilation, is_causal, scale, rpb, None, None)
    if hit is None:
        hit = _validate(na_dim, q, k, v, kernel_size, stride, dilation, is_causal, scale, rpb, None, None)
        if len(_VALID_CALLS) >= _MAX_VALID_CALLS:
            _VALID_CALLS.clear()
        _VALID_CALLS[key] = hit
    return hit


# The fused Triton path. Under torch.compile it is two torch.library custom ops: the compiler keeps them in
# its graph as opaque calls (no graph break; the kernels inside still tune their tiles per shape on first
# use), their fake implementations give the output shapes, and the autograd formula calls the fused
# backward. Eager calls run the same implementation and autograd formula through a plain autograd.Function,
# which spares the custom op's per-call dispatch (88 vs 12 us for a trivial op's forward, on a CPU). Tuple
# arguments travel as int/bool lists, absent tensors as None. The schemas are spelled out (as torch 2.14
# infers them from the annotations) because older torch releases infer fewer annotation forms.


_NA_FORWARD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? rpb, Tensor? additional_keys, Tensor? additional_values, "
                      "SymInt[] kernel_size, SymInt[] stride, SymInt[] dilation, bool[] is_causal, "
                      "float scale) -> (Tensor, Tensor)")


_TRITON_MODULE = []  # the lazily imported _na_triton module, once loaded


def _triton_ops():
    """attnzoo.kernels._na_triton, imported on first use (it imports triton)."""
    if not _TRITON_MODULE:
        from . import _na_triton

        _TRITON_MODULE.append(_na_triton)
    return _TRITON_MODULE[0]


def _na_forward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor | None,
                   additional_keys: torch.Tensor | None, additional_values: torch.Tensor | None,
                   kernel_size: list[int], stride: list[int], dilation: list[int], is_causal: list[bool],
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: (out (batch, *spatial, heads, head_dim) in q's dtype, lse (batch, *spatial, heads) fp32)."""
    out, lse = _triton_ops().na_forward(q, k, v, tuple(kernel_size), tuple(stride), tuple(dilation),
                                        tuple(is_causal), scale, rpb, additional_keys, additional_values)
    return out.contiguous(), lse.contiguous()  # dense, as the fake implementation promises


_na_forward_op = torch.library.custom_op("attnzoo::na_forward", _na_forward_impl, mutates_args=(),
                                         schema=_NA_FORWARD_SCHEMA)


@_na_forward_op.register_fake
def _(q, k, v, rpb, additional_keys, additional_values, kernel_size, stride, dilation, is_causal, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=torch.float32)


_NA_BACKWARD_SCHEMA = ("(Tensor? grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
                       "Tensor? rpb, Tensor? additional_keys, Tensor? additional_values, SymInt[] kernel_size, "
                       "SymInt[] stride, SymInt[] dilation, bool[] is_causal, float scale, "
                       "bool need_rpb_grad) -> Tensor[]")


def _na_backward_impl(grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None, q: torch.Tensor,
                    k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, rpb: torch.Tensor | None,
                    additional_keys: torch.Tensor | None, additional_values: torch.Tensor | None,
                    kernel_size: list[int], stride: list[int], dilation: list[int], is_causal: list[bool],
                    scale: float, need_rpb_grad: bool) -> list[torch.Tensor]:
    """Fused backward: [dq, dk, dv] + [drpb] when ``need_rpb_grad`` + [d_additional_keys, d_additional_values]
    when extra tokens were given; every gradient dense, shaped and typed like its input."""
    dq, dk, dv, drpb, dak, dav = _triton_ops().na_backward(
        grad_out, q, k, v, out, lse, tuple(kernel_size), tuple(stride), tuple(dilation), tuple(is_causal), scale,
        rpb, additional_keys, additional_values, need_rpb_grad=need_rpb_grad, grad_lse=grad_lse)
    grads = [dq, dk, dv] + ([drpb] if need_rpb_grad else []) + ([dak, dav] if additional_keys is not None else [])
    return [g.contiguous() for g in grads]


_na_backward_op = torch.library.custom_op("attnzoo::na_backward", _na_backward_impl, mutates_args=(),
                                          schema=_NA_BACKWARD_SCHEMA)


@_na_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, rpb, additional_keys, additional_values, kernel_size, stride,
      dilation, is_causal, scale, need_rpb_grad):
    inputs = [q, k, v] + ([rpb] if need_rpb_grad else [])
    if additional_keys is not None:
        inputs += [additional_keys, additional_values]
    return [t.new_empty(t.shape) for t in inputs]


def _na_setup_context(ctx, inputs, output):
    q, k, v, rpb, additional_keys, additional_values, kernel_size, stride, dilation, is_causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rpb, additional_keys, additional_values, out, lse)
    ctx.geometry = (kernel_size, stride, dilation, is_causal, scale)
    ctx.set_materialize_grads(False)  # an unused lse (or output) arrives as None: no zero tensors


def _na_autograd_backward(ctx, grad_out, grad_lse):
    """The custom op's 11 input gradients, from the backward op."""
    q, k, v, rpb, additional_keys, additional_values, out, lse = ctx.saved_tensors
    no_grads = (None,) * 11
    if grad_out is None and grad_lse is None:
        return no_grads
    need_rpb_grad = rpb is not None and ctx.needs_input_grad[3]
    grads = iter(torch.ops.attnzoo.na_backward(grad_out, grad_lse, q, k, v, out, lse, rpb, additional_keys,
                                               additional_values, *ctx.geometry, need_rpb_grad))
    dq, dk, dv = next(grads), next(grads), next(grads)
    drpb = next(grads) if need_rpb_grad else None
    dak, dav = (next(grads), next(grads)) if additional_keys is not None else (None, None)
    return (dq, dk, dv, drpb, dak, dav, *no_grads[6:])


_na_forward_op.register_autograd(_na_autograd_backward, setup_context=_na_setup_context)


class _NAFusedEager(torch.autograd.Function):
    """Eager twin of ``attnzoo::na_forward``: the same kernels and gradients, called directly, with a lean host
    path: the per-axis arguments travel as one tuple, and without ``return_lse`` the node has one output and
    keeps the logsumexp to itself."""

    # forward(ctx, ...) rather than a separate setup_context: with setup_context, Function.apply binds the
    # arguments through inspect.signature on every call (90 us per call under cProfile on the H100 host).
    @staticmethod
    def forward(ctx, q, k, v, rpb, additional_keys, additional_values, geometry):
        kernel_size, stride, dilation, is_causal, scale, return_lse = geometry
        out, lse = _triton_ops().na_forward(q, k, v, kernel_size, stride, dilation, is_causal, scale, rpb,
                                            additional_keys, additional_values)
        ctx.geometry = geometry
        if return_lse:
            ctx.save_for_backward(q, k, v, rpb, additional_keys, additional_values, out, lse)
            ctx.set_materialize_grads(False)  # an unused lse (or output) arrives as None: no zero tensors
            return out, lse
        ctx.save_for_backward(q, k, v, rpb, additional_keys, additional_values, out)
        ctx.lse = lse  # not an output: no other reference to it exists
        return out

    @staticmethod
    def backward(ctx, grad_out, grad_lse=None):
        saved = ctx.saved_tensors
        q, k, v, rpb, additional_keys, additional_values, out = saved[:7]
        lse = saved[7] if len(saved) > 7 else ctx.lse
        kernel_size, stride, dilation, is_causal, scale, _ = ctx.geometry
        if grad_out is None and grad_lse is None:
            return (None,) * 7
        dq, dk, dv, drpb, dak, dav = _triton_ops().na_backward(
            grad_out, q, k, v, out, lse, kernel_size, stride, dilation, is_causal, scale, rpb, additional_keys,
            additional_values, need_rpb_grad=rpb is not None and ctx.needs_input_grad[3], grad_lse=grad_lse)
        return dq, dk, dv, drpb, dak, dav, None


def _na_fused(q, k, v, rpb, additional_keys, additional_values, kernel_size, stride, dilation, is_causal, scale,
              return_lse):
    """out, or (out, lse) with ``return_lse``, from the fused kernels: the custom op when torch.compile traces
    (per-axis arguments as lists, as its schema says), else the eager twin (tuples, which the launch plans use
    as cache keys), or, with nothing to differentiate, the kernels without an autograd node."""
    if torch.compiler.is_compiling():
        out, lse = torch.ops.attnzoo.na_forward(q, k, v, rpb, additional_keys, additional_values, list(kernel_size),
                                                list(stride), list(dilation), list(is_causal), scale)
        return (out, lse) if return_lse else out
    if torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad or (rpb is not None and rpb.requires_grad)
            or (additional_keys is not None and (additional_keys.requires_grad or additional_values.requires_grad))):
        return _NAFusedEager.apply(q, k, v, rpb, additional_keys, additional_values,
                                   (kernel_size, stride, dilation, is_causal, scale, return_lse))
    out, lse = _triton_ops().na_forward(q, k, v, kernel_size, stride, dilation, is_causal, scale, rpb,
                                        additional_keys, additional_values)
    return (out, lse) if return_lse else out


def _na(na_dim: int, q, k, v, kernel_size, stride, dilation, is_causal, scale, rpb, additional_keys,
        additional_values, return_lse):
    kernel_size, stride, dilation, is_causal, scale = _validated(
        na_dim, q, k, v, kernel_size, stride, dilation, is_causal, scale, rpb, additional_keys, additional_values)
    backend = resolve_backend(q.device, f"na{na_dim}d")
    if backend == "triton":
        return _na_fused(q, k, v, rpb, additional_keys, additional_values, kernel_size, stride, dilation, is_causal,
                         scale, return_lse)
    if backend == "flex":
        from ._na_flex import na_flex

        out, lse = na_flex(q, k, v, kernel_size, stride, dilation, is_causal, scale, rpb, additional_keys,
                           additional_values)
    else:
        from ._na_torch import na_torch

        out, lse = na_torch(q, k, v, kernel_size, stride, dilation, is_causal, scale, rpb, additional_keys,
                            additional_values)
    return (out, lse) if return_lse else out


_DOC = """Neighborhood attention over a {n}-D feature map, with NATTEN's semantics.

Args:
    q: (batch, {spatial}, heads, head_dim) queries, float16/bfloat16/float32 (float64 on the torch backend).
    k: (batch, {spatial}, kv_heads, head_dim) keys; ``heads % kv_heads == 0`` (GQA/MQA).
    v: (batch, {spatial}, kv_heads, head_dim_v) values.
    kernel_size: window size, int or one int per axis, >= 2; ``kernel_size * dilation <= size`` per axis.
    stride: queries grouped ``stride`` at a time share one window (int or per axis, 1 <= stride <= kernel_size).
    dilation: sub-grid spacing of the window (int or per axis, >= 1).
    is_causal: bool or per-axis bools; a causal axis keeps keys at or before the query.
    scale: softmax scale applied to q.k; default ``head_dim ** -0.5``.
    rpb: ({rpb}) relative positional bias (NAT/DiNAT), added to the score of each neighbour at its offset
        ``(key - query) / dilation + kernel_size - 1`` per axis; not with causal masking. Gradient flows to it.
    additional_keys, additional_values: (batch, n_extra, kv_heads, head_dim[_v]) extra tokens every query
        also attends to (one softmax over neighbours and extras), e.g. registers or a class token.
    return_lse: also return the logsumexp of the scores.

Returns:
    the output (batch, {spatial}, heads, head_dim_v) in q's dtype; with ``return_lse`` also the logsumexp
    (batch, {spatial}, heads) in float32 (float64 for float64 inputs).

Raises:
    ValueError: on inconsistent shapes, dtypes or devices, or an invalid kernel_size / stride / dilation
        for the feature map (the message names the axis and the sizes).
"""


def na1d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: _AXIS_ARG, stride: _AXIS_ARG = 1,
         dilation: _AXIS_ARG = 1, is_causal: _CAUSAL_ARG = False, scale: float | None = None,
         rpb: torch.Tensor | None = None, additional_keys: torch.Tensor | None = None,
         additional_values: torch.Tensor | None = None, return_lse: bool = False,
         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    return _na(1, q, k, v, kernel_size, stride, dilation, is_causal, scale, rpb, additional_keys,
               additional_values, return_lse)


def na2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: _AXIS_ARG, stride: _AXIS_ARG = 1,
         dilation: _AXIS_ARG = 1, is_causal: _CAUSAL_ARG = False, scale: float | None = None,
         rpb: torch.Tensor | None = None, additional_keys: torch.Tensor | None = None,
         additional_values: torch.Tensor | None = None, return_lse: bool = False,
         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    return _na(2, q, k, v, kernel_size, stride, dilation, is_causal, scale, rpb, additional_keys,
               additional_values, return_lse)


def na3d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: _AXIS_ARG, stride: _AXIS_ARG = 1,
         dilation: _AXIS_ARG = 1, is_causal: _CAUSAL_ARG = False, scale: float | None = None,
         rpb: torch.Tensor | None = None, additional_keys: torch.Tensor | None = None,
         additional_values: torch.Tensor | None = None, return_lse: bool = False,
         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    return _na(3, q, k, v, kernel_size, stride, dilation, is_causal, scale, rpb, additional_keys,
               additional_values, return_lse)


na1d.__doc__ = _DOC.format(n=1, spatial="length", rpb="heads, 2k-1")
na2d.__doc__ = _DOC.format(n=2, spatial="height, width", rpb="heads, 2k-1, 2k-1")
na3d.__doc__ = _DOC.format(n=3, spatial="depth, height, width", rpb="heads, 2k-1, 2k-1, 2k-1")


def _make_check(na_dim: int, spatial: tuple[int, ...], kernel_size, dilation):
    def check(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, str]:
        from .reference import na_reference

        gen = torch.Generator().manual_seed(na_dim)
        dtype = torch.float32
        q = torch.randn(2, *spatial, 4, 16, generator=gen, dtype=dtype)
        k = torch.randn(2, *spatial, 2, 16, generator=gen, dtype=dtype)
        v = torch.randn(2, *spatial, 2, 16, generator=gen, dtype=dtype)
        ks = (kernel_size,) * na_dim
        rpb = torch.randn(4, *(2 * x - 1 for x in ks), generator=gen, dtype=dtype)
        fn = {1: na1d, 2: na2d, 3: na3d}[na_dim]
        args = [t.to(device) for t in (q, k, v, rpb)]
        out = fn(*args[:3], kernel_size, dilation=dilation, rpb=args[3])
        ref, _ = na_reference(q, k, v, kernel_size, dilation=dilation, rpb=rpb)
        return out, ref, resolve_backend(device, f"na{na_dim}d")

    return check


register_check("na1d")(_make_check(1, (37,), 7, 2))
register_check("na2d")(_make_check(2, (11, 9), 3, (2, 1)))
register_check("na3d")(_make_check(3, (5, 6, 7), 3, 1))
