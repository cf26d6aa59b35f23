"""Cost of the attention-level mitigation passes (VAR, VHR, CCA): prefill time and per-token decode time with each
pass vs no pass vs an eager-attention implementation of the same pass (what the official code does).

LLaVA-1.5-7B-shaped model with random weights (attnzoo.mllm.build_random_llava: 576 image tokens, bf16), batch 1,
one set of weights, variants switched in place:

- ``no pass`` / ``no pass eager``: nothing attached, SDPA / eager attention everywhere;
- ``var``: VAR with the fused key-group attention (attnzoo.kernels.key_group_attention) in the layers it edits,
  SDPA elsewhere; ``var before``: the same with the decode path of session 3 (argument checks in every call, the
  kernel launched through ``JITFunction.run``) for a paired before/after; ``var explicit``: VAR on explicit float32
  post-softmax weights in those layers, SDPA elsewhere;
- ``vhr``, ``cca``: the passes as shipped (SDPA wherever they allow it);
- ``<pass> eager``: the same pass with ``lvlm.attn_backend = "eager"``: every layer the pass does not take over
  runs eager attention, as the official code runs the model with ``attn_implementation="eager"`` (VAR eager
  uses the explicit weights, as the official code does).

Random weights have no massive activations, so VAR's ``tau`` is calibrated on the prompt (the 85th percentile of
the RMS-normalised residual in the sink dimensions, layers >= 2) so that some tokens are sinks and the
redistribution actually runs; every other hyper-parameter is the paper's.

Correctness first, on the device: the key-group and VAR kernels vs float64 re-computations on 7B attention shapes
(VAR's direct and normal launches bit-identical; ``--stop-on-check-failure`` skips the timings when one fails), then
fused VAR vs explicit VAR logits on a left-padded batch of 2 at prefill and at
every decode step (teacher-forced on the explicit run's tokens), next to how much VAR changes the logits at all
(a warning, not a stop, when the fused-vs-explicit difference is not well below that).

Timing. Decode at batch 1 is host-bound (the GPU needs a few ms per token, Python and the launches take several
times that), and the host's speed drifts by tens of percent over seconds, so the method compares each variant
with the no-pass run next to it in time:

- per step: a LogitsProcessor records ``torch.cuda.synchronize()``, then ``perf_counter()`` and the main thread's
  CPU time at every generation step; prefill = start of ``generate`` to the first step (vision tower, prompt forward
  and, for VHR, its image-free forward), decode = the time between consecutive steps (wall, and CPU: the host
  time the launching thread ran, which other processes competing for the CPU do not inflate);
- one warm-up generate per variant, then ``--repeats`` short rounds (``--new-tokens`` tokens each) of all
  variants, interleaved, the order rotated every round, ``gc.collect()`` before every generate;
- reported: prefill median; decode median and inter-quartile range over all step intervals (wall and CPU); the
  overhead vs no pass and the speed-up vs the eager form paired by round: the median over rounds of the ratio of
  the two variants' medians in that round, with the quartiles of that ratio over rounds;
- device time per decode token (CUDA only): kernel and copy time from torch.profiler, the difference between a
  20-token and a 4-token generate over 16;
- host time per attention call at the decode shape, for each pass at a layer it edits and one it leaves alone,
  next to the no-pass call, a bare SDPA call and a bare ``var_attention`` call (200 queued calls, min of 5).

Every run is forced to its token count. A failing variant is reported and skipped. Results: ``$OUT/passes.json``
(or ``--out``), rewritten after every measurement.

    python benchmarks/passes.py            # H100: 7B shape, bf16, batch 1; about 3 minutes
    python benchmarks/passes.py --tiny     # CPU smoke run on the tiny LLaVA (seconds)
"""

from __future__ import annotations

import argparse
import gc
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
from attnzoo.mllm import AttentionPass, build_random_llava, build_tiny_llava, wrap  # noqa: E402

PROMPTS = ["Please describe this image in detail.", "Is there a dog in the image? Answer the question using a "
           "single word or phrase."]


class CpuStepClock(StepClock):
    """:class:`StepClock` that also records the main thread's CPU time at every step: the host time the thread that
    issues every launch spent running, which other processes competing for the CPU (they only delay it) do not
    inflate."""

    def __init__(self, device: str) -> None:
        super().__init__(device)
        self.cpu: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = super().__call__(input_ids, scores)
        self.cpu.append(time.thread_time())
        return scores


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


