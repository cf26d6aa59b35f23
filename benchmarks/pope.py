"""POPE throughput: the batched, resumable runner (attnzoo.eval.run) vs a batch-1 loop as in the official
scripts (LLaVA's model_vqa_loader: one question, one generate call), on a LLaVA-1.5-7B-shaped model with
random weights (no download).

    python benchmarks/pope.py                       # H100: 7B shape, bf16, 96 questions, batch 1/8/16/32
    python benchmarks/pope.py --shape tiny --device cpu --questions 24 --batch-sizes 1,4   # CPU smoke run

Random weights never say "yes" or stop early, so every answer is forced to ``--new-tokens`` tokens
(``min_new_tokens = max_new_tokens``; POPE answers are a few tokens long) and all methods decode the same
number of tokens (the model is ``attnzoo.mllm.build_random_llava``: the published shape, 32064-row LM head).
Method: a warm-up generate per batch size first; each variant answers the same questions; wall time with
``torch.cuda.synchronize``; medians over ``--repeats``. Results go to ``$OUT/pope_throughput.json`` (or
``--out``) after every measurement, so a cut-off run keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from attnzoo.eval import EvalItem, build_questions, load_synonyms, markdown_table, pope_items, run


def build_lvlm(shape: str, device: str, dtype: torch.dtype):
    """A wrapped LLaVA-1.5 with random weights: ``shape`` "7b" (CLIP ViT-L/14-336 + Vicuna-7B) or "tiny"."""
    from attnzoo.mllm import build_random_llava, build_tiny_llava, wrap

    if shape == "tiny":
        model, processor = build_tiny_llava(image_size=336, patch_size=14)
        return wrap(model.to(device=device, dtype=dtype), processor)
    model, processor = build_random_llava(shape, device=device, dtype=dtype)
    return wrap(model, processor)


def make_items(n_questions: int, image_dir: Path, seed: int = 0) -> list[EvalItem]:
    """``n_questions`` POPE-adversarial questions (6 per image) about random 640x480 noise images."""
    names = [row[0] for row in load_synonyms()]
    rng = random.Random(seed)
    n_images = max(-(-n_questions // 6), 5)  # enough distinct objects for the negatives
    images = {f"COCO_val2014_{i:012d}.jpg": rng.sample(names, 4) for i in range(n_images)}
    # adversarial needs co-occurrence; the random objects give it, with the random fallback where they do not
    questions = build_questions(images, "adversarial", seed=seed)[:n_questions]
    pix = np.random.default_rng(seed)
    for name in images:
        Image.fromarray((pix.random((480, 640, 3)) * 255).astype("uint8")).save(image_dir / name, quality=90)
    return pope_items(questions, image_dir)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def loop_batch1(lvlm, items: list[EvalItem], gen: dict, device: str) -> tuple[list[str], float]:
    """The official scripts' loop: open the image, one generate call per question, keep the answer."""
    answers = []
    _sync(device)
    t0 = time.perf_counter()
    for it in items:
        with Image.open(it.image) as im:
            image = im.convert("RGB")
        answers += lvlm.generate([image], [it.prompt], **gen)
    _sync(device)
    return answers, time.perf_counter() - t0


def runner(lvlm, items: list[EvalItem], gen: dict, batch: int, folder: Path, device: str) -> tuple[list[str], float]:
    """attnzoo.eval.run in a fresh folder (JSONL + fsync per batch included in the time)."""
    _sync(device)
    t0 = time.perf_counter()
    recs = run(lvlm, items, folder, {"bench": "pope", "batch": batch}, batch_size=batch, gen_kwargs=gen,
               progress=False)
    _sync(device)
    return [r["answer"] for r in recs], time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=("7b", "tiny"), default="7b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--questions", type=int, default=96)
    p.add_argument("--batch-sizes", default="1,8,16,32")
    p.add_argument("--new-tokens", type=int, default=4, help="tokens per answer (forced)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    gen = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}
    torch.manual_seed(0)
    t0 = time.perf_counter()
    lvlm = build_lvlm(args.shape, args.device, dtype)
    build_s = time.perf_counter() - t0
    info = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "shape": args.shape, "dtype": args.dtype, "questions": args.questions,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "model_build_s": build_s,
            "params_b": sum(p.numel() for p in lvlm.model.parameters()) / 1e9}
    print(json.dumps(info), flush=True)
    rows: list[dict] = []
    results = {"info": info, "rows": rows}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        items = make_items(args.questions, tmp / "images")
        warm = [Image.open(it.image).convert("RGB") for it in items[:max(batch_sizes)]]
        for b in sorted(set([1] + batch_sizes)):  # warm-up: every batch shape once
            lvlm.generate(warm[:b], [it.prompt for it in items[:b]], **gen)
        reference = None
        variants = [("loop (official style)", 1)] + [("attnzoo runner", b) for b in batch_sizes]
        for method, b in variants:
            times, answers = [], None
            for r in range(args.repeats):
                if method.startswith("loop"):
                    answers, secs = loop_batch1(lvlm, items, gen, args.device)
                else:
                    answers, secs = runner(lvlm, items, gen, b, tmp / f"run_b{b}_r{r}", args.device)
                times.append(secs)
            reference = reference or answers
            agree = sum(a == r for a, r in zip(answers, reference)) / len(reference)
            secs = statistics.median(times)
            rows.append({"method": method, "batch": b, "questions": len(items), "seconds": secs,
                         "questions_per_s": len(items) / secs, "times": times, "same_answers_as_loop": agree})
            (out / "pope_throughput.json").write_text(json.dumps(results, indent=2))
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["questions_per_s"]
    table = [{"method": r["method"], "batch": r["batch"], "questions/s": f"{r['questions_per_s']:.2f}",
              "vs loop": f"{r['questions_per_s'] / base:.2f}x",
              "same answers": f"{100 * r['same_answers_as_loop']:.0f}%"} for r in rows]
    print(f"\nPOPE throughput, {info['device']}, LLaVA-1.5-{args.shape} shape ({info['params_b']:.2f} B params, "
          f"random weights), {args.dtype}, {len(items)} questions, {args.new_tokens} new tokens each, "
          f"median of {args.repeats}")
    print(markdown_table(table, ["method", "batch", "questions/s", "vs loop", "same answers"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
