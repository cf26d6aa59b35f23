"""Neighborhood attention on the GPU: correctness of every backend, then ours vs FlexAttention vs dense SDPA.

Run on a CUDA machine: ``python benchmarks/na.py [--out DIR] [--shapes NAME,...] [--skip-check]``.

1. Correctness: the triton, flex and torch backends against the float64 reference on small random shapes
   (odd sizes, borders, dilation, stride, per-axis causal, rpb, GQA, extra tokens), forward and backward,
   and the triton backend against the float32 torch backend on a NAT-T-sized problem.
2. Speed (bf16, ``triton.testing.do_bench`` medians): forward and forward+backward of ours (fused Triton),
   FlexAttention (compiled, NA block mask) and dense SDPA over the same tokens, each timed twice: replayed
   from a CUDA graph (device time; the headline columns) and as eager calls (what a Python loop sees,
   host launch path included; best of 3 medians). Effective TFLOP/s (from the graph time) counts the kept
   query-key pairs only; peak memory of one forward+backward.
Results go to ``OUT/na_bench.json`` as they come (``$OUT`` or ``--out``), and a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import attnzoo.kernels as K
from attnzoo.kernels import na1d, na2d, na3d
from attnzoo.kernels._na_torch import neighbor_tables
from attnzoo.kernels.reference import na_reference

NA = {1: na1d, 2: na2d, 3: na3d}

# name: (batch, spatial, heads, head_dim, kernel, dilation, causal)
SHAPES = {
    "nat_t_s1_56x56_k7": (32, (56, 56), 2, 32, 7, 1, False),
    "nat_t_s2_28x28_k7": (32, (28, 28), 4, 32, 7, 1, False),
    "dinat_t_s1_56x56_k7_d8": (32, (56, 56), 2, 32, 7, 8, False),
    "dinat_t_s2_28x28_k7_d4": (32, (28, 28), 4, 32, 7, 4, False),
    "map_128x128_k7": (4, (128, 128), 4, 32, 7, 1, False),
    "map_128x128_k7_d2": (4, (128, 128), 4, 32, 7, 2, False),
    "map_128x128_k13": (4, (128, 128), 4, 32, 13, 1, False),
    "map_256x256_k13": (1, (256, 256), 4, 32, 13, 1, False),
    "seq_8192_k63": (4, (8192,), 8, 64, 63, 1, False),
    "seq_8192_k63_causal": (4, (8192,), 8, 64, 63, 1, True),
    "vol_16x32x32_k7": (2, (16, 32, 32), 8, 64, 7, 1, False),
}

CHECK_CASES = [
    # na_dim, spatial, kernel, stride, dilation, causal, heads, kv_heads, head_dim, rpb, n_extra
    (1, (37,), 7, 1, 3, False, 2, 1, 32, True, 0),
    (1, (40,), 6, 2, 1, True, 4, 2, 64, False, 3),
    (2, (13, 11), (3, 5), 1, (2, 1), False, 4, 2, 32, True, 0),
    (2, (12, 10), 5, (2, 3), 1, (True, False), 2, 2, 24, False, 2),
    (3, (6, 7, 11), (3, 3, 5), (1, 2, 1), (1, 1, 2), (False, True, False), 2, 1, 64, False, 0),
    (3, (5, 6, 7), 3, 1, 1, False, 2, 2, 128, True, 1),
]
# Max |error| / max |reference| allowed per input dtype (fp32 accumulation; bf16 inputs round to 8 bits).
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _inputs(case, dtype, device, gen):
    na_dim, spatial, ks, stride, dil, causal, heads, kv_heads, dim, with_rpb, n_extra = case
    r = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    t = dict(q=r(2, *spatial, heads, dim), k=r(2, *spatial, kv_heads, dim), v=r(2, *spatial, kv_heads, dim))
    kst = ks if isinstance(ks, tuple) else (ks,) * na_dim
    t["rpb"] = (torch.randn(heads, *(2 * x - 1 for x in kst), generator=gen).to(device).requires_grad_(True)
                if with_rpb else None)
    t["additional_keys"] = r(2, n_extra, kv_heads, dim) if n_extra else None
    t["additional_values"] = r(2, n_extra, kv_heads, dim) if n_extra else None
    return t, dict(kernel_size=ks, stride=stride, dilation=dil, is_causal=causal)


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the error relative to the reference's scale."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def check_backends(device, backends=("triton", "torch", "flex")) -> list[dict]:
    rows = []
    plan = [(b, dt, c) for b in ("triton", "torch") if b in backends for dt in (torch.float32, torch.bfloat16)
            for c in CHECK_CASES]
    # FlexAttention compiles per shape (tens of seconds each): check it on two cases, both dtypes.
    if "flex" in backends:
        plan += [("flex", dt, c) for dt in (torch.float32, torch.bfloat16) for c in (CHECK_CASES[2], CHECK_CASES[5])]
    for backend, dtype, case in plan:
        try:
            rows.append(_check_one(backend, dtype, case, device))
        except Exception as e:  # report and go on
            print(f"check {backend:6s} {str(dtype):15s} {case[0]}d ERROR {type(e).__name__}: {str(e)[:300]}",
                  flush=True)
            rows.append(dict(backend=backend, dtype=str(dtype), case=str(case), ok=False,
                             error=f"{type(e).__name__}: {str(e)[:300]}"))
    return rows


def _check_one(backend, dtype, case, device) -> dict:
    gen = torch.Generator().manual_seed(0)
    t, kw = _inputs(case, dtype, device, gen)
    with K.use_backend(backend):
        out, lse = NA[case[0]](**t, **kw, return_lse=True)
    grad = torch.randn(out.shape, generator=gen).to(device)
    (out.float() * grad).sum().backward()
    ref_in = {n: (x.detach().double().cpu().requires_grad_(True) if x is not None else None)
              for n, x in t.items()}
    ref, ref_lse = na_reference(**ref_in, **kw)
    (ref * grad.double().cpu()).sum().backward()
    errs = {"out": _max_rel(out, ref), "lse": _max_rel(lse, ref_lse)}
    for n, x in t.items():
        if x is not None:
            errs[f"d{n}"] = _max_rel(x.grad, ref_in[n].grad)
    worst = max(errs.values())
    ok = worst < TOL[dtype]
    print(f"check {backend:6s} {str(dtype):15s} {case[0]}d {'OK ' if ok else 'BAD'} worst rel err "
          f"{worst:.2e} " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
    return dict(backend=backend, dtype=str(dtype), case=str(case), ok=ok, **errs)


def check_summary(rows: list[dict]) -> str:
    """Per backend: cases within tolerance, cases outside it, and cases the backend could not run at all (an
    exception, e.g. FlexAttention failing to compile its backward for a large head_dim), kept apart."""
    parts = []
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == backend]
        ok = sum(r["ok"] for r in mine)
        errors = sum("error" in r for r in mine)
        parts.append(f"{backend}: {ok}/{len(mine)} within tolerance, {len(mine) - ok - errors} outside, "
                     f"{errors} could not run")
    return "; ".join(parts)


def check_large(device) -> dict:
    """Triton bf16 vs torch float32 on a NAT-T stage-1 problem with rpb (forward and all gradients)."""
    gen = torch.Generator().manual_seed(1)
    shape = (8, 56, 56, 2, 32)
    base = {n: torch.randn(shape, generator=gen).to(device) for n in "qkv"}
    rpb = torch.randn(2, 13, 13, generator=gen).to(device)
    res = {}
    for backend, dtype in (("torch", torch.float32), ("triton", torch.bfloat16)):
        t = {n: x.detach().clone().to(dtype).requires_grad_(True) for n, x in base.items()}
        r = rpb.clone().requires_grad_(True)
        with K.use_backend(backend):
            out = na2d(t["q"], t["k"], t["v"], 7, dilation=2, rpb=r)
        out.float().square().sum().backward()
        res[backend] = [out.float(), t["q"].grad.float(), t["k"].grad.float(), t["v"].grad.float(), r.grad.float()]
    errs = {n: _max_rel(a, b) for n, a, b in zip(["out", "dq", "dk", "dv", "drpb"], res["triton"], res["torch"])}
    print("check large (triton bf16 vs torch fp32, 8x56x56x2x32 k7 d2 rpb): " +
          " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
    return errs


def kept_pairs(spatial, kernel, dilation, causal) -> int:
    na_dim = len(spatial)
    tup = lambda x: x if isinstance(x, tuple) else (x,) * na_dim
    _, valid, _ = neighbor_tables(spatial, tup(kernel), (1,) * na_dim, tup(dilation), tup(causal))
    return math.prod(spatial) * math.prod(tup(kernel)) if valid is None else int(valid.sum())


def graph_ms(fn) -> float:
    """``do_bench`` median of ``fn`` captured once in a CUDA graph and replayed (warmed up on a side stream)."""
    from triton.testing import do_bench

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=10, rep=50)


def eager_ms(fn, rounds: int = 3) -> float:
    """Eager (host launch path included) time: the best of ``rounds`` ``do_bench`` medians. Host-bound calls
    vary by up to ~30% between moments on a shared host; the best median is the steadiest estimate. A second of
    untimed calls first: eager calls measured right after a FlexAttention compile in the same process run slow
    for a moment (H100, 2026-11-24: NAT-T stage 1 0.223 -> 0.317 -> 0.222 ms), which would bias whichever
    backend is timed next."""
    from triton.testing import do_bench

    end = time.perf_counter() + 1.0
    while time.perf_counter() < end:
        fn()
    torch.cuda.synchronize()
    return min(do_bench(fn, warmup=10, rep=50) for _ in range(rounds))


def bench_shape(name, cfg, device) -> dict:
    batch, spatial, heads, dim, kernel, dilation, causal = cfg
    na_dim = len(spatial)
    n = math.prod(spatial)
    # FlexAttention recompiles per shape and grad mode: a fresh dynamo cache per shape keeps it under the
    # recompile limit (past it, flex silently runs eagerly and materialises the full score matrix).
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, *spatial, heads, dim, generator=gen).to(device, torch.bfloat16) for _ in range(3))
    grad = torch.randn(q.shape, generator=gen).to(device, torch.bfloat16)
    pairs = kept_pairs(spatial, kernel, dilation, causal)
    flops_fwd = 4 * batch * heads * pairs * dim
    row = dict(shape=name, batch=batch, spatial=spatial, heads=heads, head_dim=dim, kernel=kernel,
               dilation=dilation, causal=causal, tokens=n, window=pairs / n)

    def na_call(backend, requires_grad):
        qq, kk, vv = (x.detach().requires_grad_(requires_grad) for x in (q, k, v))

        def f():
            with K.use_backend(backend):
                return NA[na_dim](qq, kk, vv, kernel, dilation=dilation, is_causal=causal)
        return f, (qq, kk, vv)

    def dense_call(requires_grad):
        qq, kk, vv = (x.detach().reshape(batch, n, heads, dim).transpose(1, 2).contiguous()
                      .requires_grad_(requires_grad) for x in (q, k, v))
        g = grad.reshape(batch, n, heads, dim).transpose(1, 2)

        def f():
            return F.scaled_dot_product_attention(qq, kk, vv, is_causal=bool(causal) and na_dim == 1)
        return f, (qq, kk, vv), g

    variants = {}
    for label in ("ours", "flex", "sdpa"):
        try:
            if label == "sdpa":
                f, _, _ = dense_call(False)
                fb, insb, gb = dense_call(True)
            else:
                backend = "triton" if label == "ours" else "flex"
                f, _ = na_call(backend, False)
                fb, insb = na_call(backend, True)
                gb = grad
            with torch.no_grad():
                f()  # first call: compile / tune outside the timing
                fwd_ms = eager_ms(f)

            def fwd_bwd(fb=fb, insb=insb, gb=gb):
                out = fb()
                torch.autograd.grad(out, insb, gb)
            fwd_bwd()
            fb_ms = eager_ms(fwd_bwd)
            # The same calls replayed from a CUDA graph: device time without the host's launch path.
            try:
                with torch.no_grad():
                    fwd_graph = graph_ms(f)
                fb_graph = graph_ms(fwd_bwd)
            except Exception as e:  # e.g. a backend that copies host data while capturing
                fwd_graph = fb_graph = float("nan")
                print(f"  {name} {label}: no CUDA-graph timing ({type(e).__name__}: {str(e)[:120]})", flush=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
            fwd_bwd()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
            best_fwd, best_fb = min(fwd_ms, fwd_graph), min(fb_ms, fb_graph)  # min() skips a NaN graph time
            variants[label] = dict(fwd_ms=fwd_ms, fwd_bwd_ms=fb_ms, fwd_graph_ms=fwd_graph, fwd_bwd_graph_ms=fb_graph,
                                   peak_mib=peak, fwd_tflops=flops_fwd / best_fwd * 1e-9,
                                   fwd_bwd_tflops=3.5 * flops_fwd / best_fb * 1e-9)
        except Exception as e:  # report, keep going with the other variants and shapes
            variants[label] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            print(f"  {name} {label} failed: {variants[label]['error']}", flush=True)
    row["variants"] = variants
    return row


def fmt_table(rows) -> str:
    """Markdown: per shape and pass, device time (CUDA-graph replay) and eager time of ours / flex / SDPA."""
    head = ("| shape | B | H | D | pass | ours ms | flex ms | SDPA ms | flex/ours | SDPA/ours (ideal) | "
            "ours TFLOP/s | eager ms ours / flex / SDPA | eager flex/ours | peak MiB ours/flex/SDPA |")
    lines = [head, "|" + "---|" * 14]
    nan = float("nan")
    for r in rows:
        v = r["variants"]
        for key, label, tf in (("fwd", "fwd", "fwd_tflops"), ("fwd_bwd", "fwd+bwd", "fwd_bwd_tflops")):
            g = {x: v.get(x, {}).get(f"{key}_graph_ms", nan) for x in ("ours", "flex", "sdpa")}
            e = {x: v.get(x, {}).get(f"{key}_ms", nan) for x in ("ours", "flex", "sdpa")}
            ideal = r["tokens"] / r["window"]
            peaks = "/".join(f"{v.get(x, {}).get('peak_mib', nan):.0f}" for x in ("ours", "flex", "sdpa"))
            lines.append(
                f"| {r['shape']} | {r['batch']} | {r['heads']} | {r['head_dim']} | {label} | {g['ours']:.3f} | "
                f"{g['flex']:.3f} | {g['sdpa']:.3f} | {g['flex'] / g['ours']:.2f}x | "
                f"{g['sdpa'] / g['ours']:.1f}x ({ideal:.0f}x) | {v.get('ours', {}).get(tf, nan):.1f} | "
                f"{e['ours']:.3f} / {e['flex']:.3f} / {e['sdpa']:.3f} | {e['flex'] / e['ours']:.2f}x | {peaks} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names from SHAPES")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--check-backends", default="triton,torch,flex")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="start no new shape after this")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/na.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    import triton

    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(meta, flush=True)
    result = dict(meta=meta, checks=[], large_check=None, rows=[])
    path = os.path.join(args.out, "na_bench.json")

    def save():
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1, default=str)

    if not args.skip_check:
        t0 = time.time()
        result["checks"] = check_backends(device, tuple(args.check_backends.split(",")))
        result["large_check"] = check_large(device)
        save()
        print(f"checks done in {time.time() - t0:.0f} s; {check_summary(result['checks'])}", flush=True)
    start = time.time()
    for name in args.shapes.split(","):
        if time.time() - start > args.budget_s:
            print(f"time budget spent: skipping {name}", flush=True)
            continue
        t0 = time.time()
        row = bench_shape(name, SHAPES[name], device)
        result["rows"].append(row)
        save()
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)
        print(fmt_table(result["rows"][-1:]), flush=True)
    print(fmt_table(result["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
