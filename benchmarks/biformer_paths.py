"""BiFormer end to end, one process: the model's ``bilevel_routing_attention`` path against
``region_routing`` + ``routed_attention`` (swapped in by monkeypatching), in alternating rounds.

Run on a CUDA machine: ``python benchmarks/biformer_paths.py [--out DIR] [--rounds N] [--models NAME ...]``.
Per round and path: the median training step (forward + cross-entropy + backward + AdamW; 2 warm-ups, 6 timed)
and inference forward (2 + 8), batch 128, 224 px, bf16 autocast, eager, img/s; both paths share the model,
weights and inputs, and the order alternates between rounds, so a per-round ratio cancels the host's drift.
Rows are appended to ``OUT/biformer_paths.jsonl`` as they finish.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import timm  # noqa: E402
from models import bench_ms  # noqa: E402

import attnzoo.vision.biformer as biformer  # noqa: E402
from attnzoo.kernels import region_routing, routed_attention, set_backend  # noqa: E402


def two_calls(q, k, v, num_regions, topk, scale=None):
    """The two public functions one after the other (the model's path before bilevel_routing_attention)."""
    _, index = region_routing(q.detach().flatten(3), k.detach().flatten(3), num_regions, topk)
    return routed_attention(q, k, v, index, num_regions, scale), index


def measure_model(name: str, rounds: int, out: Path, paths: dict[str, Callable]) -> None:
    """Alternating rounds of every path on one model (see the module docstring); rows appended to out."""
    model = timm.create_model(name).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(128, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 1000, (128,), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)

    try:
        for r in range(rounds):
            for path in list(paths) if r % 2 == 0 else list(paths)[::-1]:
                biformer.bilevel_routing_attention = paths[path]
                model.train()
                train = 128 / bench_ms(step, warmup=2, reps=6) * 1e3
                model.eval()
                inference = 128 / bench_ms(infer, warmup=2, reps=8) * 1e3
                row = dict(model=name, round=r, path=path, train_img_s=round(train, 1),
                           infer_img_s=round(inference, 1))
                print(json.dumps(row), flush=True)
                with (out / "biformer_paths.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")
    finally:
        biformer.bilevel_routing_attention = paths["bilevel"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "runs"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--models", nargs="*", default=["biformer_tiny", "biformer_small"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/biformer_paths.py needs a CUDA device", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    set_backend("triton")
    paths = {"bilevel": biformer.bilevel_routing_attention, "two calls": two_calls}
    for name in args.models:
        measure_model(name, args.rounds, out, paths)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
