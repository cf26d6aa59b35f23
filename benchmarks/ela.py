"""ELA on the GPU: the fused ELA kernels vs the PyTorch path, checked then timed (module and models), one call.

1. Checks (fp32): ``attnzoo.kernels.ela_attention`` on the triton backend vs the same weights on the torch path
   in float64, forward and every gradient, at ResNet-50 / MobileNetV2 shapes, NCHW / channels_last, non-square
   and wider-than-one-tile maps, ELA-S and the depthwise ELA-B.
2. Module timings at ResNet-50's stage shapes (batch 128, bf16 autocast, NCHW), median ms of
   ``triton.testing.do_bench``: timm's bare block tail ``relu(x + shortcut)`` (what ELA is added to), ELA + tail
   on the torch path and fused, forward and forward+backward, plus the host microseconds per call.
3. Model rows with benchmarks/models.py's own ``run_row`` (same method as its table), each with the host time to
   enqueue one inference forward next to its wall time: resnet50 vs resnet50_ela (fused and torch path),
   mobilenetv2_100 vs mobilenetv2_100_ela, tnt_s_patch16_224 vs ptnt_s_patch16_256.
4. Optionally (``--profile``) a torch.profiler table of resnet50_ela's inference forward under $OUT.
5. Or only (``--paired ROUNDS``) resnet50 vs resnet50_ela in interleaved rounds, both models resident, with the
   per-round cost 1 - ela / host of inference and of a training step (:func:`paired_rounds`).

    PYTHONPATH=$PWD python benchmarks/ela.py --out $OUT [--rows resnet mobilenet tnt] [--profile]
    PYTHONPATH=$PWD python benchmarks/ela.py --out $OUT --paired 7
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import timm  # noqa: E402
from models import bench_ms, run_row  # noqa: E402

import attnzoo  # noqa: E402,F401
from attnzoo.kernels import ela_attention, use_backend  # noqa: E402
from attnzoo.vision.ela import ELA_VERSIONS  # noqa: E402

STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]  # ResNet-50 block outputs at 224x224
# (label, model, backend: None = timm/auto, "triton" = fused ELA, "torch" = PyTorch path, image size, kwargs)
_NONZERO = {"zero_init_last": False}  # timm zeroes each ResNet block's last BN: ELA's input is then all zeros
MODEL_ROWS = {
    "resnet": [("resnet50 [timm]", "resnet50", None, 224, {}),
               ("resnet50_ela [fused]", "resnet50_ela", "triton", 224, {}),
               ("resnet50_ela [torch path]", "resnet50_ela", "torch", 224, {})],
    "resnet_nonzero": [("resnet50 [timm, zero_init_last=False]", "resnet50", None, 224, _NONZERO),
                       ("resnet50_ela [fused, zero_init_last=False]", "resnet50_ela", None, 224, _NONZERO),
                       ("resnet50_ela [torch path, zero_init_last=False]", "resnet50_ela", "torch", 224, _NONZERO)],
    "mobilenet": [("mobilenetv2_100 [timm]", "mobilenetv2_100", None, 224, {}),
                  # automatic backend (fused on CUDA as of 2026-11-24): no fp32 check, fewer compiles in the call
                  ("mobilenetv2_100_ela [auto: fused]", "mobilenetv2_100_ela", None, 224, {}),
                  ("mobilenetv2_100_ela [torch path]", "mobilenetv2_100_ela", "torch", 224, {})],
    "tnt": [("tnt_s_patch16_224 [timm]", "tnt_s_patch16_224", None, 224, {}),
            ("ptnt_s_patch16_256 [sdpa]", "ptnt_s_patch16_256", None, 256, {})],
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def ela_params(c: int, version: str, gen: torch.Generator) -> list[torch.Tensor]:
    k, cg, _ = ELA_VERSIONS[version]
    return [torch.randn(c, cg, k, device="cuda", generator=gen) / (cg * k) ** 0.5,
            torch.randn(c, device="cuda", generator=gen), torch.randn(c, device="cuda", generator=gen)]


def check(shape: tuple[int, int, int, int], version: str, channels_last: bool, residual: bool) -> dict[str, object]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = ela_params(shape[1], version, gen)
    groups = ELA_VERSIONS[version][2]
    x = torch.randn(shape, device="cuda", generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    s, g = torch.randn(shape, device="cuda", generator=gen), torch.randn(shape, device="cuda", generator=gen)
    res = {}
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        ins = [t.to(dtype).requires_grad_() for t in (x, *params, *([s] if residual else []))]
        with use_backend(backend):
            out = ela_attention(*ins[:4], groups, 1e-5, ins[4] if residual else None, "relu" if residual else None)
            res[backend] = [out.detach(), *torch.autograd.grad(out, ins, g.to(dtype))]
    names = ["out", "dx", "dconv", "dgn_w", "dgn_b", "dshortcut"]
    errs = {n: rel(a, e) for n, a, e in zip(names, res["triton"], res["torch"])}
    return {"check": f"ELA-{version} {shape} {'channels_last' if channels_last else 'nchw'} "
                     f"{'+shortcut+relu' if residual else 'alone'}", **errs}


def run_checks() -> list[dict]:
    rows = []
    # batch 16 at ResNet stage shapes: the same integer specializations (multiples of 16) as the timed batch 128
    for shape, version, cl, residual in [((16, 256, 56, 56), "S", False, True), ((16, 2048, 7, 7), "S", True, True),
                                         ((4, 144, 56, 56), "S", False, False), ((2, 32, 5, 300), "S", False, True),
                                         ((4, 64, 20, 33), "B", True, False)]:
        rows.append(check(shape, version, cl, residual))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def host_us(fn, n: int = 30) -> float:
    """Host microseconds per call of ``fn`` (launch path only: no sync inside the timed loop)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return round(host, 1)


