"""ELA on the GPU: the fused strip kernels vs the PyTorch path, checked then timed (module and models).

1. Checks (fp32): the ELA module and the fused ResNet block tail on the triton backend vs the same
   weights on the torch path in float64, forward and backward, NCHW / channels_last / non-square maps;
   resnet50_ela end to end (eval, fp32) triton vs torch.
2. Module timings at ResNet-50's stage shapes (batch 128, bf16 autocast, NCHW), median ms of
   ``triton.testing.do_bench``: timm's bare block tail ``relu(x + shortcut)`` (what ELA is added to),
   ELA + tail on the torch path and fused, forward and forward+backward, plus the fused pieces alone
   (strip means, gating, the small conv1d + GroupNorm + sigmoid part under autocast and in float32), host
   microseconds per call (the launch path), and a device copy for the bandwidth ceiling.
3. A torch.profiler table of resnet50_ela (inference forward and training step) under $OUT.
4. Model rows with benchmarks/models.py's own ``run_row`` (same method as its table): resnet50_ela on the
   torch path, and fused with the strip part in float32 without autocast at inference; the host and the
   default fused row come from ``benchmarks/models.py --only resnet50`` (or ``--models`` here).

    PYTHONPATH=$PWD python benchmarks/ela.py --out $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import timm  # noqa: E402

import attnzoo  # noqa: E402,F401
from attnzoo.kernels import apply_strip_gates, strip_means, use_backend  # noqa: E402
from attnzoo.vision.ela import EfficientLocalAttention  # noqa: E402

STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]  # ResNet-50 block outputs at 224x224


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check_module(shape: tuple[int, int, int, int], channels_last: bool, residual: bool) -> dict[str, float]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    c = shape[1]
    ela = EfficientLocalAttention(c, "S").cuda()
    with torch.no_grad():
        ela.gn.weight.normal_(generator=gen)
        ela.gn.bias.normal_(generator=gen)
    x = torch.randn(shape, device="cuda", generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    s = torch.randn(shape, device="cuda", generator=gen)
    g = torch.randn(shape, device="cuda", generator=gen)
    res = {}
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        mod = ela.to(dtype)
        xr, sr = x.to(dtype).requires_grad_(), s.to(dtype).requires_grad_()
        with use_backend(backend):
            out = mod.forward_residual(xr, sr) if residual else mod(xr)
            grads = torch.autograd.grad(out, [xr, *mod.parameters()] + ([sr] if residual else []), g.to(dtype))
        res[backend] = [out.detach(), *grads]
    names = ["out", "dx", "dconv", "dgn_w", "dgn_b"] + (["dshortcut"] if residual else [])
    return {n: rel(a, e) for n, a, e in zip(names, res["triton"], res["torch"])}


def run_checks() -> list[dict]:
    rows = []
    for shape, cl, residual in [((8, 256, 56, 56), False, True), ((8, 256, 56, 56), True, True),
                                ((8, 2048, 7, 7), False, True), ((4, 64, 20, 33), False, False),
                                ((4, 64, 20, 33), True, False), ((2, 32, 5, 300), False, True)]:
        errs = check_module(shape, cl, residual)
        rows.append({"check": f"module {shape} {'channels_last' if cl else 'nchw'} "
                              f"{'+shortcut+relu' if residual else 'alone'}", **errs})
        print(json.dumps(rows[-1]), flush=True)
    torch.manual_seed(0)
    model = timm.create_model("resnet50_ela", zero_init_last=False).cuda().eval()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    outs = {}
    for backend in ("triton", "torch"):
        with use_backend(backend):
            model.zero_grad()
            out = model(x)
            out.float().square().mean().backward()
            outs[backend] = (out.detach(), model.conv1.weight.grad.clone(), model.layer1[0].se.conv.weight.grad.clone())
    errs = {n: rel(a, e) for n, a, e in zip(["out", "d_stem_conv", "d_layer1.0.se.conv"], outs["triton"],
                                             outs["torch"])}
    rows.append({"check": "resnet50_ela eval fp32 batch 2, triton vs torch path", **errs})
    print(json.dumps(rows[-1]), flush=True)
    return rows


def host_us(fn, n: int = 40) -> float:
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


def bench(fn, reps: int = 100) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=reps, return_mode="median")


@contextlib.contextmanager
def gate_variant(variant: str) -> Iterator[None]:
    """"float32": ELA's conv + GroupNorm + sigmoid with autocast off, in float32, when no gradient is needed
    (fewer cast kernels and host calls); "autocast": the module as it is (conv in bf16 under autocast)."""
    original = EfficientLocalAttention._gate

    def gate_float32(self, z):
        if torch.is_grad_enabled():  # training keeps the module's path (cuDNN's float32 grouped wgrad is slow)
            return original(self, z)
        with torch.autocast("cuda", enabled=False):
            return torch.sigmoid(self.gn(self.conv(z.float())))

    if variant == "float32":
        EfficientLocalAttention._gate = gate_float32
    try:
        yield
    finally:
        EfficientLocalAttention._gate = original


def time_stage(batch: int, c: int, hw: int) -> dict[str, object]:
    torch.manual_seed(0)
    ela = EfficientLocalAttention(c, "S").cuda()
    x = torch.randn(batch, c, hw, hw, device="cuda", dtype=torch.bfloat16)
    s = torch.randn_like(x)
    g = torch.randn_like(x)
    xg, sg = x.clone().requires_grad_(), s.clone().requires_grad_()
    row: dict[str, object] = {"shape": f"{batch}x{c}x{hw}x{hw}", "map_MB": round(x.numel() * 2 / 1e6, 1)}

    def infer(fn):
        def run():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                fn(x, s)
        return run

    def train(fn):
        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fn(xg, sg)
            out.backward(g)
            xg.grad = sg.grad = None
            ela.zero_grad(set_to_none=True)
        return run

    def tail(a, b):  # timm's block tail without attention
        return torch.relu(a + b)

    variants = [("tail", tail, "torch"), ("ela+tail torch", ela.forward_residual, "torch"),
                ("ela+tail fused", ela.forward_residual, "triton")]
    for key, fn, backend in variants:
        with use_backend(backend):
            row[f"fwd_ms {key}"] = round(bench(infer(fn)), 4)
            row[f"fwdbwd_ms {key}"] = round(bench(train(fn), reps=200), 4)
            row[f"fwd_host_us {key}"] = host_us(infer(fn))
            row[f"fwdbwd_host_us {key}"] = host_us(train(fn), n=10)
    for variant in ("autocast", "float32"):
        with use_backend("triton"), gate_variant(variant), torch.inference_mode(), \
                torch.autocast("cuda", dtype=torch.bfloat16):
            z_h, z_w = strip_means(x)
            gates = partial(ela.gates, z_h, z_w)
            row[f"fwd_ms gates (conv1d+GN+sigmoid) {variant}"] = round(bench(gates), 4)
            row[f"fwd_host_us gates {variant}"] = host_us(gates)
    with use_backend("triton"), torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        z_h, z_w = strip_means(x)
        y_h, y_w = ela.gates(z_h, z_w)
        row["fwd_ms strip_means"] = round(bench(lambda: strip_means(x)), 4)
        row["fwd_host_us strip_means"] = host_us(lambda: strip_means(x))
        row["fwd_ms gating+shortcut+relu"] = round(bench(lambda: apply_strip_gates(x, y_h, y_w, s, "relu")), 4)
        row["fwd_host_us gating+shortcut+relu"] = host_us(lambda: apply_strip_gates(x, y_h, y_w, s, "relu"))
    return row


def profile_model(name: str, batch: int, out: Path) -> dict[str, object]:
    """torch.profiler over one inference forward and one training step (bf16 autocast); tables to out/."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = timm.create_model(name).cuda()
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 1000, (batch,), device="cuda")
    result: dict[str, object] = {}

    def infer():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)

    def train():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)

    for mode, fn in (("eval", infer), ("train", train)):
        getattr(model, mode)()
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        host = time.perf_counter() - t0
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="device_time_total", row_limit=25)
        (out / f"profile_{name}_{mode}.txt").write_text(table + "\n\n" + prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=25))
        result[f"{mode}_host_ms"] = round(host * 1e3, 2)
        result[f"{mode}_wall_ms"] = round(wall * 1e3, 2)
        print(f"--- {name} {mode}: host {host * 1e3:.2f} ms to enqueue, {wall * 1e3:.2f} ms wall\n" + table[:1500],
              flush=True)
    return result