def check_var_kernel(device: str, dtype: torch.dtype, tiny: bool) -> dict:
    """var_attention (the device's backend) vs a float64 re-computation (float64 group sums edited by the same rule)
    on LLaVA-7B attention shapes: a left-padded batch of 2 at prefill (causal, and with a bool keep-mask) and at 18
    decode steps (keys past the prompt's ids; the key length crosses a multiple of 16, so direct launches replay
    kernels across integer specializations). Cells whose selection is within 2e-3 of a threshold are left out of
    the error (bf16 rounding may decide them either way). On CUDA also: direct and normal launches bit-identical."""
    from attnzoo.kernels.grouped_attention import var_attention, var_combine

    gen = torch.Generator().manual_seed(1)
    heads, dim, prompt = (4, 16, 40) if tiny else (32, 128, 602)
    image = slice(5, prompt - 20)
    on_image = torch.zeros(2, prompt, dtype=torch.bool)
    on_image[:, image] = True
    sink = torch.rand(2, prompt, generator=gen) < 0.15
    # VAR's groups: 0 text, 1 image, 2 visual sink, 3 text sink; sample 1 has 7 keys of left padding (-1)
    ids = torch.where(on_image, torch.where(sink, 2, 1), torch.where(sink, 3, 0)).to(torch.int32)
    ids[1, :7] = -1
    after = torch.tensor([image.stop - 1, image.stop - 1], dtype=torch.int32)
    image_eps = 1e-6 * ((ids == 1) | (ids == 2)).sum(-1).float()
    p, summ, rho = 0.6, 0.2, 0.5

    def reference(q, k, v, mask, kv_len):
        full = torch.nn.functional.pad(ids, (0, kv_len - prompt), value=0)
        outs, masses = key_group_attention_reference(q, k, v, full, 4, mask=mask)
        positions = torch.arange(kv_len - q.shape[2], kv_len)
        ref = var_combine(outs, masses, positions, after, image_eps.double(), p, summ, rho)
        on_image = masses[..., 1] + masses[..., 2]
        share = masses[..., 2] / (on_image + image_eps.double()[:, None, None])
        clear = ((on_image - summ).abs() > 2e-3) & ((share - rho).abs() > 2e-3)  # (B, H, q)
        later = positions[None, None, :] > after[:, None, None]
        selected = (on_image >= summ) & (share <= rho) & later
        return ref.transpose(1, 2), clear.transpose(1, 2), selected

    out: dict = {}
    dev = lambda t: t.to(device)  # noqa: E731
    q_scale = 3.0  # peaky attention: image masses spread over [0, 1], so the thresholds split the cells
    cases = [("prefill", prompt, prompt, False), ("prefill, bool mask", prompt, prompt, True)]
    cases += [(f"decode +{t}", 1, prompt + t, False) for t in range(18)]
    k_all = torch.randn(2, heads, prompt + 18, dim, generator=gen).to(dtype)
    v_all = torch.randn(2, heads, prompt + 18, dim, generator=gen).to(dtype)
    worst = {"max_abs_err": 0.0, "cells_left_out": 0, "cells": 0, "selected": 0}
    direct_equal = None
    for name, q_len, kv_len, with_mask in cases:
        q = (q_scale * torch.randn(2, heads, q_len, dim, generator=gen)).to(dtype)
        k, v = k_all[:, :, :kv_len].contiguous(), v_all[:, :, :kv_len].contiguous()
        mask = None
        if with_mask:
            mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)[None, None].repeat(2, 1, 1, 1)
            mask[1, :, :, :7] = False
        got = var_attention(dev(q), dev(k), dev(v), dev(ids), dev(after), dev(image_eps), p, summ, rho,
                            mask=None if mask is None else dev(mask))
        ref, clear, selected = reference(q, k, v, mask, kv_len)
        err = (got.double().cpu() - ref).abs().amax(-1)  # (B, q, H)
        real = torch.ones_like(clear)
        if q_len > 1:
            real[1, :7] = False  # padding queries of sample 1 see no key of their own: not compared
        err = err[clear & real]
        row = {"max_abs_err": float(err.max()), "output_scale": float(ref.abs().max()),
               "cells_left_out": int((~clear & real).sum()), "cells": int(real.sum()),
               "selected_share": float(selected.double().mean())}
        if name.startswith("prefill") or name in ("decode +0", "decode +17"):
            out[name] = row
        worst["max_abs_err"] = max(worst["max_abs_err"], row["max_abs_err"])
        worst["cells_left_out"] += row["cells_left_out"]
        worst["cells"] += row["cells"]
        worst["selected"] += int(selected.sum())
        if device == "cuda" and name.startswith("decode"):  # the direct launch vs the normal launch, same inputs
            from attnzoo.kernels import _grouped_attention_triton as gat

            gat.VAR_LAUNCHES.enabled = False
            gat.VAR_LAUNCHES.direct.clear()
            normal = var_attention(dev(q), dev(k), dev(v), dev(ids), dev(after), dev(image_eps), p, summ, rho)
            gat.VAR_LAUNCHES.enabled = True
            again = var_attention(dev(q), dev(k), dev(v), dev(ids), dev(after), dev(image_eps), p, summ, rho)
            same = bool(torch.equal(normal, got) and torch.equal(again, got))
            direct_equal = same if direct_equal is None else direct_equal and same
    out["all cases"] = worst
    out["direct_launch_bit_identical"] = direct_equal
    if device == "cuda":
        from attnzoo.kernels import _grouped_attention_triton as gat

        out["compiled_specializations"] = len(gat.VAR_LAUNCHES.compiled)
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