def bench(fn) -> float:
    from triton.testing import do_bench

    return round(do_bench(fn, warmup=10, rep=60, return_mode="median"), 4)


def time_stage(batch: int, c: int, hw: int) -> dict[str, object]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [p.requires_grad_() for p in ela_params(c, "S", gen)]
    x = torch.randn(batch, c, hw, hw, device="cuda", dtype=torch.bfloat16)
    s, g = torch.randn_like(x), torch.randn_like(x)
    xg, sg = x.clone().requires_grad_(), s.clone().requires_grad_()
    row: dict[str, object] = {"shape": f"{batch}x{c}x{hw}x{hw}"}

    def ela_tail(a, b):
        return ela_attention(a, *params, 16, 1e-5, b, "relu")

    def tail(a, b):  # timm's block tail without attention
        return torch.relu(a + b)

    def infer(fn, a, b):
        def run():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                fn(a, b)
        return run

    def train(fn):
        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fn(xg, sg)
            out.backward(g)
            xg.grad = sg.grad = None
            for p in params:
                p.grad = None
        return run

    for key, fn, backend in [("tail", tail, "torch"), ("torch", ela_tail, "torch"), ("fused", ela_tail, "triton")]:
        with use_backend(backend):
            row[f"fwd_ms {key}"] = bench(infer(fn, x, s))
            row[f"fwdbwd_ms {key}"] = bench(train(fn))
            row[f"fwd_host_us {key}"] = host_us(infer(fn, x, s))  # enqueue time: no sync inside the loop
    return row


