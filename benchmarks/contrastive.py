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
- ``causalmm both before``: the same with its decode path before the direct launch (checks and triton's normal
  launch in every counterfactual call), for a paired before/after;
- ``causalmm both explicit``: the same with ``fused=False`` (explicit attention weights of every row in every
  decoder layer, edited; the previous implementation).

``--check`` first compares the counterfactual kernel with a float64 reference on 7B attention shapes (decode and
prefill, left-padded) and with the explicit path as the runtime computes it (float32 softmax, weights rounded
to bf16), printing the largest errors.

Bar (issue 10): each pass under 2x the no-pass time per token and faster than its naive implementation.
Correctness first: batched and naive must give the same tokens (a warning otherwise: bf16 rounding differs
between a B-row and a 2B-row forward, so a near tie can flip). Every run is forced to ``--new-tokens`` tokens.
Method: one warm-up per variant, then ``--repeats`` rounds with the variants interleaved and the order rotated
every round (the GPU host's speed drifts over seconds); wall time with torch.cuda.synchronize. Each variant is
compared with the no-pass (or naive) run of its own round: the median and quartiles over rounds of the ratio of
the two total times. A forward hook on the language-model head splits the batched variants' time into prefill
(start to the first head call) and decode steps. Results: ``$OUT/contrastive.json`` (or ``--out``), rewritten
after each variant.

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


class CausalMMBefore(mitigation.CausalMM):
    """CausalMM's decode path before the direct launch: every counterfactual call through
    ``counterfactual_attention``'s checks; timed with direct launches off (:func:`launch_path`)."""

    @property
    def _launch(self):
        return None

    @_launch.setter
    def _launch(self, value) -> None:
        pass


def launch_path(direct: bool) -> None:
    """Switch the counterfactual kernel's direct launch on or off (a no-op without triton)."""
    try:
        from attnzoo.kernels import _counterfactual_triton
    except ImportError:
        return
    _counterfactual_triton.LAUNCHES.enabled = direct


def variants() -> dict[str, tuple[object | None, bool]]:
    """name -> (pass or None, batched)."""
    lqcd = mitigation.LQCD()
    cmm = mitigation.CausalMM(do_sample=False, seed=0)
    both = mitigation.CausalMM(do_sample=False, seed=0, counterfactual="both")
    explicit = mitigation.CausalMM(do_sample=False, seed=0, counterfactual="both", fused=False)
    before = CausalMMBefore(do_sample=False, seed=0, counterfactual="both")
    return {"no pass": (None, True), "lqcd": (lqcd, True), "lqcd naive": (lqcd, False),
            "causalmm": (cmm, True), "causalmm naive": (cmm, False), "causalmm both": (both, True),
            "causalmm both naive": (both, False), "causalmm both explicit": (explicit, True),
            "causalmm both before": (before, True)}


def check_kernel(device: str, dtype: torch.dtype) -> list[dict]:
    """The counterfactual kernel on LLaVA-1.5-7B attention shapes (32 heads, head_dim 128) against a float64
    reference (edited softmax matrix times V) and against the runtime's explicit path (float32 softmax, edited,
    rounded to the model dtype, times V). Left-padded batches with a keep-mask, and batch-1 calls without a mask
    (causal) written into a row slice of an SDPA output, as ``CausalMM.attend`` calls it. Returns one row per
    (shape, kind) with the largest absolute errors; ``ok``: the kernel is at most 1.5x (+1e-3) as far from float64
    as the explicit path, and (CUDA) direct and normal launches give bit-identical outputs."""
    from attnzoo.kernels import counterfactual_attention

    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    shapes = (("decode", 8, 1, 640, True), ("prefill", 2, 600, 600, True), ("decode, causal", 1, 1, 640, False),
              ("prefill, causal", 1, 600, 600, False))
    for name, batch, q_len, kv_len, with_mask in shapes:
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
            if with_mask:
                got = counterfactual_attention(q, k, v, kind, mask=keep, real_keys=real.sum(-1)).double()
            else:  # into rows 1.. of a 3-row SDPA output (strided: (B, q, H, D) memory seen as (B, H, q, D))
                full = torch.nn.functional.scaled_dot_product_attention(
                    torch.cat([q] * 3), torch.cat([k] * 3), torch.cat([v] * 3), is_causal=q_len > 1)
                target = full[1:2]
                counterfactual_attention(q, k, v, kind, causal=True, out=target)
                got = target.double()
            direct_equal = None
            if device == "cuda":  # the same call with the normal launch path, twice more (direct launches replayed)
                again = []
                for direct in (False, True):
                    launch_path(direct)
                    if with_mask:
                        again.append(counterfactual_attention(q, k, v, kind, mask=keep, real_keys=real.sum(-1)))
                    else:
                        again.append(counterfactual_attention(q, k, v, kind, causal=True))
                direct_equal = all(bool(torch.equal(a.double(), got)) for a in again)
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
            err = (got - ref64).abs().max().item()
            explicit_err = (explicit - ref64).abs().max().item()
            rows.append({"shape": name, "kind": kind, "max_abs_vs_float64": err,
                         "explicit_max_abs_vs_float64": explicit_err, "max_abs_ref": ref64.abs().max().item(),
                         "rows_checked": int(real_rows.sum()), "direct_launch_bit_identical": direct_equal,
                         "ok": err <= 1.5 * explicit_err + 1e-3 and direct_equal is not False})
    return rows


def run(lvlm, batch, p, batched: bool, new_tokens: int, device: str) -> tuple[torch.Tensor, float, list[float]]:
    """One forced generate: (new tokens, total seconds, the synchronised time of every language-model head call
    relative to the start: one per step for the batched variants, ``k`` per step for the naive ones)."""
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    stamps: list[float] = []
    launch_path(not isinstance(p, CausalMMBefore))

    def stamp(module, args, output) -> None:
        sync(device)
        stamps.append(time.perf_counter() - t0)

    hook = lvlm.lm_head.register_forward_hook(stamp)
    try:
        sync(device)
        t0 = time.perf_counter()
        if p is None:
            out = lvlm.generate_ids(batch, **gen)
        else:
            with p.apply(lvlm):
                out = contrastive_generate(lvlm, batch, p, batched=batched, **gen)
        sync(device)
        total = time.perf_counter() - t0
    finally:
        hook.remove()
    return out, total, stamps


def _quartiles(values: list[float]) -> list[float]:
    """[median, q25, q75] (all three the value itself for a single value)."""
    if len(values) == 1:
        return [values[0]] * 3
    q25, q50, q75 = statistics.quantiles(values, n=4, method="inclusive")
    return [q50, q25, q75]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny LLaVA")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds, the order rotated every round")
    parser.add_argument("--naive-repeats", type=int, default=None,
                        help="rounds that include the naive variants (default: all; they are the slowest)")
    parser.add_argument("--out", default=None, help="result file (default $OUT/contrastive.json)")
    parser.add_argument("--variants", default=None, help="comma-separated variant names (default: all)")
    parser.add_argument("--check", action="store_true", help="check the counterfactual kernel on 7B shapes first")
    parser.add_argument("--stop-on-check-failure", action="store_true", help="no timings when the check fails")
    args = parser.parse_args()

    if args.tiny:
        device, new_tokens, repeats = "cpu", min(args.new_tokens, 4), min(args.repeats, 2)
        model, processor = build_tiny_llava(num_layers=2, seed=0)
        size = 32
    else:
        device, new_tokens, repeats = "cuda", args.new_tokens, args.repeats
        model, processor = build_random_llava("7b", device=device, dtype=torch.bfloat16)
        size = 336
    lvlm = wrap(model, processor)
    out_path = Path(args.out or Path(os.environ.get("OUT", ".")) / "contrastive.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    check: list[dict] = []
    if args.check:
        check = check_kernel(device, torch.float32 if args.tiny else torch.bfloat16)
        print(f"{'shape':<16} {'kind':<18} {'kernel err':>11} {'explicit err':>13} {'max |ref|':>10}  ok")
        for r in check:
            print(f"{r['shape']:<16} {r['kind']:<18} {r['max_abs_vs_float64']:>11.2e} "
                  f"{r['explicit_max_abs_vs_float64']:>13.2e} {r['max_abs_ref']:>10.2f}  {r['ok']}", flush=True)
        if args.stop_on_check_failure and not all(r["ok"] for r in check):
            out_path.write_text(json.dumps({"check": check}, indent=1))
            print("CHECK FAILED: the counterfactual kernel is further from float64 than the explicit path")
            return 1
    import transformers

    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "new_tokens": new_tokens, "repeats": repeats,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "check": check}
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
        names = list(table)
        tokens: dict[str, torch.Tensor] = {}
        for name, (p, batched) in table.items():  # warm-up + correctness
            tokens[name] = run(lvlm, batch, p, batched, new_tokens, device)[0]
        for name, other in (("lqcd", "lqcd naive"), ("causalmm", "causalmm naive"),
                            ("causalmm both", "causalmm both naive"), ("causalmm both", "causalmm both explicit")):
            if name in tokens and other in tokens and not torch.equal(tokens[name], tokens[other]):
                print(f"WARNING batch {bs}: {name} and {other} tokens differ (bf16 near-tie?)")
        # per round: total s, prefill s (start to the first head call) and decode s per step (batched variants)
        totals: dict[str, list[float | None]] = {name: [] for name in names}
        prefill: dict[str, list[float]] = {name: [] for name in names}
        decode: dict[str, list[float]] = {name: [] for name in names}
        naive_rounds = repeats if args.naive_repeats is None else args.naive_repeats
        for r in range(repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                p, batched = table[name]
                if not batched and r >= naive_rounds:
                    totals[name].append(None)
                    continue
                _, total, stamps = run(lvlm, batch, p, batched, new_tokens, device)
                totals[name].append(total)
                if batched and len(stamps) == new_tokens:
                    prefill[name].append(stamps[0])
                    decode[name].append((stamps[-1] - stamps[0]) / (new_tokens - 1))
            print(f"batch {bs}: round {r + 1}/{repeats} done", flush=True)

        def paired(a: list, b: list) -> list[float] | None:
            ratios = [x / y for x, y in zip(a, b) if x is not None and y is not None]
            return _quartiles(ratios) if ratios else None

        base = statistics.median([t for t in totals["no pass"] if t is not None]) / new_tokens
        for name in names:
            done = [t for t in totals[name] if t is not None]
            per_token = statistics.median(done) / new_tokens
            naive = f"{name} naive"
            row = {"batch": bs, "variant": name, "ms_per_token": 1e3 * per_token, "tokens_per_s": bs / per_token,
                   "rounds": len(done), "vs_no_pass_pooled": per_token / base,
                   "vs_no_pass_paired": paired(totals[name], totals["no pass"]),
                   "vs_naive_paired": paired(totals[name], totals[naive]) if naive in totals else None,
                   "prefill_ms": 1e3 * statistics.median(prefill[name]) if prefill[name] else None,
                   "decode_ms_per_step": 1e3 * statistics.median(decode[name]) if decode[name] else None,
                   "decode_vs_no_pass_paired": paired(decode[name], decode["no pass"]) if decode[name] else None,
                   "round_totals_s": totals[name]}
            results.append(row)
            out_path.write_text(json.dumps({**info, "results": results}, indent=1))
    print(f"\n{info['device']}, torch {info['torch']}, transformers {info['transformers']}, {new_tokens} forced "
          f"tokens, {repeats} rounds (order rotated). x no pass / x naive: median [quartiles] over rounds of the "
          "ratio of the two variants' total times in that round; ms/token: median total / tokens; prefill: start "
          "to the first head call; decode: per step after it (batched variants).")
    print("| batch | variant | ms/token | tokens/s | x no pass | x naive | prefill ms | decode ms/step | "
          "decode x no pass |")
    print("|---|---|---|---|---|---|---|---|---|")

    def fmt(v: list[float] | None) -> str:
        return "-" if v is None else f"{v[0]:.2f} [{v[1]:.2f}-{v[2]:.2f}]"

    for r in results:
        pre = "-" if r["prefill_ms"] is None else f"{r['prefill_ms']:.1f}"
        dec = "-" if r["decode_ms_per_step"] is None else f"{r['decode_ms_per_step']:.2f}"
        print(f"| {r['batch']} | {r['variant']} | {r['ms_per_token']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{fmt(r['vs_no_pass_paired'])} | {fmt(r['vs_naive_paired'])} | {pre} | {dec} | "
              f"{fmt(r['decode_vs_no_pass_paired'])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