class VarBefore(mitigation.VAR):
    """VAR's decode path before the direct launch (session 3): every call through :func:`var_attention`'s checks;
    timed with direct launches off (:func:`launch_path`)."""

    def fused_key_groups(self, ctx, query, key, value, mask):
        from attnzoo.kernels.grouped_attention import var_attention

        ids, _, _, _, _, _, after, image_eps = self._layer_groups(ctx)
        return var_attention(query, key, value, ids, after, image_eps, self.p, self.summ, self.rho,
                             scale=ctx.scaling, causal=ctx.causal, mask=mask)


def launch_path(direct: bool) -> None:
    """Switch the VAR kernel's direct launch on or off (a no-op without triton)."""
    try:
        from attnzoo.kernels import _grouped_attention_triton as gat
    except ImportError:
        return
    gat.VAR_LAUNCHES.enabled = direct


class _IdlePass(AttentionPass):
    """Attached, asked for a plan in every attention call (no ``may_act``), never acts: the runtime's own cost."""

    def plan(self, ctx):
        return None


def host_costs(lvlm, batch, var_kwargs: dict, device: str, calls: int = 200, repeats: int = 5) -> dict:
    """Per-call time (us) of the "attnzoo" attention function at the decode shape (batch 1, one query, the prompt
    plus 8 keys), for each pass at a layer it edits and one it leaves alone, next to the no-pass call, a bare SDPA
    call and bare ``var_attention`` calls. ``calls`` calls are queued, then one sync; the minimum over ``repeats``
    rounds, each round measuring every entry once (the host's speed drifts: entries measured in one stretch would
    each see a different host). At this shape the device needs a few us per call, so on the GPU this is the host
    cost of the call."""
    from attnzoo.kernels.grouped_attention import var_attention, var_attention_backend
    from attnzoo.mllm.attention import attnzoo_attention

    n = lvlm.num_layers
    layers = sorted({n // 3, (2 * n) // 3})  # 7B: 10 (VAR edits it, VHR not) and 21 (both edit it)
    kv_len = batch.layout.prompt_length + 8
    gen = torch.Generator(device="cpu").manual_seed(0)
    dtype = lvlm.dtype
    q = torch.randn(1, lvlm.num_heads, 1, lvlm.head_dim, generator=gen).to(device, dtype)
    k, v = (torch.randn(1, lvlm.num_kv_heads, kv_len, lvlm.head_dim, generator=gen).to(device, dtype)
            for _ in range(2))
    scale = lvlm.head_dim ** -0.5
    best: dict[str, float] = {}

    def per_call(name: str, fn) -> None:
        for _ in range(10):
            fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        best[name] = min(best.get(name, float("inf")), 1e6 * (time.perf_counter() - t0) / calls)

    groups = torch.zeros(1, batch.layout.prompt_length, dtype=torch.int32, device=device)
    after = torch.zeros(1, dtype=torch.int32, device=device)
    eps = torch.zeros(1, dtype=torch.float32, device=device)
    launch = var_attention_backend(q.device)
    makers = {"no pass": None, "idle pass (asked every call)": _IdlePass,
              "var": lambda: mitigation.VAR(fused=True, **var_kwargs),
              "var before": lambda: VarBefore(fused=True, **var_kwargs), "vhr": mitigation.VHR,
              "cca": mitigation.CCA}
    for _ in range(repeats):
        per_call("sdpa (bare torch call)", lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, scale=scale, enable_gqa=lvlm.num_heads != lvlm.num_kv_heads))
        for direct in (False, True):
            launch_path(direct)
            label = "direct launch" if direct else "normal launch"
            per_call(f"var_attention (bare call, {label})",
                     lambda: var_attention(q, k, v, groups, after, eps, 0.6, 0.2, 0.5, scale=scale))
            per_call(f"var_attention backend function (no checks, {label})",
                     lambda: launch(q, k, v, groups, after, eps, 0.6, 0.2, 0.5, scale, True, None, None))
        for name, make in makers.items():
            handle = lvlm.attach(make()) if make is not None else None
            launch_path(name != "var before")
            try:
                with torch.no_grad(), lvlm.use_layout(batch.layout):
                    lvlm.model(**batch.inputs)  # prefill: the pass finds this batch's sinks / heads
                    for layer in layers:
                        attn = lvlm.decoder_layers[layer].self_attn
                        acts = make not in (None, _IdlePass) and handle.pass_obj.may_act("text", layer, False)
                        per_call(f"{name}, layer {layer}{' (edited)' if acts else ''}",
                                 lambda attn=attn: attnzoo_attention(attn, q, k, v, None, scaling=scale))
            finally:
                if handle is not None:
                    handle.remove()
    launch_path(True)
    return {"layers": layers, "kv_length": kv_len, **best}


def device_ms_per_token(run_fn, name: str, short: int = 4, extra: int = 16) -> float:
    """Device (kernel) time per decode token, from torch.profiler's CUDA kernel and copy events: the kernel time of
    a ``short + extra``-token generate minus that of a ``short``-token one, over ``extra``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    totals = []
    for tokens in (short, short + extra):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run_fn(name, tokens)
        totals.append(sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA))
    if totals[0] <= 0:
        raise RuntimeError("the profiler recorded no CUDA kernel events")
    return (totals[1] - totals[0]) / extra / 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny LLaVA on the CPU (smoke run)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per answer (default 20; tiny: 6)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 12; tiny: 2)")
    ap.add_argument("--variants", default=None, help="comma list of variant names to time (default: all)")
    ap.add_argument("--skip-checks", action="store_true", help="no kernel / fused-vs-explicit checks")
    ap.add_argument("--stop-on-check-failure", action="store_true", help="no timings when a kernel check fails")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    new_tokens = args.new_tokens or (6 if args.tiny else 20)
    repeats = args.repeats or (2 if args.tiny else 12)
    out_path = Path(args.out) / "passes.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    if args.tiny:
        model, processor = build_tiny_llava(seed=0, num_layers=4, num_heads=4, num_kv_heads=2)
    else:
        model, processor = build_random_llava("7b", device=device, dtype=dtype)
    model.eval()
    lvlm = wrap(model, processor)
    import transformers

    results: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                     "torch": torch.__version__, "transformers": transformers.__version__, "dtype": str(dtype),
                     "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "batch": 1,
                     "new_tokens": new_tokens, "repeats": repeats, "checks": {}, "errors": {}, "rows": []}
    try:
        import triton

        results["triton"] = triton.__version__
    except ImportError:
        pass

    def save() -> None:
        out_path.write_text(json.dumps(results, indent=1))

    rng = np.random.default_rng(0)
    size = 32 if args.tiny else 336
    images = [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for _ in range(2)]
    pair = lvlm.prepare(images, PROMPTS)
    single = lvlm.prepare(images[:1], PROMPTS[:1])
    results["image_tokens"] = int(single.layout.num_image_tokens[0])
    results["prompt_length"] = single.layout.prompt_length
    print(f"built in {time.perf_counter() - t_start:.1f} s; prompt {single.layout.prompt_length} tokens "
          f"({results['image_tokens']} image tokens)", flush=True)

    # ---- VAR's configuration: the paper's, with tau calibrated on this random model
    if args.tiny:
        dims = find_sink_dims(lvlm, images[:1])
    else:
        dims = known_sink_dims("llava-1.5-7b")
    tau = calibrated_tau(lvlm, single, dims)
    var_kwargs = dict(sink_dims=dims, tau=tau)
    results["var"] = {"sink_dims": list(dims), "tau": tau}

    if not args.skip_checks:
        # ---- the kernel on this device (falls back to the PyTorch backend if the Triton kernel fails)
        try:
            kernel = check_kernel(device, dtype, args.tiny)
            results["checks"]["kernel"] = kernel
            print(f"kernel check (vs float64): {json.dumps(kernel)}", flush=True)
            bad = [name for name, r in kernel.items()
                   if r["max_abs_err_outputs"] > 3e-2 * max(1.0, r["output_scale"]) or r["max_abs_err_masses"] > 1e-2]
            if bad:
                raise RuntimeError(f"key_group_attention differs from the float64 reference beyond bf16 rounding in "
                                   f"{bad}")
        except Exception as exc:
            results["errors"]["kernel"] = repr(exc)
            print(f"KERNEL FAILED: {exc!r}\n{traceback.format_exc()}\nfalling back to set_backend('torch')",
                  flush=True)
            set_backend("torch")
            results["key_group_backend"] = "torch (fallback)"
            if args.stop_on_check_failure:
                save()
                return 1
        save()
        try:
            var_kernel = check_var_kernel(device, dtype, args.tiny)
            results["checks"]["var_kernel"] = var_kernel
            save()
            print(f"VAR kernel check (vs float64): {json.dumps(var_kernel)}", flush=True)
            worst = var_kernel["all cases"]
            if worst["max_abs_err"] > (1e-4 if args.tiny else 3e-2) * max(1.0, var_kernel["prefill"]["output_scale"]) \
                    or var_kernel["direct_launch_bit_identical"] is False:
                raise RuntimeError("var_attention differs from the float64 reference beyond the dtype's rounding, or "
                                   "direct and normal launches differ")
        except Exception as exc:
            results["errors"]["var_kernel"] = repr(exc)
            save()
            print(f"VAR KERNEL CHECK FAILED: {exc!r}\n{traceback.format_exc()}", flush=True)
            if args.stop_on_check_failure:
                return 1

        # ---- correctness on this device: fused VAR == explicit VAR
        try:
            check = check_var(lvlm, pair, var_kwargs, steps=4)
            results["checks"]["var_fused_vs_explicit"] = check
            save()
            worst = max([check["prefill_fused_vs_explicit"], *check["decode_fused_vs_explicit_per_step"]])
            print(f"check: VAR fused vs explicit max |dlogit| prefill {check['prefill_fused_vs_explicit']:.3g}, "
                  f"decode {', '.join(f'{x:.3g}' for x in check['decode_fused_vs_explicit_per_step'])}; VAR's own "
                  f"effect {check['prefill_var_effect']:.3g}; logit scale {check['logit_scale']:.3g}", flush=True)
            if worst > 0.1 * check["prefill_var_effect"] and \
                    worst > (1e-4 if args.tiny else 0.05) * check["logit_scale"]:
                print("WARNING: fused and explicit VAR differ by more than a tenth of VAR's own effect", flush=True)
        except Exception as exc:  # report and go on to the timings
            results["errors"]["check"] = repr(exc)
            save()
            print(f"CHECK FAILED with an error: {exc!r}\n{traceback.format_exc()}", flush=True)

    # ---- host cost of one attention call at decode
    try:
        results["host_us_per_attention_call"] = host_costs(lvlm, single, var_kwargs, device)
        save()
        print("host time per attention call at decode (us): " + ", ".join(
            f"{k} {v:.1f}" for k, v in results["host_us_per_attention_call"].items() if isinstance(v, float)),
            flush=True)
    except Exception as exc:
        results["errors"]["host_costs"] = repr(exc)
        print(f"host cost measurement failed: {exc!r}\n{traceback.format_exc()}", flush=True)

    # ---- timings
    variants: dict[str, tuple[Callable[[], object] | None, str]] = {
        "no pass": (None, "sdpa"),
        "var": (lambda: mitigation.VAR(fused=True, **var_kwargs), "sdpa"),
        "var before": (lambda: VarBefore(fused=True, **var_kwargs), "sdpa"),
        "vhr": (mitigation.VHR, "sdpa"),
        "cca": (mitigation.CCA, "sdpa"),
        "no pass eager": (None, "eager"),
        "var explicit": (lambda: mitigation.VAR(fused=False, **var_kwargs), "sdpa"),
        "var eager": (lambda: mitigation.VAR(fused=False, **var_kwargs), "eager"),
        "vhr eager": (mitigation.VHR, "eager"),
        "cca eager": (mitigation.CCA, "eager"),
    }
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",")]
        unknown = [v for v in wanted if v not in variants]
        if unknown:
            ap.error(f"unknown variants {unknown}; choose from {list(variants)}")
        variants = {k: v for k, v in variants.items() if k in wanted}
    names = list(variants)

    def run(name: str, tokens: int) -> tuple[float, list[float], list[float]]:
        """(prefill s, decode step wall times s, decode step main-thread CPU times s) of one generate."""
        from transformers import LogitsProcessorList

        factory, backend = variants[name]
        clock = CpuStepClock(device)
        gen = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                   pad_token_id=lvlm.tokenizer.pad_token_id, logits_processor=LogitsProcessorList([clock]))
        lvlm.attn_backend = backend
        launch_path(name != "var before")
        handle = factory().apply(lvlm) if factory is not None else None
        try:
            gc.collect()  # no collection of an earlier run's garbage inside this one
            sync(device)
            start = time.perf_counter()
            with torch.no_grad():
                lvlm.generate_ids(single, **gen)
        finally:
            if handle is not None:
                handle.remove()
            lvlm.attn_backend = "sdpa"
        if len(clock.stamps) != tokens:
            raise RuntimeError(f"{len(clock.stamps)} steps recorded, expected {tokens}")
        return (clock.stamps[0] - start, [b - a for a, b in zip(clock.stamps, clock.stamps[1:])],
                [b - a for a, b in zip(clock.cpu, clock.cpu[1:])])

    # per variant, per round: prefill s, decode step wall times, decode step CPU times
    prefill: dict[str, list[float]] = {name: [] for name in variants}
    rounds: dict[str, list[list[float]]] = {name: [] for name in variants}
    cpu_rounds: dict[str, list[list[float]]] = {name: [] for name in variants}
    failed: set[str] = set()

    def attempt(name: str, tokens: int, record: bool) -> None:
        if name in failed:
            return
        try:
            p, d, c = run(name, tokens)
        except Exception as exc:
            failed.add(name)
            results["errors"][name] = repr(exc)
            save()
            print(f"variant {name!r} failed: {exc!r}\n{traceback.format_exc()}", flush=True)
            return
        if record:
            prefill[name].append(p)
            rounds[name].append(d)
            cpu_rounds[name].append(c)

    t_time = time.perf_counter()
    for name in names:  # warm-up (Triton compilation, cuBLAS heuristics, allocator)
        attempt(name, min(8, new_tokens), record=False)
    print(f"warm-up done in {time.perf_counter() - t_time:.1f} s", flush=True)
    # short interleaved rounds, the order rotated every round: host speed drifts over seconds, so every variant
    # is compared with the no-pass run of its own round
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            attempt(name, new_tokens, record=True)
        results["rows"] = summarize(variants, prefill, rounds, cpu_rounds, failed)
        save()
        print(f"round {r + 1}/{repeats} done ({time.perf_counter() - t_time:.1f} s)", flush=True)

    # ---- device time per decode token (kernels only), so that the host's share is visible
    if device == "cuda":
        device_ms: dict[str, float] = {}
        for name in ("no pass", "var", "var before", "vhr", "cca", "no pass eager"):
            if name not in variants or name in failed:
                continue
            try:
                device_ms[name] = device_ms_per_token(lambda n, t: run(n, t)[:2], name)
            except Exception as exc:
                results["errors"][f"device time {name}"] = repr(exc)
                print(f"device time of {name!r} failed: {exc!r}", flush=True)
        results["device_ms_per_token"] = device_ms
        for row in results["rows"]:
            if row["variant"] in device_ms:
                row["device_ms_per_token"] = device_ms[row["variant"]]
        save()

    print(f"\n{results['device']}, torch {results['torch']}, triton {results.get('triton', '-')}, transformers "
          f"{results['transformers']}, {dtype}, batch 1, prompt {results['prompt_length']} tokens "
          f"({results['image_tokens']} image tokens); {new_tokens} new tokens x {repeats} interleaved rounds. "
          "Decode wall and CPU: median [IQR] over all step intervals. Overhead vs no pass and speed-up vs eager: "
          "median over rounds of the ratio of the two variants' round medians [IQR over rounds].")
    print("| pass | prefill ms | decode ms/token (wall) | decode CPU ms/token | device ms/token | decode overhead vs "
          "no pass (wall) | (CPU) | decode speed-up vs eager | prefill overhead | prefill speed-up vs eager |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def spread(row: dict, key: str, pct: bool) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        mid, lo, hi = value
        return f"{mid:+.1f}% [{lo:+.1f}..{hi:+.1f}]" if pct else f"{mid:.2f}x [{lo:.2f}..{hi:.2f}]"

    for row in results["rows"]:
        dev = f"{row['device_ms_per_token']:.2f}" if row.get("device_ms_per_token") is not None else "-"
        pre = f"{row['prefill_overhead_pct']:+.1f}%" if row.get("prefill_overhead_pct") is not None else "-"
        pre_eager = f"{row['prefill_speedup_vs_eager']:.2f}x" if row.get("prefill_speedup_vs_eager") else "-"
        print(f"| {row['variant']} | {row['prefill_ms']:.1f} | {row['decode_ms_per_token']:.2f} "
              f"[{row['decode_q25_ms']:.2f}-{row['decode_q75_ms']:.2f}] | {row['decode_cpu_ms_per_token']:.2f} "
              f"[{row['decode_cpu_q25_ms']:.2f}-{row['decode_cpu_q75_ms']:.2f}] | {dev} | "
              f"{spread(row, 'decode_overhead_pct', True)} | {spread(row, 'decode_cpu_overhead_pct', True)} | "
              f"{spread(row, 'decode_speedup_vs_eager', False)} | {pre} | {pre_eager} |")
    for name, err in results["errors"].items():
        print(f"error in {name}: {err}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; results: {out_path}")
    return 0


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    q25, q50, q75 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return q25, q50, q75


def _paired(a: list[list[float]], b: list[list[float]], pct: bool) -> list[float] | None:
    """Median and quartiles over rounds of ``median(a round) / median(b round)`` (as a % change when ``pct``)."""
    ratios = [statistics.median(x) / statistics.median(y) for x, y in zip(a, b) if x and y]
    if not ratios:
        return None
    q25, q50, q75 = _quantiles(ratios)
    return [100 * (v - 1) for v in (q50, q25, q75)] if pct else [q50, q25, q75]


def summarize(variants: dict, prefill: dict[str, list[float]], rounds: dict[str, list[list[float]]],
              cpu_rounds: dict[str, list[list[float]]], failed: set[str]) -> list[dict]:
    """One row per measured variant (times in ms): prefill median; decode wall and main-thread CPU median and quartiles
    over all step intervals of all rounds; overhead vs no pass and speed-up vs the eager form paired by round
    (``[median, q25, q75]`` over rounds of the ratio of the two variants' medians in that round)."""
    done = [n for n in variants if n not in failed and prefill[n] and rounds[n]]
    rows = []
    for name in done:
        steps = [s for r in rounds[name] for s in r]
        cpu = [s for r in cpu_rounds[name] for s in r]
        q25, q50, q75 = _quantiles(steps)
        c25, c50, c75 = _quantiles(cpu)
        row = {"variant": name, "prefill_ms": 1000 * statistics.median(prefill[name]),
               "decode_ms_per_token": 1000 * q50,
               "decode_q25_ms": 1000 * q25, "decode_q75_ms": 1000 * q75, "decode_cpu_ms_per_token": 1000 * c50,
               "decode_cpu_q25_ms": 1000 * c25, "decode_cpu_q75_ms": 1000 * c75, "decode_steps": len(steps),
               "decode_round_medians_ms": [1000 * statistics.median(r) for r in rounds[name]],
               "prefill_s": prefill[name]}
        if "no pass" in done and not name.startswith("no pass"):
            row["prefill_overhead_pct"] = 100 * (statistics.median(prefill[name]) / statistics.median(
                prefill["no pass"]) - 1)
            row["decode_overhead_pct"] = _paired(rounds[name], rounds["no pass"], pct=True)
            row["decode_cpu_overhead_pct"] = _paired(cpu_rounds[name], cpu_rounds["no pass"], pct=True)
        base = name.split()[0]
        eager = "no pass eager" if base == "no" else f"{base} eager"
        if not name.endswith("eager") and eager in done:
            row["prefill_speedup_vs_eager"] = statistics.median(prefill[eager]) / statistics.median(prefill[name])
            row["decode_speedup_vs_eager"] = _paired(rounds[eager], rounds[name], pct=False)
        rows.append(row)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
