"""Cost of the attention-level mitigation passes (VAR, VHR, CCA): prefill time and per-token decode time with each
pass vs no pass vs an eager-attention implementation of the same pass (what the official code does).

LLaVA-1.5-7B-shaped model with random weights (attnzoo.mllm.build_random_llava: 576 image tokens, bf16), batch 1,
one set of weights, variants switched in place:

- ``no pass`` / ``no pass eager``: nothing attached, SDPA / eager attention everywhere;
- ``var``: VAR with the fused key-group attention (attnzoo.kernels.key_group_attention) in the layers it edits,
  SDPA elsewhere; ``var explicit``: VAR on explicit float32 post-softmax weights in those layers, SDPA elsewhere;
- ``vhr``, ``cca``: the passes as shipped (SDPA wherever they allow it);
- ``<pass> eager``: the same pass with ``lvlm.attn_backend = "eager"``: every layer the pass does not take over
  runs eager attention, as the official code runs the model with ``attn_implementation="eager"`` (VAR eager
  uses the explicit weights, as the official code does).

Random weights have no massive activations, so VAR's ``tau`` is calibrated on the prompt (the 85th percentile of
the RMS-normalised residual in the sink dimensions, layers >= 2) so that some tokens are sinks and the
redistribution actually runs; every other hyper-parameter is the paper's.

Correctness first, on the device: fused VAR vs explicit VAR logits on a left-padded batch of 2 at prefill and at
every decode step (teacher-forced on the explicit run's tokens), next to how much VAR changes the logits at all
(a warning, not a stop, when the fused-vs-explicit difference is not well below that). Timing: a LogitsProcessor
records ``torch.cuda.synchronize(); perf_counter()`` at every generation step; prefill = start of ``generate`` to
the first step (vision tower, prompt forward and, for VHR, its image-free forward), decode = the time between
consecutive steps. One warm-up generate per variant, then ``--repeats`` rounds with the variants interleaved;
medians (decode: over all steps of all rounds). Every run is forced to ``--new-tokens`` tokens. A failing variant
is reported and skipped. Results: ``$OUT/passes.json`` (or ``--out``), rewritten after every measurement.

    python benchmarks/passes.py            # H100: 7B shape, bf16, batch 1, 32 new tokens, 5 rounds
    python benchmarks/passes.py --tiny     # CPU smoke run on the tiny LLaVA (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mllm import StepClock, sync  # noqa: E402  (benchmarks/mllm.py: per-step decode timing)

from attnzoo import mitigation  # noqa: E402
from attnzoo.kernels import key_group_attention, set_backend  # noqa: E402
from attnzoo.kernels.reference import key_group_attention_reference  # noqa: E402
from attnzoo.mitigation.var import find_sink_dims, known_sink_dims, rms_normalize  # noqa: E402
from attnzoo.mllm import build_random_llava, build_tiny_llava, wrap  # noqa: E402

PROMPTS = ["Please describe this image in detail.", "Is there a dog in the image? Answer the question using a "
           "single word or phrase."]


def check_kernel(device: str, dtype: torch.dtype, tiny: bool) -> dict:
    """key_group_attention (the device's backend) vs the float64 reference on LLaVA-7B attention shapes (prefill
    with left padding as group -1, and one decode query), and its prefill time next to SDPA's."""
    gen = torch.Generator().manual_seed(0)
    heads, dim, length = (4, 16, 40) if tiny else (32, 128, 600)
    out: dict = {}
    for name, q_len in (("prefill", length), ("decode", 1), ("prefill, bool mask", length)):
        q = torch.randn(1, heads, q_len, dim, generator=gen).to(device, dtype)
        k, v = (torch.randn(1, heads, length, dim, generator=gen).to(device, dtype) for _ in range(2))
        groups = torch.randint(0, 4, (1, length), generator=gen)
        groups[:, :7] = -1
        groups = groups.to(device)
        mask = None
        if name.endswith("mask"):  # what a left-padded batch hands the kernel: a (B, 1, q, kv) keep-mask
            mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
            mask[..., :5] = False
            mask = mask.to(device)
        o, m = key_group_attention(q, k, v, groups, 4, mask=mask)
        ro, rm = key_group_attention_reference(q, k, v, groups, 4, mask=mask)
        out[name] = {"max_abs_err_outputs": float((o.double().cpu() - ro).abs().max()),
                     "max_abs_err_masses": float((m.double().cpu() - rm).abs().max()),
                     "output_scale": float(ro.abs().max())}
        if name == "prefill":
            def timed(fn) -> float:
                for _ in range(3):
                    fn()
                sync(device)
                t0 = time.perf_counter()
                for _ in range(20):
                    fn()
                sync(device)
                return 1000 * (time.perf_counter() - t0) / 20

            out[name]["ms"] = timed(lambda q=q, k=k, v=v, g=groups: key_group_attention(q, k, v, g, 4))
            out[name]["sdpa_ms"] = timed(lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True))
    return out


