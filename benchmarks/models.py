"""Model throughput on the GPU: inference and training-step img/s with peak memory, side by side.

Each row is one (model, attention backend) pair at a fixed batch, bf16 autocast:
- attnzoo models on our fused kernels ("triton"), on the FlexAttention backend ("flex") and on the
  gather/unfold PyTorch backend ("torch", the official formulation);
- anchors: timm's swin_tiny_patch4_window7_224 and convnext_tiny at the same batch;
- HaloNet: timm's own halonet26t / halonet50ts vs the same weights on our halo kernel;
- hosts vs their attention variants (resnet50 vs resnet50_ela, tnt_s_patch16_224 vs ptnt_s_patch16_256, ...).

Before timing, each model on a kernel backend is checked against the same model on the torch backend
(same weights, float32, small batch). Results are appended to a JSON-lines file as they are measured
and a rerun skips rows already present, so a run cut off by the time limit loses nothing.

    python benchmarks/models.py --out $OUT                 # everything (about 6-8 min on an H100)
    python benchmarks/models.py --only nat_tiny swin       # rows whose label contains any of these
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

import attnzoo  # noqa: E402,F401
from attnzoo.kernels import use_backend  # noqa: E402


def _halo_fused(name: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from attnzoo.vision.halonet import use_fused_attention

        return use_fused_attention(timm.create_model(name))

    return build


def _timm(name: str) -> Callable[[], torch.nn.Module]:
    return lambda: timm.create_model(name)


# (label, builder, kernel backend or None, batch, image size)
KERNEL_MODELS = ["nat_mini", "nat_tiny", "dinat_tiny", "biformer_tiny", "biformer_small"]
ROWS: list[tuple[str, Callable[[], torch.nn.Module], str | None, int, int]] = []
for _name in KERNEL_MODELS:
    for _backend in ("triton", "flex", "torch"):
        ROWS.append((f"{_name} [{_backend}]", _timm(_name), _backend, 128, 224))
for _name in ["swin_tiny_patch4_window7_224", "convnext_tiny"]:
    ROWS.append((f"{_name} [timm]", _timm(_name), None, 128, 224))
for _name in ["agent_deit_small", "agent_swin_tiny", "agent_pvt_small", "resnet50", "resnet50_ela",
              "tnt_s_patch16_224"]:
    ROWS.append((f"{_name} [timm/sdpa]", _timm(_name), None, 128, 224))
# PyramidTNT runs at its native 256 (sizes must be multiples of 64); TNT-S at its 224.
ROWS.append(("ptnt_s_patch16_256 [timm/sdpa]", _timm("ptnt_s_patch16_256"), None, 128, 256))
for _name in ["halonet26t", "halonet50ts"]:
    ROWS.append((f"{_name} [timm HaloAttn]", _timm(_name), None, 128, 256))
    ROWS.append((f"{_name} [attnzoo halo]", _halo_fused(_name), "triton", 128, 256))


def bench_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 10, device: torch.device | None = None) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs after ``warmup`` runs: CUDA events on CUDA (the
    default), wall clock on the CPU."""
    on_cuda = device is None or torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if on_cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def check_against_torch(build: Callable[[], torch.nn.Module], backend: str, size: int) -> float:
    """Relative error of the model on ``backend`` vs the same weights on the torch backend (fp32)."""
    torch.manual_seed(0)
    model = build().cuda().eval()
    x = torch.randn(2, 3, size, size, device="cuda")
    with torch.no_grad():
        with use_backend(backend):
            out = model(x).double()
        with use_backend("torch"):
            ref = model(x).double()
    return ((out - ref).norm() / ref.norm()).item()


def run_row(label: str, build: Callable[[], torch.nn.Module], backend: str | None, batch: int,
            size: int, probe: Callable[[torch.nn.Module, torch.Tensor], dict] | None = None) -> dict[str, object]:
    """One table row; ``probe(model, x)``, if given, runs after the inference timing (eval mode, same backend)
    and its dict joins the row."""
    row: dict[str, object] = {"label": label, "batch": batch, "size": size}
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if backend in ("triton", "flex"):
        row["rel_err_vs_torch_fp32"] = check_against_torch(build, backend, size)
    ctx = use_backend(backend) if backend else use_backend(None)
    with ctx:
        torch.manual_seed(0)
        model = build().cuda()
        row["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        x = torch.randn(batch, 3, size, size, device="cuda")
        labels = torch.randint(0, 1000, (batch,), device="cuda")

        model.eval()
        torch.cuda.reset_peak_memory_stats()

        def infer() -> None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(x)

        ms = bench_ms(infer)
        row["infer_img_s"] = round(batch / ms * 1e3, 1)
        row["infer_peak_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        if probe is not None:
            row.update(probe(model, x))

        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        torch.cuda.reset_peak_memory_stats()

        def train_step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        ms = bench_ms(train_step, warmup=2, reps=6)
        row["train_img_s"] = round(batch / ms * 1e3, 1)
        row["train_peak_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    torch.cuda.empty_cache()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "runs"), help="folder for models.jsonl")
    parser.add_argument("--only", nargs="*", default=None, help="rows whose label contains any of these")
    parser.add_argument("--batch", type=int, default=None, help="override every row's batch size")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/models.py needs a CUDA device", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "models.jsonl"
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[rec["label"]] = rec
    results = []
    for label, build, backend, batch, size in ROWS:
        if args.only and not any(s in label for s in args.only):
            continue
        batch = args.batch or batch
        if label in done:
            results.append(done[label])
            continue
        t0 = time.time()
        try:
            row = run_row(label, build, backend, batch, size)
        except Exception as exc:  # a row that cannot run is reported, not hidden
            row = {"label": label, "batch": batch, "size": size, "error": f"{type(exc).__name__}: {exc}"[:300]}
            torch.cuda.empty_cache()
        row["seconds"] = round(time.time() - t0, 1)
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        results.append(row)
        print(json.dumps(row), flush=True)

    cols = ["label", "batch", "params_M", "infer_img_s", "infer_peak_GB", "train_img_s", "train_peak_GB",
            "rel_err_vs_torch_fp32"]
    print("\n| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        if "error" in r:
            print(f"| {r['label']} | ERROR: {r['error']} |")
        else:
            cells = [f"{r[c]:.1e}" if c.startswith("rel_err") and c in r else str(r.get(c, "-")) for c in cols]
            print("| " + " | ".join(cells) + " |")
    print(f"\ntorch {torch.__version__}, timm {timm.__version__}, {torch.cuda.get_device_name(0)}, "
          f"{time.strftime('%Y-%m-%d')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
