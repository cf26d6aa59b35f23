"""torch.compile check of a NAT model on the fused kernels: one graph, same output as eager, img/s of both.

The fused NA kernels are torch.library custom ops, so ``torch.compile(model, fullgraph=True)`` must
trace the whole model as one graph (it raises on any graph break). The script compiles the model,
compares its output with the eager model's (bf16 autocast tolerance), and times eager vs compiled
inference at the given batch (CUDA events, medians); ``--train`` adds the same for forward+backward,
gradients compared too (about a minute more of compilation).

    PYTHONPATH=$PWD python benchmarks/compile_check.py                    # nat_tiny, batch 64, CUDA
    PYTHONPATH=$PWD python benchmarks/compile_check.py --train --model dinat_tiny
    python benchmarks/compile_check.py --cpu --tiny                       # CPU smoke test (Triton interpreter)

Exit status 1 when an output or gradient check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

if "--cpu" in sys.argv:  # the interpreter must be chosen before triton is imported (timm imports it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import timm  # noqa: E402
from models import bench_ms  # noqa: E402  (benchmarks/models.py: median ms, CUDA events or wall clock)

import attnzoo  # noqa: E402,F401  (registers the models)
from attnzoo.kernels import use_backend  # noqa: E402

# A reduced DiNAT for the CPU smoke test: every stage, dilated and plain layers, padded small maps.
TINY = dict(depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), embed_dim=16, dilations=((2,), (1,), (1,), (1,)),
            kernel_size=3, num_classes=10)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nat_tiny", help="timm model name (an attnzoo NA model)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224, help="input image size")
    parser.add_argument("--train", action="store_true", help="also compile and time forward+backward")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--tol", type=float, default=2e-2,
                        help="max relative error (norm) compiled vs eager; bf16 autocast rounds to ~4e-3 per op")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (Triton interpreter; slow)")
    parser.add_argument("--tiny", action="store_true", help="a reduced model and input (smoke test)")
    args = parser.parse_args()

    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: pass --cpu --tiny for the CPU smoke test", file=sys.stderr)
        return 2
    batch, size = (2, 24) if args.tiny else (args.batch, args.size)
    warmup, reps = (1, 2) if device.type == "cpu" else (3, 10)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 autocast on CUDA, fp32 on the CPU

    def amp() -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=dtype) if device.type == "cuda" else contextlib.nullcontext()

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(0)
    # no stochastic depth: eager and compiled training steps must see the same network
    kwargs = dict(TINY, drop_path_rate=0.0) if args.tiny else dict(drop_path_rate=0.0)
    model = timm.create_model(args.model, **kwargs).to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    failed = False
    rows = []
    with use_backend("triton"):
        compiled = torch.compile(model, fullgraph=True, backend=args.compile_backend)

        def infer(m: torch.nn.Module) -> Callable[[], torch.Tensor]:
            def run() -> torch.Tensor:
                with torch.inference_mode(), amp():
                    return m(x)

            return run

        want = infer(model)()
        t0 = time.perf_counter()
        got = infer(compiled)()  # compiles here; fullgraph=True raises on a graph break
        compile_s = time.perf_counter() - t0
        err = rel_err(got.float(), want.float())
        ok = err <= args.tol
        failed |= not ok
        print(f"inference: compiled vs eager rel err {err:.2e} (tol {args.tol:.0e}) {'ok' if ok else 'FAIL'}; "
              f"max abs diff {(got.float() - want.float()).abs().max().item():.3e}")
        eager_ms = bench_ms(infer(model), warmup, reps, device)
        compiled_ms = bench_ms(infer(compiled), warmup, reps, device)
        rows.append(("inference", eager_ms, compiled_ms, compile_s))

        if args.train:
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]

            def step(m: torch.nn.Module) -> Callable[[], tuple[torch.Tensor, ...]]:
                def run() -> tuple[torch.Tensor, ...]:
                    with amp():
                        out = m(x)
                    return torch.autograd.grad(out.float().square().mean(), params)

                return run

            want_grads = step(model)()
            t0 = time.perf_counter()
            got_grads = step(compiled)()
            train_compile_s = time.perf_counter() - t0
            err = rel_err(torch.cat([g.flatten().float() for g in got_grads]),
                          torch.cat([g.flatten().float() for g in want_grads]))
            rpb_errs = [rel_err(g, w) for (n, _), g, w in zip(model.named_parameters(), got_grads, want_grads)
                        if n.endswith(".rpb")]
            rpb_err = max(rpb_errs, default=0.0)
            ok = err <= args.tol and rpb_err <= args.tol
            failed |= not ok
            print(f"training: gradients compiled vs eager rel err {err:.2e}, worst rpb grad {rpb_err:.2e} "
                  f"(tol {args.tol:.0e}) {'ok' if ok else 'FAIL'}")
            eager_ms = bench_ms(step(model), warmup, reps, device)
            compiled_ms = bench_ms(step(compiled), warmup, reps, device)
            rows.append(("fwd+bwd", eager_ms, compiled_ms, train_compile_s))

    name = f"{args.model}{' (tiny)' if args.tiny else ''}"
    print(f"\n{name}, batch {batch}, {size}x{size}, {dtype}, torch.compile({args.compile_backend}, "
          "fullgraph=True)")
    print("| pass | eager ms | eager img/s | compiled ms | compiled img/s | speed-up | compile s |")
    print("|---|---|---|---|---|---|---|")
    for label, e_ms, c_ms, c_s in rows:
        print(f"| {label} | {e_ms:.2f} | {batch / e_ms * 1e3:.1f} | {c_ms:.2f} | {batch / c_ms * 1e3:.1f} | "
              f"{e_ms / c_ms:.2f}x | {c_s:.1f} |")
    dev = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"\ntorch {torch.__version__}, timm {timm.__version__}, {dev}, {time.strftime('%Y-%m-%d')}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
