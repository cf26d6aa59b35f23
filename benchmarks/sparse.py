"""Routed (BiFormer) and halo (HaloNet) attention on the GPU: correctness, then every formulation side by side.

Run on a CUDA machine: ``python benchmarks/sparse.py [--out DIR] [--only SUBSTR ...] [--no-flex] [--skip-halo]
[--variants NAME ...] [--no-alternatives]``.

1. Correctness: the triton, flex and torch backends against the float64 reference on small random shapes,
   forward and backward, fp32 and bf16; then the triton backend against the fp32 torch backend at a real
   BiFormer stage and a real halonet stage (bf16 inputs).
2. Speed (bf16, ``triton.testing.do_bench`` medians, forward and forward+backward):
   - routed, at BiFormer-T/S (same attention shapes) and BiFormer-B stages 1-3, at 224 (batch 32, n_win 7)
     and 512 (batch 8, n_win 16, the dense-prediction setting): the attention core *including* routing
     (region means, affinity, top-k) for ``official`` (BiFormer's gather + matmul + softmax, as in
     ops/bra_legacy.py), ``gather+sdpa`` (our torch backend), ``flex`` (per-call block mask), ``ours``
     (``bilevel_routing_attention``, what the BiFormer model runs) and ``ours, routing kernel then
     routed_attention`` (the two public functions one after the other); ``dense sdpa`` is full attention over
     the stage without routing. Unless ``--no-alternatives``, ours is also timed with each tuning
     alternative of its kernels' module constants (``ours_alternatives``).
   - halo, at halonet26t / halonet50ts stage shapes (batch 32, input 256): the attention core from the q /
     kv projections to the output: ``timm`` (HaloAttn.forward with its convolutions replaced by the
     precomputed projections, so exactly timm's code path), ``flex``, ``unfold`` (our torch backend),
     ``ours``, and ``dense sdpa`` over the stage.
   Effective TFLOP/s count the kept query-key pairs only (4 * pairs * d forward, 3.5x that forward+backward).
   Memory: peak allocated during one forward+backward above what the inputs hold.
Results: ``OUT/sparse_bench.json`` (``$OUT`` or ``--out``), rewritten after every row; a markdown table
at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnzoo.kernels as K  # noqa: E402
from attnzoo.kernels import bilevel_routing_attention, halo_attention, region_routing, routed_attention  # noqa: E402
from attnzoo.kernels.reference import halo_attention_reference, routed_attention_reference  # noqa: E402

# name: (batch, map, dim, heads, n_win, topk); head_dim 32 as in the official models
ROUTED = {
    "biformer_t/s_224_s1": (32, 56, 64, 2, 7, 1),
    "biformer_t/s_224_s2": (32, 28, 128, 4, 7, 4),
    "biformer_t/s_224_s3": (32, 14, 256, 8, 7, 16),
    "biformer_b_224_s1": (32, 56, 96, 3, 7, 1),
    "biformer_b_224_s2": (32, 28, 192, 6, 7, 4),
    "biformer_b_224_s3": (32, 14, 384, 12, 7, 16),
    "biformer_t/s_512_s1": (8, 128, 64, 2, 16, 1),
    "biformer_t/s_512_s2": (8, 64, 128, 4, 16, 4),
    "biformer_t/s_512_s3": (8, 32, 256, 8, 16, 16),
    "biformer_b_512_s1": (8, 128, 96, 3, 16, 1),
    "biformer_b_512_s2": (8, 64, 192, 6, 16, 4),
    "biformer_b_512_s3": (8, 32, 384, 12, 16, 16),
}
# the per-call block mask is built eagerly over all (query, key) pairs: only the 224 maps stay affordable
FLEX_ROUTED = {"biformer_t/s_224_s1", "biformer_t/s_224_s2", "biformer_t/s_224_s3"}

# name: (batch, map, dim_out, heads, block, halo, stride); halonet at input 256
HALO = {
    "halonet26t_s3": (32, 16, 256, 8, 8, 2, 1),
    "halonet26t_s4a": (32, 16, 512, 8, 8, 2, 2),
    "halonet26t_s4b": (32, 8, 512, 8, 8, 2, 1),
    "halonet50ts_s2": (32, 32, 128, 4, 8, 3, 1),
    "halonet50ts_s3": (32, 16, 256, 8, 8, 3, 1),
    "halonet50ts_s4": (32, 8, 512, 8, 8, 3, 1),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- correctness

def _routed_errors(dev: torch.device, backend: str, dtype: torch.dtype, qkv: tuple, index: torch.Tensor,
                   n_win) -> list[float]:
    """Relative errors of out, dq, dk, dv of ``routed_attention`` on ``backend`` against the float64 reference."""
    inputs = [t.to(dev, dtype).requires_grad_() for t in qkv]
    cpu64 = [t.double().requires_grad_() for t in qkv]
    with K.use_backend(backend):
        out = routed_attention(*inputs, index.to(dev), n_win)
    ref = routed_attention_reference(*cpu64, index, n_win)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, inputs, grad.to(dev, dtype))
    want = torch.autograd.grad(ref, cpu64, grad)
    return [rel_err(out, ref)] + [rel_err(g, w) for g, w in zip(got, want)]


def check_small(dev: torch.device, backends: tuple[str, ...], halo: bool = True) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for backend in backends:
        # flex compiles per dtype and shape: fp32 only, to save time
        for dtype in (torch.float32,) if backend == "flex" else (torch.float32, torch.bfloat16):
            # routed: 12x12 map, 3x3 regions of 16 tokens, topk 3, d_v != d_qk
            q, k = (torch.randn(2, 12, 12, 2, 32, generator=gen) for _ in range(2))
            v = torch.randn(2, 12, 12, 2, 16, generator=gen)
            index = torch.stack([torch.stack([torch.randperm(9, generator=gen)[:3] for _ in range(9)])
                                 for _ in range(2)])
            rows.append(dict(op="routed", backend=backend, dtype=str(dtype),
                             rel_err_out_dq_dk_dv=_routed_errors(dev, backend, dtype, (q, k, v), index, 3)))
            # routed with 2x2-token regions (BiFormer stage 3), 12x8 map; the fused kernels with 1 and 2 warps
            from attnzoo.kernels import _routed_triton

            q, k, v = (torch.randn(2, 12, 8, 2, 32, generator=gen) for _ in range(3))
            index = torch.stack([torch.stack([torch.randperm(24, generator=gen)[:5] for _ in range(24)])
                                 for _ in range(2)])
            for warps in (1, 2) if backend == "triton" else (1,):
                previous, _routed_triton.SMALL_REGION_WARPS = _routed_triton.SMALL_REGION_WARPS, warps
                try:
                    errs = _routed_errors(dev, backend, dtype, (q, k, v), index, (6, 4))
                finally:
                    _routed_triton.SMALL_REGION_WARPS = previous
                label = f"routed 2x2 regions ({warps} warps)" if backend == "triton" else "routed 2x2 regions"
                rows.append(dict(op=label, backend=backend, dtype=str(dtype), rel_err_out_dq_dk_dv=errs))
            # routed at BiFormer stage 3's geometry (14x14 map, 7x7 regions of 2x2, topk 16): the dense region-
            # masked kernels on triton, one routing row naming a region twice (counted weights in its tiles)
            q, k, v = (torch.randn(2, 14, 14, 2, 32, generator=gen) for _ in range(3))
            index = torch.stack([torch.stack([torch.randperm(49, generator=gen)[:16] for _ in range(49)])
                                 for _ in range(2)])
            index[1, 20, 3] = index[1, 20, 0]
            errs = _routed_errors(dev, backend, dtype, (q, k, v), index, 7)
            rows.append(dict(op="routed stage-3 geometry, a repeat" + (" (dense masks)" if backend == "triton"
                                                                      else ""),
                             backend=backend, dtype=str(dtype), rel_err_out_dq_dk_dv=errs))
            # halo: 16x24 map, block 8, halo 3, stride 2 and 1, position tables
            for stride in (1, 2) if halo else ():
                q = torch.randn(2, 16 // stride, 24 // stride, 2, 32, generator=gen)
                k = torch.randn(2, 16, 24, 2, 32, generator=gen)
                v = torch.randn(2, 16, 24, 2, 16, generator=gen)
                tabs = [0.2 * torch.randn(27, 32, generator=gen) for _ in range(2)]
                inputs = [t.to(dev, dtype).requires_grad_() for t in (q, k, v)]
                inputs += [t.to(dev).requires_grad_() for t in tabs]
                cpu64 = [t.double().requires_grad_() for t in (q, k, v, *tabs)]
                with K.use_backend(backend):
                    out = halo_attention(*inputs[:3], 8, 3, *inputs[3:], block_stride=stride)
                ref = halo_attention_reference(*cpu64[:3], 8, 3, *cpu64[3:], block_stride=stride)
                grad = torch.randn_like(ref)
                got = torch.autograd.grad(out, inputs, grad.to(dev, dtype))
                want = torch.autograd.grad(ref, cpu64, grad)
                errs = [rel_err(out, ref)] + [rel_err(g, w) for g, w in zip(got, want)]
                rows.append(dict(op=f"halo stride {stride}", backend=backend, dtype=str(dtype),
                                 rel_err_out_dq_dk_dv_drelh_drelw=errs))
    return rows


def check_routing(dev: torch.device) -> list[dict]:
    """The fused routing (triton backend) against the torch ops on the same fp32 inputs, at every stage."""
    rows = []
    from attnzoo.kernels import _routed_triton

    for name, fused in (("biformer_t/s_224_s1", None), ("biformer_t/s_224_s3", None), ("biformer_t/s_224_s3", 0),
                        ("biformer_b_512_s3", None)):
        b, m, dim, heads, n_win, topk = ROUTED[name]
        q, k = (torch.randn(b, m, m, dim, device=dev) for _ in range(2))
        previous = _routed_triton.FUSED_ROUTING_MAX_ELEMENTS
        if fused is not None:
            name += " (three kernels)"
            _routed_triton.FUSED_ROUTING_MAX_ELEMENTS = fused
        with K.use_backend("triton"):
            w_ours, i_ours = region_routing(q, k, n_win, topk, scale=dim ** -0.5)
        with K.use_backend("torch"):
            w_ref, i_ref = region_routing(q, k, n_win, topk, scale=dim ** -0.5)
        rows.append(dict(op=f"region_routing {name} fp32 triton vs torch",
                         index_equal_fraction=(i_ours == i_ref).float().mean().item(),
                         weight_rel_err=rel_err(w_ours, w_ref)))
        # bf16 inputs (tf32 logits) against the torch ops on the same values in fp32
        qh, kh = q.bfloat16(), k.bfloat16()
        with K.use_backend("triton"):
            w_ours, i_ours = region_routing(qh, kh, n_win, topk, scale=dim ** -0.5)
        with K.use_backend("torch"):
            w_ref, i_ref = region_routing(qh.float(), kh.float(), n_win, topk, scale=dim ** -0.5)
        rows.append(dict(op=f"region_routing {name} bf16 triton vs fp32 torch on the bf16 values",
                         index_equal_fraction=(i_ours == i_ref).float().mean().item(),
                         same_set_fraction=(i_ours.sort(-1).values == i_ref.sort(-1).values).all(-1).float().mean()
                         .item(), weight_rel_err=rel_err(w_ours, w_ref)))
        _routed_triton.FUSED_ROUTING_MAX_ELEMENTS = previous
    return rows


def check_bilevel(dev: torch.device) -> list[dict]:
    """bilevel_routing_attention (routing-words kernel + dense attention where it applies) against the float64
    reference on its own index, and its index against region_routing (torch ops in fp32 on the same values);
    20 calls in a row must agree."""
    rows = []
    for name in ("biformer_t/s_224_s3", "biformer_b_224_s3"):
        b, m, dim, heads, n_win, topk = ROUTED[name]
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator().manual_seed(1)
            cpu = [torch.randn(4, m, m, heads, dim // heads, generator=gen).to(dtype) for _ in range(3)]
            ins = [x.to(dev).requires_grad_() for x in cpu]
            with K.use_backend("triton"):
                out, index = bilevel_routing_attention(*ins, n_win, topk, scale=dim ** -0.5)
                grads = torch.autograd.grad(out, ins, torch.ones_like(out))
                _, i_route = region_routing(ins[0].detach().float().flatten(3), ins[1].detach().float().flatten(3),
                                            n_win, topk)
                repeats = [bilevel_routing_attention(*ins, n_win, topk, scale=dim ** -0.5) for _ in range(20)]
            torch.cuda.synchronize()
            cpu64 = [x.double().requires_grad_() for x in cpu]
            ref = routed_attention_reference(*cpu64, index.cpu(), n_win, scale=dim ** -0.5)
            ref_grads = torch.autograd.grad(ref, cpu64, torch.ones_like(ref))
            rows.append(dict(op=f"bilevel {name} {str(dtype)[6:]} vs float64 on its index",
                             rel_err_out_dq_dk_dv=[rel_err(a.cpu(), r) for a, r in
                                                   zip([out, *grads], [ref, *ref_grads])],
                             index_equal_to_region_routing_fp32=(index == i_route).float().mean().item(),
                             repeats_identical=all(torch.equal(o, out) and torch.equal(i, index) for o, i in repeats)))
    return rows


def check_real(dev: torch.device, halo: bool = True) -> list[dict]:
    rows = []
    for name in ("biformer_t/s_224_s2", "biformer_t/s_224_s3"):
        b, m, dim, heads, n_win, topk = ROUTED[name]
        q, k, v = (torch.randn(b, m, m, heads, dim // heads, device=dev, dtype=torch.bfloat16) for _ in range(3))
        _, index = region_routing(q.flatten(3), k.flatten(3), n_win, topk)
        outs = {}
        for backend in ("triton", "torch"):
            ins = [t.float().requires_grad_() if backend == "torch" else t.clone().requires_grad_()
                   for t in (q, k, v)]
            with K.use_backend(backend):
                out = routed_attention(*ins, index, n_win, scale=dim ** -0.5)
            grads = torch.autograd.grad(out, ins, torch.ones_like(out))
            outs[backend] = [out, *grads]
        rows.append(dict(op=f"routed {name} bf16 triton vs fp32 torch",
                         rel_err_out_dq_dk_dv=[rel_err(a, b) for a, b in zip(outs["triton"], outs["torch"])]))
    if not halo:
        return rows
    b, m, dim, heads, block, halo, stride = HALO["halonet50ts_s3"]
    d = dim // heads
    q = torch.randn(b, m // stride, m // stride, heads, d, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(b, m, m, heads, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
    tabs = [0.2 * torch.randn(2 * (block + 2 * halo) - 1, d, device=dev) for _ in range(2)]
    outs = {}
    for backend in ("triton", "torch"):
        ins = [t.float().requires_grad_() if backend == "torch" else t.clone().requires_grad_() for t in (q, k, v)]
        ts = [t.clone().requires_grad_() for t in tabs]
        with K.use_backend(backend):
            out = halo_attention(*ins, block, halo, *ts, block_stride=stride)
        grads = torch.autograd.grad(out, ins + ts, torch.ones_like(out))
        outs[backend] = [out, *grads]
    rows.append(dict(op="halo halonet50ts_s3 bf16 triton vs fp32 torch",
                     rel_err_out_dq_dk_dv_drelh_drelw=[rel_err(a, b) for a, b in zip(outs["triton"], outs["torch"])]))
    return rows


# ---------------------------------------------------------------- timing

def measure(fn, inputs: list[torch.Tensor], use_graphs: bool = True) -> dict:
    from triton.testing import do_bench

    def fwd():
        with torch.no_grad():
            fn()

    def fwd_bwd():
        out = fn()
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
        return grads

    fwd_ms = do_bench(fwd, warmup=10, rep=40, return_mode="median")
    fb_ms = do_bench(fwd_bwd, warmup=10, rep=40, return_mode="median")
    graph = {}
    if use_graphs:  # GPU time without the host's launch overhead: replay of a captured CUDA graph
        from triton.testing import do_bench_cudagraph

        for key, f in (("fwd_graph_ms", fwd), ("fwd_bwd_graph_ms", fwd_bwd)):
            try:
                graph[key] = do_bench_cudagraph(f, rep=30, return_mode="median")
            except Exception as exc:  # record, never hide
                graph[key + "_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return dict(fwd_ms=fwd_ms, fwd_bwd_ms=fb_ms, peak_mb=peak, **graph)


def official_bra(q, k, v, n_win, topk, scale):
    """BiFormer's bra_legacy.py attention core, restated: routing on detached region means, gather of
    the top-k kv regions (topk x region copies), per-head matmul, softmax, matmul."""
    b, h, w, heads, d = q.shape
    with K.use_backend("torch"):  # the official routing: torch ops
        weight, index = region_routing(q.flatten(3).detach(), k.flatten(3).detach(), n_win, topk, scale=scale)
    rh, rw = h // n_win, w // n_win

    def regions(x):
        return x.reshape(b, n_win, rh, n_win, rw, heads * x.shape[-1]).permute(0, 1, 3, 2, 4, 5).reshape(
            b, n_win * n_win, rh * rw, -1)

    qr, kvr = regions(q), regions(torch.cat([k, v], -1))
    r, t, ckv = kvr.shape[1:]
    kv_sel = torch.gather(kvr.view(b, 1, r, t, ckv).expand(-1, r, -1, -1, -1), 2,
                          index.view(b, r, topk, 1, 1).expand(-1, -1, -1, t, ckv))
    kv_sel = kv_sel.view(b * r, topk * t, heads, 2 * d).permute(0, 2, 1, 3)
    k_sel, v_sel = kv_sel[..., :d], kv_sel[..., d:]
    qh = qr.view(b * r, t, heads, d).transpose(1, 2)
    attn = ((qh * scale) @ k_sel.transpose(-1, -2)).softmax(-1)
    out = attn @ v_sel  # (b*r, heads, t, d)
    return out.transpose(1, 2).reshape(b, n_win, n_win, rh, rw, heads, d).permute(0, 1, 3, 2, 4, 5, 6).reshape(
        b, h, w, heads, d)


def ours_bilevel(q, k, v, n_win, topk, scale):
    with K.use_backend("triton"):
        return bilevel_routing_attention(q, k, v, n_win, topk, scale=scale)[0]


def ours_routed(backend):
    def fn(q, k, v, n_win, topk, scale):
        with K.use_backend(backend):
            _, index = region_routing(q.flatten(3).detach(), k.flatten(3).detach(), n_win, topk, scale=scale)
            return routed_attention(q, k, v, index, n_win, scale=scale)
    return fn


@contextlib.contextmanager
def kernel_constants(**constants):
    """Module constants of the routed kernels set for a whole measurement (forward and backward launches,
    CUDA-graph captures included), restored afterwards."""
    from attnzoo.kernels import _routed_triton

    saved = {name: getattr(_routed_triton, name) for name in constants}
    for name, value in constants.items():
        setattr(_routed_triton, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(_routed_triton, name, value)


def ours_alternatives(m: int, c: int, n_win: int, topk: int) -> dict[str, dict]:
    """The tuning alternatives of ours that differ from the defaults at this shape (name: module constants of
    the kernels to set while it is measured): routing in one kernel or two, sparse or dense region-masked
    attention kernels, and the dense kernels' tiles and warps."""
    from attnzoo.kernels import _routed_triton as rt

    r, t = n_win * n_win, (m // n_win) ** 2
    out = {}
    if rt.fused_routing(m * m * c, r, t):
        out["ours, routing in three kernels"] = dict(FUSED_ROUTING_MAX_ELEMENTS=0)
        if rt.FUSED_ROUTING_WARPS != 8:
            out["ours, routing kernel with 8 warps"] = dict(FUSED_ROUTING_WARPS=8)
    if t < 16 and rt._dense_tiles(r, t, topk) is None:
        out["ours, small-region kernels with 2 warps"] = dict(SMALL_REGION_WARPS=2)
        out["ours, small-region dk/dv with one key region per program"] = dict(SMALL_REGION_DKDV_GROUPED=False)
        out["ours, small-region forward/dq with one query region per program"] = dict(SMALL_REGION_QUERY_GROUP=1)
        out["ours, small-region forward/dq with 2 query regions per program"] = dict(SMALL_REGION_QUERY_GROUP=2)
        out["ours, small-region forward with 128 keys per step"] = dict(SMALL_REGION_KEYS=128)
        out["ours, small-region forward with 32 keys per step"] = dict(SMALL_REGION_KEYS=32)
        out["ours, small-region dq with 64 keys per step"] = dict(SMALL_REGION_DQ_KEYS=64)
    if not rt.fused_routing(m * m * c, r, t):
        out["ours, without programmatic dependent launch"] = dict(ROUTED_PDL=False)
    if rt.routing_words_supported(r, t, topk):
        out["ours, without programmatic dependent launch"] = dict(ROUTED_PDL=False)
        out["ours, forward query tiles 64"] = dict(DENSE_FWD_BLOCK_M=64)
        out["ours, backward query tiles 64"] = dict(DENSE_BLOCK_M=64)
        out["ours, dense kernels with 8 warps"] = dict(DENSE_WARPS=8)
        out["ours, forward 2 stages"] = dict(DENSE_STAGES=2)
    if rt._dense_tiles(r, t, topk) is not None:
        out["ours, sparse kernels"] = dict(DENSE_MIN_ROUTED_FRACTION=2.0)
        for bn, bwd_bn in ((64, 64), (32, 32)):
            if (bn, bwd_bn) != (rt.DENSE_BLOCK_N, rt.DENSE_BWD_BLOCK_N):
                out[f"ours, dense key tiles {bn} (fwd) / {bwd_bn} (bwd)"] = dict(DENSE_BLOCK_N=bn,
                                                                                 DENSE_BWD_BLOCK_N=bwd_bn)
    return out


def dense_sdpa(q, k, v, scale):
    b, h, w, heads, d = q.shape
    qf, kf, vf = (x.reshape(b, h * w, heads, -1).transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(qf, kf, vf, scale=scale).transpose(1, 2).reshape(b, h, w, heads, -1)


class _Given(torch.nn.Module):
    """Stands in for a convolution: returns a precomputed projection (so timm's forward runs unchanged)."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, x):
        return self.value


def bench_routed(name, cfg, dev, flex: bool, only_flex: bool = False, keep: set[str] | None = None,
                 alternatives: bool = True) -> list[dict]:
    b, m, dim, heads, n_win, topk = cfg
    d = dim // heads
    scale = dim ** -0.5
    q, k, v = (torch.randn(b, m, m, heads, d, device=dev, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    t = (m // n_win) ** 2
    pairs = b * heads * m * m * topk * t
    variants = {"official": lambda: official_bra(q, k, v, n_win, topk, scale),
                "gather+sdpa": lambda: ours_routed("torch")(q, k, v, n_win, topk, scale),
                "ours": lambda: ours_bilevel(q, k, v, n_win, topk, scale),
                "ours, routing kernel then routed_attention": lambda: ours_routed("triton")(q, k, v, n_win, topk,
                                                                                          scale),
                "dense sdpa": lambda: dense_sdpa(q, k, v, scale)}
    if flex:
        variants["flex"] = lambda: ours_routed("flex")(q, k, v, n_win, topk, scale)
    if only_flex:
        variants = {"flex": variants["flex"]} if flex else {}
    if keep is not None:
        variants = {key: fn for key, fn in variants.items()
                    if key in keep or (alternatives and "ours" in keep and key.startswith("ours"))}
    elif not alternatives:
        variants.pop("ours, routing kernel then routed_attention")
    constants = {}
    if "ours" in variants and alternatives:
        constants = ours_alternatives(m, dim, n_win, topk)
        variants.update({name: variants["ours"] for name in constants})
    rows = []
    for var, fn in variants.items():
        row = dict(op="routed", shape=name, variant=var, batch=b, map=m, heads=heads, head_dim=d, n_win=n_win,
                   topk=topk)
        try:
            with kernel_constants(**constants.get(var, {})):
                row.update(measure(fn, [q, k, v], use_graphs=var != "flex"))
            p = b * heads * (m * m) ** 2 if var == "dense sdpa" else pairs
            row["fwd_tflops"] = 4 * p * d / row["fwd_ms"] / 1e9
            row["fwd_bwd_tflops"] = 3.5 * 4 * p * d / row["fwd_bwd_ms"] / 1e9
        except Exception as exc:  # flex rejects some shapes; record why and go on
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def bench_halo(name, cfg, dev, flex: bool, only_flex: bool = False) -> list[dict]:
    from timm.layers.halo_attn import HaloAttn

    b, m, dim, heads, block, halo, stride = cfg
    attn = HaloAttn(dim, dim, num_heads=heads, block_size=block, halo_size=halo, stride=stride).to(dev)
    dqk, dv = attn.dim_head_qk, attn.dim_head_v
    qc = torch.randn(b, heads * dqk, m // stride, m // stride, device=dev, dtype=torch.bfloat16).requires_grad_()
    kvc = torch.randn(b, heads * (dqk + dv), m, m, device=dev, dtype=torch.bfloat16).requires_grad_()
    x = torch.empty(b, dim, m, m, device=dev, dtype=torch.bfloat16)
    attn.q, attn.kv = _Given(qc), _Given(kvc)
    attn = attn.to(torch.bfloat16)
    rel_h, rel_w = attn.pos_embed.height_rel, attn.pos_embed.width_rel

    def ours(backend):
        def fn():
            q = qc.unflatten(1, (heads, dqk)).permute(0, 3, 4, 1, 2)
            kv = kvc.unflatten(1, (heads, dqk + dv))
            k, v = kv[:, :, :dqk].permute(0, 3, 4, 1, 2), kv[:, :, dqk:].permute(0, 3, 4, 1, 2)
            with K.use_backend(backend):
                o = halo_attention(q, k, v, block, halo, rel_h, rel_w, scale=attn.scale, block_stride=stride)
            return o.flatten(3).permute(0, 3, 1, 2)
        return fn

    def dense():
        q = qc.unflatten(1, (heads, dqk)).flatten(3).transpose(2, 3)
        kv = kvc.unflatten(1, (heads, dqk + dv)).flatten(3).transpose(2, 3)
        return F.scaled_dot_product_attention(q, kv[..., :dqk], kv[..., dqk:])

    variants = {"timm": lambda: attn(x), "unfold": ours("torch"), "ours": ours("triton"), "dense sdpa": dense}
    if flex:
        variants["flex"] = ours("flex")
    if only_flex:
        variants = {"flex": variants["flex"]} if flex else {}
    win = block + 2 * halo
    nq = (m // stride) ** 2
    rows = []
    for var, fn in variants.items():
        row = dict(op="halo", shape=name, variant=var, batch=b, map=m, heads=heads, head_dim=dqk, block=block,
                   halo=halo, stride=stride)
        try:
            row.update(measure(fn, [qc, kvc], use_graphs=var != "flex"))
            p = b * heads * nq * (m * m if var == "dense sdpa" else win * win)
            row["fwd_tflops"] = 4 * p * dqk / row["fwd_ms"] / 1e9
            row["fwd_bwd_tflops"] = 3.5 * 4 * p * dqk / row["fwd_bwd_ms"] / 1e9
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def profile(dev: torch.device, path: Path) -> None:
    """Kernel-level view of one forward+backward of ours and the official formulation (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name in ("biformer_t/s_224_s3", "biformer_t/s_512_s3"):
        b, m, dim, heads, n_win, topk = ROUTED[name]
        q, k, v = (torch.randn(b, m, m, heads, dim // heads, device=dev, dtype=torch.bfloat16).requires_grad_()
                   for _ in range(3))
        for var, fn in (("ours", ours_bilevel), ("ours, routing kernel then routed_attention", ours_routed("triton")),
                        ("official", official_bra)):
            for _ in range(3):
                torch.autograd.grad(fn(q, k, v, n_win, topk, dim ** -0.5), (q, k, v), torch.ones_like(q))
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                out = fn(q, k, v, n_win, topk, dim ** -0.5)
                torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
                torch.cuda.synchronize()
            with path.open("a") as fh:
                fh.write(f"\n### {name} {var}\n")
                fh.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


def table(rows: list[dict]) -> str:
    lines = ["| op | shape | variant | fwd ms | f+b ms | fwd GPU ms | f+b GPU ms | f+b TFLOP/s (GPU) | "
             "peak MB (f+b) | ours speed-up fwd / f+b (GPU) |", "|---|---|---|---|---|---|---|---|---|---|"]
    ours = {(r["op"], r["shape"]): r for r in rows if r["variant"] == "ours" and "error" not in r}

    def fmt(x):
        return f"{x:.3f}" if isinstance(x, float) else "-"

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['shape']} | {r['variant']} | {r['error'][:70]} |||||||")
            continue
        o = ours.get((r["op"], r["shape"]))
        gf, gb = r.get("fwd_graph_ms"), r.get("fwd_bwd_graph_ms")
        ratio = ""
        if o and gf and gb and o.get("fwd_graph_ms") and o.get("fwd_bwd_graph_ms"):
            ratio = f"{gf / o['fwd_graph_ms']:.2f}x / {gb / o['fwd_bwd_graph_ms']:.2f}x"
        tflops = f"{r['fwd_bwd_tflops'] * r['fwd_bwd_ms'] / gb:.1f}" if gb else "-"
        lines.append(f"| {r['op']} | {r['shape']} | {r['variant']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                     f"{fmt(gf)} | {fmt(gb)} | {tflops} | {r['peak_mb']:.0f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--only", nargs="*", default=None, help="shape names containing any of these")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--only-flex", action="store_true", help="check and time only the flex variants")
    parser.add_argument("--profile", action="store_true", help="print kernel times of ours vs official first")
    parser.add_argument("--skip-halo", action="store_true", help="routed checks and rows only")
    parser.add_argument("--no-alternatives", action="store_true",
                        help="time ours only as configured (no tuning alternatives)")
    parser.add_argument("--variants", nargs="*", default=None,
                        help="routed variants to time (official, gather+sdpa, ours, dense sdpa, flex)")
    args = parser.parse_args()
    dev = torch.device("cuda")
    torch._dynamo.config.cache_size_limit = 64
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                  checks=[], rows=[])
    path = Path(args.out) / ("sparse_bench_flex.json" if args.only_flex else "sparse_bench.json")

    def save():
        path.write_text(json.dumps(result, indent=1))

    import triton
    result["triton"] = triton.__version__
    if args.profile:
        profile(dev, Path(args.out) / "sparse_profile.txt")
    if not args.skip_check:
        backends = ("triton", "torch") if args.no_flex else ("triton", "flex", "torch")
        if args.only_flex:
            backends = ("flex",)
        result["checks"] = check_small(dev, backends, halo=not args.skip_halo)
        if not args.only_flex:
            result["checks"] += check_bilevel(dev) + check_routing(dev) + check_real(dev, halo=not args.skip_halo)
        save()
        for c in result["checks"]:
            print(json.dumps(c), flush=True)
    for name, cfg in ROUTED.items():
        if args.only and not any(s in name for s in args.only):
            continue
        t0 = time.time()
        result["rows"] += bench_routed(name, cfg, dev, flex=not args.no_flex and name in FLEX_ROUTED,
                                       only_flex=args.only_flex,
                                       keep=set(args.variants) if args.variants else None,
                                       alternatives=not args.no_alternatives)
        save()
        print(f"{name} done in {time.time() - t0:.1f}s", flush=True)
    for name, cfg in HALO.items():
        if args.skip_halo:
            break
        if args.only and not any(s in name for s in args.only):
            continue
        t0 = time.time()
        result["rows"] += bench_halo(name, cfg, dev, flex=not args.no_flex and name.startswith("halonet26t"),
                                     only_flex=args.only_flex)
        save()
        print(f"{name} done in {time.time() - t0:.1f}s", flush=True)
    print(f"\n{result['device']}, torch {result['torch']}, triton {result['triton']}, bf16\n")
    print(table(result["rows"]))


if __name__ == "__main__":
    main()