def time_module(batch: int) -> list[dict]:
    rows: list[dict] = []
    src = torch.randn(batch, 256, 56, 56, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    rows.append({"what": "device copy (bandwidth ceiling)", "GB_s": round(2 * src.numel() * 2 / ms / 1e6, 1)})
    print(json.dumps(rows[-1]), flush=True)
    for c, hw in STAGES:
        rows.append(time_stage(batch, c, hw))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def model_rows(names: list[tuple[str, str | None, str]], batch: int) -> list[dict]:
    from models import run_row

    rows = []
    for name, backend, variant in names:
        label = f"{name} [{backend or 'auto'}, strip part {variant}]"
        t0 = time.time()
        with gate_variant(variant):
            row = run_row(label, lambda n=name: timm.create_model(n), backend, batch, 224)
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "runs"))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--models", nargs="*", default=["resnet50_ela:torch:autocast", "resnet50_ela:auto:float32"],
                        help="name:backend:variant (backend auto, torch or triton; variant autocast or float32)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/ela.py needs a CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # checks in true fp32
    torch.backends.cudnn.allow_tf32 = False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, object] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                 "timm": timm.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    import triton

    result["triton"] = triton.__version__
    result["checks"] = run_checks()
    result["module"] = time_module(args.batch)
    (out / "ela.json").write_text(json.dumps(result, indent=1))
    result["profile"] = {"resnet50_ela": profile_model("resnet50_ela", args.batch, out)}
    (out / "ela.json").write_text(json.dumps(result, indent=1))
    if not args.skip_models:
        pairs = [(n, None if b == "auto" else b, v) for n, b, v in (p.split(":") for p in args.models)]
        result["models"] = model_rows(pairs, args.batch)
        (out / "ela.json").write_text(json.dumps(result, indent=1))

    print(f"\n{result['device']}, torch {result['torch']}, triton {result['triton']}, timm {result['timm']}, "
          f"{result['date']}")
    print("\n| check | " + " | ".join(k for k in result["checks"][0] if k != "check") + " |")
    for r in result["checks"]:
        print(f"| {r['check']} | " + " | ".join(f"{v:.1e}" for k, v in r.items() if k != "check") + " |")
    mod = [r for r in result["module"] if "shape" in r]
    keys = [k for k in mod[0] if k not in ("shape", "map_MB")]
    print(f"\n{result['module'][0]}\n\n| metric | " + " | ".join(r["shape"] for r in mod) + " |")
    for k in keys:
        print(f"| {k} | " + " | ".join(str(r[k]) for r in mod) + " |")
    for r in result.get("models", []):
        print({k: r.get(k) for k in ("label", "infer_img_s", "infer_peak_GB", "train_img_s", "train_peak_GB",
                                     "rel_err_vs_torch_fp32", "error")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
