"""Where the fused NA time goes: per-kernel GPU time of the forward and of both backward kernels, per tile config.

Run on a CUDA machine: ``python benchmarks/na_breakdown.py [--shapes NAME,...] [--out DIR]``.

For every shape of ``benchmarks/na.py`` and every candidate (query tile, key tile, warps, stages) config, the
three Triton kernels are forced to that config and profiled with ``torch.profiler`` (device time of each kernel,
averaged over ``--iters`` calls, so host launch overhead does not count). Then the autotuned op is timed end to
end with ``do_bench`` (forward, forward+backward through autograd) next to the host time per call, which shows
whether a shape is bound by the GPU or by the Python launch path. Results: ``OUT/na_breakdown.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from na import NA, SHAPES  # noqa: E402

import attnzoo.kernels as K  # noqa: E402
from attnzoo.kernels import _na_triton as T  # noqa: E402

# Candidates beyond the shipped ones (the union is profiled).
EXTRA = {
    1: [((1, 1, 64), (1, 1, 32), 4, 3), ((1, 1, 128), (1, 1, 32), 4, 3), ((1, 1, 64), (1, 1, 64), 4, 2),
        ((1, 1, 32), (1, 1, 64), 4, 3)],
    2: [((1, 8, 8), (1, 8, 8), 4, 2), ((1, 16, 16), (1, 8, 8), 8, 2), ((1, 16, 8), (1, 8, 8), 4, 3),
        ((1, 8, 16), (1, 8, 8), 4, 3), ((1, 16, 16), (1, 16, 16), 8, 2), ((1, 8, 8), (1, 4, 8), 4, 3),
        ((1, 4, 16), (1, 4, 16), 4, 3)],
    3: [((2, 4, 8), (2, 4, 4), 4, 3), ((4, 4, 4), (2, 4, 4), 4, 3), ((2, 8, 8), (2, 4, 8), 8, 2),
        ((1, 8, 8), (1, 8, 8), 4, 3)],
}


def kernel_times(fn, iters: int) -> dict[str, float]:
    """Average device microseconds per call of ``fn`` by kernel name (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    acc: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            name = ev.name
            short = ("fwd" if "_na_fwd" in name else "dq" if "_na_bwd_dq" in name else
                     "dkdv" if "_na_bwd_dkdv" in name else "other")
            acc[short] += ev.device_time / iters
    return dict(acc)


def shape_inputs(cfg, device):
    batch, spatial, heads, dim, kernel, dilation, causal = cfg
    gen = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(batch, *spatial, heads, dim, generator=gen).to(device, torch.bfloat16)
                  for _ in range(4))
    return q, k, v, g


def profile_configs(name, cfg, device, iters) -> list[dict]:
    batch, spatial, heads, dim, kernel, dilation, causal = cfg
    na_dim = len(spatial)
    q, k, v, g = shape_inputs(cfg, device)
    tup = lambda x: x if isinstance(x, tuple) else (x,) * na_dim
    args = (tup(kernel), (1,) * na_dim, tup(dilation), tup(causal), q.shape[-1] ** -0.5, None, None, None)
    shipped = list(T._GPU_CONFIGS[na_dim])
    rows = []
    for c in shipped + [c for c in EXTRA[na_dim] if c not in shipped]:
        T._GPU_CONFIGS[na_dim] = [c]
        T._PLANS.clear()
        try:
            out, lse = T.na_forward(q, k, v, *args)

            def step(out=out, lse=lse):
                T.na_forward(q, k, v, *args)
                T.na_backward(g, q, k, v, out, lse, *args)
            t = kernel_times(step, iters)
            row = dict(shape=name, config=str(c), **{x: round(t.get(x, 0.0), 1) for x in ("fwd", "dq", "dkdv",
                                                                                          "other")})
        except Exception as e:  # a config this GPU cannot run
            row = dict(shape=name, config=str(c), error=f"{type(e).__name__}: {str(e)[:200]}")
        print(row, flush=True)
        rows.append(row)
    T._GPU_CONFIGS[na_dim] = shipped
    T._PLANS.clear()
    return rows


def end_to_end(name, cfg, device) -> dict:
    from triton.testing import do_bench

    batch, spatial, heads, dim, kernel, dilation, causal = cfg
    na_dim = len(spatial)
    q, k, v, g = shape_inputs(cfg, device)
    qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))

    def fwd():
        with torch.no_grad(), K.use_backend("triton"):
            return NA[na_dim](q, k, v, kernel, dilation=dilation, is_causal=causal)

    def fwd_bwd():
        with K.use_backend("triton"):
            out = NA[na_dim](qq, kk, vv, kernel, dilation=dilation, is_causal=causal)
        torch.autograd.grad(out, (qq, kk, vv), g)

    res = dict(shape=name)
    for label, f in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        f()
        res[f"{label}_ms"] = do_bench(f, warmup=10, rep=50)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            f()
        host = (time.perf_counter() - t0) / 20  # launch-path time: no sync inside the loop
        torch.cuda.synchronize()
        res[f"{label}_host_ms"] = host * 1e3
    print(res, flush=True)
    return res


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-configs", action="store_true", help="only the end-to-end timing")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/na_breakdown.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, configs=[], end_to_end=[])
    path = os.path.join(args.out, "na_breakdown.json")
    for name in args.shapes.split(","):
        t0 = time.time()
        if not args.no_configs:
            result["configs"] += profile_configs(name, SHAPES[name], device, args.iters)
        result["end_to_end"].append(end_to_end(name, SHAPES[name], device))
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)
    print("| shape | config | fwd us | dq us | dkdv us | other us |")
    for r in result["configs"]:
        if "error" not in r:
            print(f"| {r['shape']} | {r['config']} | {r['fwd']} | {r['dq']} | {r['dkdv']} | {r['other']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