def time_pieces(batch: int, c: int, hw: int) -> dict[str, object]:
    """Median ms of each launch of the fused op (bf16 map, float32 parameters) and a device copy of the map."""
    from attnzoo.kernels import _ela_triton as E

    gen = torch.Generator(device="cuda").manual_seed(0)
    conv_weight, gamma, beta = ela_params(c, "S", gen)
    x = torch.randn(batch, c, hw, hw, device="cuda", dtype=torch.bfloat16)
    s, dout = torch.randn_like(x), torch.randn_like(x)
    plan = E._ela_plan(x, True, conv_weight, gamma, 16)
    means, conv_out, gates, out = E._ela_forward(plan, x, conv_weight, gamma, beta, 1e-5, s, keep_conv=True)
    dgates, d = E._strip_sums(x, dout, out, gates, store_dpre=True)
    du, dmeans = (torch.empty(plan.n_strips, device="cuda") for _ in range(2))
    part = torch.empty((plan.n_sb, c, plan.taps + 2), device="cuda")
    copy_dst = torch.empty_like(x)
    pieces = {
        "copy (read+write)": lambda: copy_dst.copy_(x),
        "means": lambda: E._strip_sums(x, row_scale=1.0 / hw, col_scale=1.0 / hw),
        "gates fwd (conv, GroupNorm, sigmoid)": lambda: plan.gates((means, conv_weight, gamma, beta, gates, gates),
                                                                   (1e-5,)),
        "gates fwd, conv output kept": lambda: plan.gates_keep((means, conv_weight, gamma, beta, conv_out, gates),
                                                               (1e-5,)),
        "gating+shortcut+relu": lambda: E._apply_gates(x, gates, shortcut=s, relu=True),
        "bwd reduce": lambda: E._strip_sums(x, dout, out, gates, store_dpre=True),
        "gates bwd": lambda: plan.gates_bwd((means, conv_out, conv_weight, gamma, beta, dgates, du, dmeans, part),
                                            (1e-5,)),
        "partials sum": lambda: part.sum(0),
        "dx": lambda: E._apply_gates(d, gates, dmeans, out_dtype=x.dtype, a_scales=(1.0 / hw, 1.0 / hw)),
    }
    return {"shape": f"{batch}x{c}x{hw}x{hw}", **{f"ms {k}": bench(fn) for k, fn in pieces.items()}}