def calibrated_tau(lvlm, batch, dims: tuple[int, ...], first_layer: int = 2, quantile: float = 0.85) -> float:
    """A VAR tau at which about 15% of the real prompt tokens are sinks in the layers VAR uses."""
    values = []
    real = batch.layout.attention_mask.bool()

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        values.append(rms_normalize(hidden)[..., list(dims)].abs().amax(-1)[real.to(hidden.device)].float().cpu())

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in lvlm.decoder_layers[first_layer:]]
    try:
        with torch.no_grad():
            lvlm.forward(batch)
    finally:
        for h in handles:
            h.remove()
    return float(torch.cat(values).quantile(quantile))


def step_logits(lvlm, batch, var, steps: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Greedy-generate ``steps`` tokens with ``var`` attached (None: no pass); logits per step and the tokens."""
    gen = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
               return_dict_in_generate=True, pad_token_id=lvlm.tokenizer.pad_token_id)
    with torch.no_grad(), lvlm.use_layout(batch.layout):
        if var is None:
            out = lvlm.model.generate(**batch.inputs, **gen)
        else:
            with var.apply(lvlm):
                out = lvlm.model.generate(**batch.inputs, **gen)
    return [x.float() for x in out.logits], out.sequences[:, batch.layout.prompt_length:]


def forced_step_logits(lvlm, batch, var, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Logits at every decode step when the given ``tokens`` are fed (teacher forcing through the KV cache)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Force(LogitsProcessor):
        def __call__(self, input_ids, scores):
            t = input_ids.shape[1] - batch.layout.prompt_length
            forced = torch.full_like(scores, float("-inf"))
            forced.scatter_(1, tokens[:, t:t + 1], 0.0)
            seen.append(scores.float().clone())
            return forced

    seen: list[torch.Tensor] = []
    steps = tokens.shape[1]
    # no min_new_tokens here: its processor would run before Force and put -inf on EOS in the scores
    gen = dict(max_new_tokens=steps, do_sample=False, pad_token_id=lvlm.tokenizer.pad_token_id,
               logits_processor=LogitsProcessorList([Force()]))
    with torch.no_grad(), lvlm.use_layout(batch.layout), var.apply(lvlm):
        lvlm.model.generate(**batch.inputs, **gen)
    return seen


def check_var(lvlm, batch, var_kwargs: dict, steps: int) -> dict:
    """Fused vs explicit VAR logits at prefill and decode, next to VAR's own effect (VAR vs no pass)."""
    real = batch.layout.attention_mask.bool()
    with torch.no_grad():
        plain = lvlm.forward(batch).logits.float()
        with mitigation.VAR(fused=True, **var_kwargs).apply(lvlm):
            fused = lvlm.forward(batch).logits.float()
        with mitigation.VAR(fused=False, **var_kwargs).apply(lvlm):
            explicit = lvlm.forward(batch).logits.float()
    explicit_steps, tokens = step_logits(lvlm, batch, mitigation.VAR(fused=False, **var_kwargs), steps)
    fused_steps = forced_step_logits(lvlm, batch, mitigation.VAR(fused=True, **var_kwargs), tokens)
    if len(fused_steps) != len(explicit_steps):
        raise RuntimeError(f"forced run took {len(fused_steps)} steps, the explicit one {len(explicit_steps)}")
    decode_diff = [float((a - b).abs().max()) for a, b in zip(fused_steps, explicit_steps)]
    return {"prefill_fused_vs_explicit": float((fused[real] - explicit[real]).abs().max()),
            "prefill_var_effect": float((explicit[real] - plain[real]).abs().max()),
            "decode_fused_vs_explicit_per_step": decode_diff,
            "logit_scale": float(plain[real].abs().max()), "decode_steps": steps, "batch": int(real.shape[0]),
            "pad": [int(x) for x in batch.layout.num_pad]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny LLaVA on the CPU (smoke run)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per answer (default 32; tiny: 6)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; tiny: 2)")
    ap.add_argument("--variants", default=None, help="comma list of variant names to run (default: all)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    new_tokens = args.new_tokens or (6 if args.tiny else 32)
    repeats = args.repeats or (2 if args.tiny else 5)
    out_path = Path(args.out) / "passes.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)

    t_build = time.perf_counter()
    if args.tiny:
        model, processor = build_tiny_llava(seed=0, num_layers=4, num_heads=4, num_kv_heads=2)
    else:
        model, processor = build_random_llava("7b", device=device, dtype=dtype)
    model.eval()
    lvlm = wrap(model, processor)
    import transformers

    results: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                     "torch": torch.__version__, "transformers": transformers.__version__, "dtype": str(dtype),
                     "batch": 1, "new_tokens": new_tokens, "repeats": repeats, "checks": {}, "errors": {}, "rows": []}

    def save() -> None:
        out_path.write_text(json.dumps(results, indent=1))

    rng = np.random.default_rng(0)
    size = 32 if args.tiny else 336
    images = [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for _ in range(2)]
    pair = lvlm.prepare(images, PROMPTS)
    single = lvlm.prepare(images[:1], PROMPTS[:1])
    results["image_tokens"] = int(single.layout.num_image_tokens[0])
    results["prompt_length"] = single.layout.prompt_length
    print(f"built in {time.perf_counter() - t_build:.1f} s; prompt {single.layout.prompt_length} tokens "
          f"({results['image_tokens']} image tokens)", flush=True)

    # ---- VAR's configuration: the paper's, with tau calibrated on this random model
    if args.tiny:
        dims = find_sink_dims(lvlm, images[:1])
    else:
        dims = known_sink_dims("llava-1.5-7b")
    tau = calibrated_tau(lvlm, single, dims)
    var_kwargs = dict(sink_dims=dims, tau=tau)
    results["var"] = {"sink_dims": list(dims), "tau": tau}

    # ---- the kernel on this device (falls back to the PyTorch backend if the Triton kernel fails)
    try:
        kernel = check_kernel(device, dtype, args.tiny)
        results["checks"]["kernel"] = kernel
        print(f"kernel check (vs float64): {json.dumps(kernel)}", flush=True)
        bad = [name for name, r in kernel.items() if r["max_abs_err_outputs"] > 3e-2 * max(1.0, r["output_scale"])
               or r["max_abs_err_masses"] > 1e-2]
        if bad:
            raise RuntimeError(f"key_group_attention differs from the float64 reference beyond bf16 rounding in {bad}")
    except Exception as exc:
        results["errors"]["kernel"] = repr(exc)
        print(f"KERNEL FAILED: {exc!r}\n{traceback.format_exc()}\nfalling back to set_backend('torch')", flush=True)
        set_backend("torch")
        results["key_group_backend"] = "torch (fallback)"
    save()

    # ---- correctness on this device: fused VAR == explicit VAR
    try:
        check = check_var(lvlm, pair, var_kwargs, steps=4)
        results["checks"]["var_fused_vs_explicit"] = check
        save()
        worst = max([check["prefill_fused_vs_explicit"], *check["decode_fused_vs_explicit_per_step"]])
        print(f"check: VAR fused vs explicit max |dlogit| prefill {check['prefill_fused_vs_explicit']:.3g}, decode "
              f"{', '.join(f'{x:.3g}' for x in check['decode_fused_vs_explicit_per_step'])}; VAR's own effect "
              f"{check['prefill_var_effect']:.3g}; logit scale {check['logit_scale']:.3g}", flush=True)
        if worst > 0.1 * check["prefill_var_effect"] and worst > (1e-4 if args.tiny else 0.05) * check["logit_scale"]:
            print("WARNING: fused and explicit VAR differ by more than a tenth of VAR's own effect", flush=True)
    except Exception as exc:  # report and go on to the timings
        results["errors"]["check"] = repr(exc)
        save()
        print(f"CHECK FAILED with an error: {exc!r}\n{traceback.format_exc()}", flush=True)

    # ---- timings
    variants: dict[str, tuple[Callable[[], object] | None, str]] = {
        "no pass": (None, "sdpa"),
        "no pass eager": (None, "eager"),
        "var": (lambda: mitigation.VAR(fused=True, **var_kwargs), "sdpa"),
        "var explicit": (lambda: mitigation.VAR(fused=False, **var_kwargs), "sdpa"),
        "var eager": (lambda: mitigation.VAR(fused=False, **var_kwargs), "eager"),
        "vhr": (mitigation.VHR, "sdpa"),
        "vhr eager": (mitigation.VHR, "eager"),
        "cca": (mitigation.CCA, "sdpa"),
        "cca eager": (mitigation.CCA, "eager"),
    }
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",")]
        unknown = [v for v in wanted if v not in variants]
        if unknown:
            ap.error(f"unknown variants {unknown}; choose from {list(variants)}")
        variants = {k: v for k, v in variants.items() if k in wanted}

    def run(name: str) -> tuple[float, list[float]]:
        from transformers import LogitsProcessorList

        factory, backend = variants[name]
        clock = StepClock(device)
        gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=lvlm.tokenizer.pad_token_id, logits_processor=LogitsProcessorList([clock]))
        lvlm.attn_backend = backend
        handle = factory().apply(lvlm) if factory is not None else None
        try:
            sync(device)
            start = time.perf_counter()
            with torch.no_grad():
                lvlm.generate_ids(single, **gen)
        finally:
            if handle is not None:
                handle.remove()
            lvlm.attn_backend = "sdpa"
        if len(clock.stamps) != new_tokens:
            raise RuntimeError(f"{len(clock.stamps)} steps recorded, expected {new_tokens}")
        return clock.stamps[0] - start, [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]

    prefill: dict[str, list[float]] = {name: [] for name in variants}
    decode: dict[str, list[float]] = {name: [] for name in variants}
    failed: set[str] = set()

    def attempt(name: str, record: bool) -> None:
        if name in failed:
            return
        try:
            p, d = run(name)
        except Exception as exc:
            failed.add(name)
            results["errors"][name] = repr(exc)
            save()
            print(f"variant {name!r} failed: {exc!r}\n{traceback.format_exc()}", flush=True)
            return
        if record:
            prefill[name].append(p)
            decode[name].extend(d)

    t_time = time.perf_counter()
    for name in variants:  # warm-up (Triton compilation, cuBLAS heuristics, allocator)
        attempt(name, record=False)
    print(f"warm-up done in {time.perf_counter() - t_time:.1f} s", flush=True)
    for r in range(repeats):
        for name in variants:
            attempt(name, record=True)
        results["rows"] = summarize(variants, prefill, decode, failed)
        save()
        print(f"round {r + 1}/{repeats} done ({time.perf_counter() - t_time:.1f} s)", flush=True)

    print(f"\n{results['device']}, {dtype}, batch 1, prompt {results['prompt_length']} tokens "
          f"({results['image_tokens']} image tokens), {new_tokens} new tokens; medians of {repeats} rounds "
          "(decode: over all steps)")
    print("| pass | prefill ms | decode ms/token | overhead vs no pass (prefill / decode) | "
          "speed-up vs eager (prefill / decode) |")
    print("|---|---|---|---|---|")
    for row in results["rows"]:
        over = f"{row['prefill_overhead_pct']:+.1f}% / {row['decode_overhead_pct']:+.1f}%" \
            if row.get("decode_overhead_pct") is not None else "-"
        speed = f"{row['prefill_speedup_vs_eager']:.2f}x / {row['decode_speedup_vs_eager']:.2f}x" \
            if row.get("decode_speedup_vs_eager") is not None else "-"
        print(f"| {row['variant']} | {row['prefill_ms']:.1f} | {row['decode_ms_per_token']:.2f} | {over} | {speed} |")
    for name, err in results["errors"].items():
        print(f"error in {name}: {err}")
    print(f"\nresults: {out_path}")
    return 0


def summarize(variants: dict, prefill: dict[str, list[float]], decode: dict[str, list[float]],
              failed: set[str]) -> list[dict]:
    """One row per measured variant: medians in ms, overhead vs no pass, speed-up vs the eager version."""
    med = {n: (1000 * statistics.median(prefill[n]), 1000 * statistics.median(decode[n]))
           for n in variants if n not in failed and prefill[n] and decode[n]}
    rows = []
    for name, (p, d) in med.items():
        row = {"variant": name, "prefill_ms": p, "decode_ms_per_token": d, "prefill_s": prefill[name],
               "decode_steps": len(decode[name])}
        if "no pass" in med and not name.startswith("no pass"):
            row["prefill_overhead_pct"] = 100 * (p / med["no pass"][0] - 1)
            row["decode_overhead_pct"] = 100 * (d / med["no pass"][1] - 1)
        base = name.split()[0]
        eager = "no pass eager" if base == "no" else f"{base} eager"
        if not name.endswith("eager") and eager in med:
            row["prefill_speedup_vs_eager"] = med[eager][0] / p
            row["decode_speedup_vs_eager"] = med[eager][1] / d
        rows.append(row)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
