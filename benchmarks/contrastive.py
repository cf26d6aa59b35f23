"""Cost of the contrastive decoding passes: generate() time per token with CausalMM / LQCD vs no pass vs the naive
implementation (the counterfactual branch in separate forwards with its own cache, one per step).

LLaVA-1.5-7B-shaped model with random weights (attnzoo.mllm.build_random_llava, bf16), prompts of the POPE form
(leading for LQCD). Variants, switched in place on one set of weights:

- ``no pass``: ``lvlm.generate_ids`` with nothing attached (SDPA);
- ``lqcd`` / ``lqcd naive``: LQCD batched (one 2B-row forward per step) / sequential;
- ``causalmm`` / ``causalmm naive``: CausalMM, vision counterfactual (shuffle), greedy, batched / sequential;
- ``causalmm both`` / ``causalmm both naive``: the three-branch version (vision + language counterfactual), batched /
  sequential; the language counterfactual's output in closed form (``attnzoo.kernels.counterfactual_attention``:
  one fused pass per layer for its rows, SDPA for the others);
- ``causalmm both explicit``: the same with ``fused=False`` (explicit attention weights of every row in every
  decoder layer, edited; the previous implementation).

``--check`` first compares the counterfactual kernel with a float64 reference on 7B attention shapes (decode and
prefill, left-padded) and with the explicit path as the runtime computes it (float32 softmax, weights rounded
to bf16), printing the largest errors.

Bar (issue 10): each pass under 2x the no-pass time per token and faster than its naive implementation.
Correctness first: batched and naive must give the same tokens (a warning otherwise: bf16 rounding differs
between a B-row and a 2B-row forward, so a near tie can flip). Every run is forced to ``--new-tokens`` tokens.
Method: one warm-up per variant, then ``--repeats`` rounds with the variants interleaved; wall time with
torch.cuda.synchronize; medians. Results: ``$OUT/contrastive.json`` (or ``--out``), rewritten after each variant.

    python benchmarks/contrastive.py            # H100: 7B shape, bf16, batch 1 and 8, 64 new tokens
    python benchmarks/contrastive.py --tiny     # CPU smoke run on the tiny LLaVA
    python benchmarks/contrastive.py --check --variants "no pass,causalmm both,causalmm both explicit"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnzoo import mitigation  # noqa: E402
from attnzoo.mitigation.contrastive import contrastive_generate  # noqa: E402
from attnzoo.mllm import build_random_llava, build_tiny_llava, wrap  # noqa: E402

QUESTIONS = ["There is a dog in the image, isn't there?", "There isn't a person in the image, is there?",
             "There is a car in the image, isn't there?", "There isn't a cup in the image, is there?"]
SUFFIX = "\nAnswer the question using a single word or phrase."


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def variants() -> dict[str, tuple[object | None, bool]]:
    """name -> (pass or None, batched)."""
    lqcd = mitigation.LQCD()
    cmm = mitigation.CausalMM(do_sample=False, seed=0)
    both = mitigation.CausalMM(do_sample=False, seed=0, counterfactual="both")
    explicit = mitigation.CausalMM(do_sample=False, seed=0, counterfactual="both", fused=False)
    return {"no pass": (None, True), "lqcd": (lqcd, True), "lqcd naive": (lqcd, False),
            "causalmm": (cmm, True), "causalmm naive": (cmm, False), "causalmm both": (both, True),
            "causalmm both naive": (both, False), "causalmm both explicit": (explicit, True)}


def check_kernel(device: str, dtype: torch.dtype) -> list[dict]:
    """The counterfactual kernel on LLaVA-1.5-7B attention shapes (32 heads, head_dim 128) against a float64
    reference (edited softmax matrix times V) and against the runtime's explicit path (float32 softmax, edited,
    rounded to the model dtype, times V). Returns one row per (shape, kind) with the largest absolute errors."""
    from attnzoo.kernels import counterfactual_attention

    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name, batch, q_len, kv_len in (("decode", 8, 1, 640), ("prefill", 2, 600, 600)):
        q = torch.randn(batch, 32, q_len, 128, device=device, generator=gen).to(dtype)
        k = torch.randn(batch, 32, kv_len, 128, device=device, generator=gen).to(dtype)
        v = torch.randn(batch, 32, kv_len, 128, device=device, generator=gen).to(dtype)
        pads = torch.arange(batch, device=device) * 7  # left padding of different lengths
        real = torch.arange(kv_len, device=device)[None, :] >= pads[:, None]
        causal = torch.arange(kv_len - q_len, kv_len, device=device)[:, None] >= torch.arange(kv_len, device=device)
        keep = causal[None, None] & real[:, None, None, :]
        scores = (q.double() @ k.double().transpose(-1, -2)) * 128 ** -0.5
        weights64 = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
        weights32 = torch.softmax((q @ k.transpose(-1, -2)).float().mul(128 ** -0.5)
                                  .masked_fill(~keep, torch.finfo(torch.float32).min), -1)
        for kind in ("reverse", "reverse_normalize", "uniform"):
            got = counterfactual_attention(q, k, v, kind, mask=keep, real_keys=real.sum(-1)).double()
            refs = []
            for w in (weights64, weights32):
                if kind == "uniform":
                    edited = keep / real.sum(-1)[:, None, None, None]
                else:
                    edited = (w.amax(-1, keepdim=True) - w) * keep
                    if kind == "reverse_normalize":
                        total = edited.sum(-1, keepdim=True)
                        edited = torch.where(total > 0, edited / torch.where(total > 0, total, 1.0), 0.0)
                refs.append(edited.to(w.dtype))
            ref64 = refs[0] @ v.double()
            explicit = (refs[1].to(dtype) @ v).double()
            real_rows = keep.any(-1, keepdim=True)  # left-padding query rows have no key
            rows.append({"shape": name, "kind": kind, "max_abs_vs_float64": (got - ref64).abs().max().item(),
                         "explicit_max_abs_vs_float64": (explicit - ref64).abs().max().item(),
                         "max_abs_ref": ref64.abs().max().item(), "rows_checked": int(real_rows.sum())})
    return rows


def run(lvlm, batch, p, batched: bool, new_tokens: int, device: str) -> tuple[torch.Tensor, float]:
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    sync(device)
    t0 = time.perf_counter()
    if p is None:
        out = lvlm.generate_ids(batch, **gen)
    else:
        with p.apply(lvlm):
            out = contrastive_generate(lvlm, batch, p, batched=batched, **gen)
    sync(device)
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny LLaVA")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="result file (default $OUT/contrastive.json)")
    parser.add_argument("--variants", default=None, help="comma-separated variant names (default: all)")
    parser.add_argument("--check", action="store_true", help="check the counterfactual kernel on 7B shapes first")
    args = parser.parse_args()

    if args.tiny:
        device, new_tokens, repeats = "cpu", min(args.new_tokens, 4), min(args.repeats, 1)
        model, processor = build_tiny_llava(num_layers=2, seed=0)
        size = 32
    else:
        device, new_tokens, repeats = "cuda", args.new_tokens, args.repeats
        model, processor = build_random_llava("7b", device=device, dtype=torch.bfloat16)
        size = 336
    lvlm = wrap(model, processor)
    out_path = Path(args.out or Path(os.environ.get("OUT", ".")) / "contrastive.json")
    check: list[dict] = []
    if args.check:
        check = check_kernel(device, torch.float32 if args.tiny else torch.bfloat16)
        print(f"{'shape':<8} {'kind':<18} {'kernel err':>11} {'explicit err':>13} {'max |ref|':>10}")
        for r in check:
            print(f"{r['shape']:<8} {r['kind']:<18} {r['max_abs_vs_float64']:>11.2e} "
                  f"{r['explicit_max_abs_vs_float64']:>13.2e} {r['max_abs_ref']:>10.2f}")
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "new_tokens": new_tokens, "check": check}
    rng = np.random.default_rng(0)
    results: list[dict] = []
    for bs in [int(b) for b in args.batch.split(",")]:
        images = [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for _ in range(bs)]
        prompts = [QUESTIONS[i % len(QUESTIONS)] + SUFFIX for i in range(bs)]
        batch = lvlm.prepare(images, prompts)
        table = variants()
        if args.variants:
            wanted = [v.strip() for v in args.variants.split(",")]
            unknown = [v for v in wanted if v not in table]
            if unknown:
                raise SystemExit(f"unknown variants {unknown}; choose from {list(table)}")
            table = {name: table[name] for name in ["no pass", *wanted] if name in table}
        tokens: dict[str, torch.Tensor] = {}
        for name, (p, batched) in table.items():  # warm-up + correctness
            tokens[name], _ = run(lvlm, batch, p, batched, new_tokens, device)
        for name, other in (("lqcd", "lqcd naive"), ("causalmm", "causalmm naive"),
                            ("causalmm both", "causalmm both naive"), ("causalmm both", "causalmm both explicit")):
            if name in tokens and other in tokens and not torch.equal(tokens[name], tokens[other]):
                print(f"WARNING batch {bs}: {name} and {other} tokens differ (bf16 near-tie?)")
        times: dict[str, list[float]] = {name: [] for name in table}
        for _ in range(repeats):
            for name, (p, batched) in table.items():
                times[name].append(run(lvlm, batch, p, batched, new_tokens, device)[1])
        base = statistics.median(times["no pass"]) / new_tokens
        for name in table:
            per_token = statistics.median(times[name]) / new_tokens
            naive = times.get(f"{name} naive")
            row = {"batch": bs, "variant": name, "ms_per_token": 1e3 * per_token,
                   "tokens_per_s": bs / per_token, "vs_no_pass": per_token / base,
                   "vs_naive": per_token / (statistics.median(naive) / new_tokens) if naive else None}
            results.append(row)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps({**info, "results": results}, indent=1))
    print(f"{'batch':>5} {'variant':<22} {'ms/token':>9} {'tok/s':>8} {'x no pass':>9} {'x naive':>8}")
    for r in results:
        naive = f"{r['vs_naive']:.2f}" if r["vs_naive"] is not None else "-"
        print(f"{r['batch']:>5} {r['variant']:<22} {r['ms_per_token']:>9.2f} {r['tokens_per_s']:>8.1f} "
              f"{r['vs_no_pass']:>9.2f} {naive:>8}")


if __name__ == "__main__":
    main()