def time_module(batch: int) -> list[dict]:
    rows: list[dict] = []
    for c, hw in STAGES:
        rows.append({**time_stage(batch, c, hw), **time_pieces(batch, c, hw)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def host_probe(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Median host ms to enqueue one inference forward (no sync inside) and its wall ms (with the sync)."""
    host, wall = [], []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        host.append((t1 - t0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)
    return {"infer_host_ms": round(sorted(host)[2], 2), "infer_wall_ms": round(sorted(wall)[2], 2)}


def model_rows(groups: list[str], batch: int, out: Path) -> list[dict]:
    rows = []
    for group in groups:
        for label, name, backend, size, kwargs in MODEL_ROWS[group]:
            t0 = time.time()
            try:
                row = run_row(label, lambda n=name, kw=kwargs: timm.create_model(n, **kw), backend, batch, size,
                              probe=host_probe)
            except Exception as exc:  # a row that cannot run is reported, not hidden
                row = {"label": label, "error": f"{type(exc).__name__}: {exc}"[:300]}
                torch.cuda.empty_cache()
            row["seconds"] = round(time.time() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
            with (out / "ela_models.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


def profile_model(name: str, batch: int, out: Path) -> None:
    """torch.profiler over one inference forward (bf16 autocast); table to out/."""
    from torch.profiler import ProfilerActivity, profile

    model = timm.create_model(name).cuda().eval()
    x = torch.randn(batch, 3, 224, 224, device="cuda")

    def infer():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)

    for _ in range(3):
        infer()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        infer()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=30)
    (out / f"profile_{name}.txt").write_text(table)
    print(table[:4000], flush=True)


def paired_rounds(host: str, variant: str, batch: int, rounds: int, out: Path) -> dict[str, object]:
    """``host`` vs ``variant`` (e.g. resnet50 vs resnet50_ela) in interleaved rounds with both models resident, the
    order alternating: per round, inference (median of 10 forwards) and training-step (median of 8 steps, AdamW)
    img/s of each, batch ``batch``, 224 px, bf16 autocast, eager; the variant's cost is the median over rounds of
    1 - variant / host (a per-round ratio cancels the host's drift between rounds)."""
    torch.manual_seed(0)
    models = {n: timm.create_model(n).cuda() for n in (host, variant)}
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in models.items()}
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 1000, (batch,), device="cuda")

    def infer(m: torch.nn.Module) -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            m(x)

    def train(n: str) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(models[n](x), labels)
        loss.backward()
        opts[n].step()
        opts[n].zero_grad(set_to_none=True)

    per_round = []
    for r in range(rounds):
        row: dict[str, object] = {"round": r}
        for n in (host, variant) if r % 2 == 0 else (variant, host):
            models[n].eval()
            row[f"{n}_infer_img_s"] = round(batch / bench_ms(lambda n=n: infer(models[n]), 3, 10) * 1e3, 1)
            models[n].train()
            row[f"{n}_train_img_s"] = round(batch / bench_ms(lambda n=n: train(n), 2, 8) * 1e3, 1)
        for mode in ("infer", "train"):
            row[f"{mode}_cost"] = round(1 - row[f"{variant}_{mode}_img_s"] / row[f"{host}_{mode}_img_s"], 4)
        per_round.append(row)
        print(json.dumps(row), flush=True)
        with (out / "ela_paired.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
    summary: dict[str, object] = {"host": host, "variant": variant, "batch": batch, "rounds": rounds}
    for mode in ("infer", "train"):
        costs = sorted(r[f"{mode}_cost"] for r in per_round)
        summary[f"{mode}_cost_median"] = costs[len(costs) // 2]
        summary[f"{mode}_cost_range"] = (costs[0], costs[-1])
    print(json.dumps(summary), flush=True)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "runs"))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rows", nargs="*", default=list(MODEL_ROWS), choices=list(MODEL_ROWS))
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--skip-module", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                        help="only resnet50 vs resnet50_ela in this many interleaved rounds (see paired_rounds)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/ela.py needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, object] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                 "triton": triton.__version__, "timm": timm.__version__,
                                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(result), flush=True)
    if args.paired:
        result["paired"] = paired_rounds("resnet50", "resnet50_ela", args.batch, args.paired, out)
        (out / "ela.json").write_text(json.dumps(result, indent=1))
        return 0
    if not args.skip_checks:
        torch.backends.cuda.matmul.allow_tf32 = False  # checks in true fp32
        torch.backends.cudnn.allow_tf32 = False
        result["checks"] = run_checks()
    if not args.skip_module:
        result["module"] = time_module(args.batch)
    (out / "ela.json").write_text(json.dumps(result, indent=1))
    result["models"] = model_rows(args.rows, args.batch, out)
    (out / "ela.json").write_text(json.dumps(result, indent=1))
    if args.profile:
        profile_model("resnet50_ela", args.batch, out)

    print(f"\n{result['device']}, torch {result['torch']}, triton {result['triton']}, timm {result['timm']}, "
          f"{result['date']}")
    for r in result.get("checks", []):
        print(f"| {r['check']} | " + " | ".join(f"{k} {v:.1e}" for k, v in r.items() if k != "check") + " |")
    mod = result.get("module", [])
    if mod:
        print("\n| metric | " + " | ".join(r["shape"] for r in mod) + " |")
        for k in (k for k in mod[0] if k != "shape"):
            print(f"| {k} | " + " | ".join(str(r[k]) for r in mod) + " |")
    cols = ["label", "infer_img_s", "infer_host_ms", "infer_wall_ms", "infer_peak_GB", "train_img_s", "train_peak_GB",
            "rel_err_vs_torch_fp32", "error"]
    print("\n| " + " | ".join(cols) + " |")
    for r in result["models"]:
        print("| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
