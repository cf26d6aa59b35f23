"""The ``attnzoo`` command line: one place for every subcommand.

    attnzoo info                 versions, device, kernel backends, registered models and passes
    attnzoo demo [--write-docs]  POPE + CHAIR of the bundled testbed LLaVA, baseline and every mitigation pass
    attnzoo demo --vision [--model PAT]   also build every vision model on the bundled image, check every kernel

Heavy libraries are imported inside the subcommands, so ``attnzoo --help`` stays fast.
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import importlib
import importlib.metadata
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
DEMO_IMAGE = DATA_DIR / "demo.png"

# Subcommands whose code lives in a subpackage: name -> (help, "module:add_arguments", "module:run").
# The module must import only light things at top level; it is imported when the parser is built.
_EXTRA_COMMANDS: dict[str, tuple[str, str, str]] = {
    "eval": ("POPE and CHAIR evaluation", "attnzoo.eval._cli:add_arguments", "attnzoo.eval._cli:run"),
    "testbed": ("synthetic co-occurrence scenes and the tiny testbed LLaVA", "attnzoo.eval._testbed_cli:add_arguments",
                "attnzoo.eval._testbed_cli:run"),
    "convert": ("convert an official checkpoint to timm-layout safetensors", "attnzoo.vision.convert:add_arguments",
                "attnzoo.vision.convert:run"),
}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def format_table(rows: Sequence[dict[str, object]], columns: Sequence[str]) -> str:
    """Render ``rows`` as a GitHub-markdown table with the given ``columns`` (missing cells print '-')."""
    cells = [[str(r.get(c, "-")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- info


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import attnzoo
    from attnzoo.kernels._backend import describe_backends, triton_available
    from attnzoo.vision import list_models

    print(f"attnzoo {attnzoo.__version__}  (python {sys.version.split()[0]})")
    for dist in ("torch", "triton", "timm", "transformers", "open_clip_torch", "pycocotools", "accelerate"):
        print(f"  {dist:<16} {_version(dist)}")
    if torch.cuda.is_available():
        print(f"device: cuda ({torch.cuda.get_device_name(0)}), {torch.cuda.device_count()} GPU(s)")
    else:
        print(f"device: cpu ({os.cpu_count()} cores), no CUDA device")
    backends = describe_backends()
    print(f"kernel backends: cpu -> {backends['cpu']}, cuda -> {backends['cuda']}"
          f"  (triton {'available' if triton_available() else 'missing'};"
          f" TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})")
    from attnzoo.kernels import list_checks

    print(f"kernels: {', '.join(sorted(list_checks())) or '(none registered)'}")
    models = list_models()
    print(f"vision models ({len(models)}): {', '.join(models) or '(none registered)'}")
    passes = _mitigation_passes()
    print(f"mitigation passes ({len(passes)}): {', '.join(passes) or '(none registered)'}")
    return 0


def _mitigation_passes() -> list[str]:
    try:
        mitigation = importlib.import_module("attnzoo.mitigation")
    except ImportError:
        return []
    available = getattr(mitigation, "available", None)
    return list(available()) if callable(available) else []


# ----------------------------------------------------------------------------------------- demo


def _select_models(patterns: Sequence[str] | None, registered: Sequence[str]) -> list[str]:
    """Expand model names / globs; raise SystemExit(2) naming the closest models for unknown ones."""
    if not patterns:
        return list(registered)
    chosen: list[str] = []
    for pat in patterns:
        hits = [m for m in registered if fnmatch.fnmatch(m, pat)]
        if not hits:
            close = difflib.get_close_matches(pat, registered, n=5, cutoff=0.4)
            hint = f"; closest registered: {', '.join(close)}" if close else ""
            print(f"attnzoo demo: error: unknown model {pat!r}{hint}. `attnzoo info` lists all.", file=sys.stderr)
            raise SystemExit(2)
        chosen += [h for h in hits if h not in chosen]
    return chosen


def _demo_models(names: Sequence[str], device: str, image: Path) -> list[dict[str, object]]:
    import timm
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    from tqdm import tqdm

    from attnzoo.kernels._backend import describe_backends

    kernel_backend = describe_backends()["cuda" if device.startswith("cuda") else "cpu"]
    pil = Image.open(image).convert("RGB")
    rows = []
    for name in tqdm(names, desc="models", unit="model", file=sys.stderr):
        model = timm.create_model(name, pretrained=False).eval().to(device)
        cfg = resolve_data_config({}, model=model)
        x = create_transform(**cfg)(pil).unsqueeze(0).to(device)
        with torch.inference_mode():
            if device.startswith("cuda"):
                model(x)  # warm-up: Triton compilation and autotuning happen on the first call
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = model(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
        uses = getattr(model, "attnzoo_kernels", ())
        rows.append({
            "name": name,
            "params": f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M",
            "input": "x".join(str(s) for s in cfg["input_size"][1:]),
            "backend": f"{kernel_backend} ({', '.join(uses)})" if uses else "timm",
            "time": f"{ms:.1f} ms",
            "max error": "-",
            "top-1": str(int(logits.argmax(-1)[0])) if torch.isfinite(logits).all() else "NON-FINITE",
        })
        del model
    return rows


def _demo_kernels(device: str) -> tuple[list[dict[str, object]], bool]:
    import torch

    from attnzoo.kernels import list_checks

    rows, ok = [], True
    for name, check in sorted(list_checks().items()):
        t0 = time.perf_counter()
        out, ref, backend = check(torch.device(device))
        ms = (time.perf_counter() - t0) * 1e3
        err = (out.double() - ref.double()).abs().max().item()
        tol = 1e-4 if out.dtype in (torch.float32, torch.float64) else 3e-2
        good = err <= tol * max(1.0, ref.abs().max().item())
        ok &= good
        rows.append({"name": name, "params": "-", "input": "x".join(map(str, out.shape)), "backend": backend,
                     "time": f"{ms:.1f} ms", "max error": f"{err:.1e}" + ("" if good else " FAIL"), "top-1": "-"})
    return rows, ok


def _demo_vision(args: argparse.Namespace, device: str) -> int:
    """The vision part of the demo: every (or the chosen) model on the bundled image, every kernel check."""
    import torch

    from attnzoo.vision import list_models

    names = _select_models(args.model, list_models())
    if not Path(args.image).is_file():
        print(f"attnzoo demo: error: image {args.image} not found", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    rows: list[dict[str, object]] = []
    ok = True
    if not args.skip_kernels and not args.model:
        krows, ok = _demo_kernels(device)
        rows += krows
    if not args.skip_models:
        rows += _demo_models(names, device, Path(args.image))
    print(format_table(rows, ["name", "params", "input", "backend", "time", "max error", "top-1"]))
    print(f"\n{len(rows)} rows on {device}; weights are random (no download), so top-1 is only a smoke check.")
    if not ok:
        print("attnzoo demo: a kernel disagrees with its reference (FAIL above)", file=sys.stderr)
        return 1
    return 0


DOCS_TESTBED = Path(__file__).resolve().parent.parent / "docs" / "testbed.md"
TABLE_START, TABLE_END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"


def write_docs_table(text: str, path: Path = DOCS_TESTBED) -> None:
    """Replace the block between the demo-table markers of ``path`` (docs/testbed.md) with ``text``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; --write-docs needs a source checkout of attnzoo")
    doc = path.read_text(encoding="utf-8")
    if TABLE_START not in doc or TABLE_END not in doc:
        raise ValueError(f"{path} has no {TABLE_START} ... {TABLE_END} block to replace")
    head, rest = doc.split(TABLE_START, 1)
    tail = rest.split(TABLE_END, 1)[1]
    path.write_text(f"{head}{TABLE_START}\n{text}\n{TABLE_END}{tail}", encoding="utf-8")


def _demo_testbed(args: argparse.Namespace, device: str) -> int:
    """The testbed part: fresh evaluation scenes, POPE (3 splits) + CHAIR per pass, one table."""
    import tempfile

    import torch

    from attnzoo.eval.runner import available_passes
    from attnzoo.eval.scenes import EVAL_COOCCURRENCE, generate_scenes
    from attnzoo.eval.testbed import BUNDLED_NAME, evaluate_testbed, format_testbed_table
    from attnzoo.mllm import load

    valid = available_passes()
    names = valid if args.passes is None else [n.strip() for n in args.passes.split(",") if n.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown:
        print(f"attnzoo demo: error: unknown pass {', '.join(map(repr, unknown))}; registered: {', '.join(valid)}",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="attnzoo-demo-") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        scenes = out / "scenes"
        num_scenes = max(3 * args.pope_images, args.chair_images) + 20  # POPE takes scenes with >= 3 objects
        if not (scenes / "annotations" / "instances_eval.json").is_file():
            generate_scenes(scenes, "eval", num_scenes, seed=args.seed, cooccurrence=EVAL_COOCCURRENCE,
                            progress=not args.no_progress)
        lvlm = load(BUNDLED_NAME, device=device)
        rows = evaluate_testbed(lvlm, scenes, out / "runs", pope_images=args.pope_images,
                                chair_images=args.chair_images, passes=[[]] + [[n] for n in names],
                                batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress)
    table = format_testbed_table(rows)
    total = time.perf_counter() - t0
    note = (f"{BUNDLED_NAME} on {num_scenes} fresh evaluation scenes (seed {args.seed}, co-occurrence "
            f"{EVAL_COOCCURRENCE}); POPE: {args.pope_images} images x 6 questions per split; CHAIR: "
            f"{args.chair_images} captions; {device}, {total:.0f} s in all. Numbers in %.")
    print(table)
    print(f"\n{note}")
    if args.write_docs:
        write_docs_table(f"{table}\n\n{note}")
        print(f"written to {DOCS_TESTBED}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    vision = bool(args.vision or args.model or args.skip_models or args.skip_kernels)  # any vision option asks for it
    if args.skip_testbed and not vision:
        print("attnzoo demo: error: --skip-testbed leaves nothing to run; add --vision (or --model PAT)",
              file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    code = 0
    if not args.skip_testbed:
        code = _demo_testbed(args, device)
    if code == 0 and vision:
        code = _demo_vision(args, device)
    return code


# ----------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``attnzoo`` command (subcommands info and demo, plus registered ones)."""
    parser = argparse.ArgumentParser(prog="attnzoo", description="attnzoo: attention kernels, vision zoo, LVLM "
                                     "hallucination mitigation")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: info logs, -vv: debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="versions, device, kernel backends, registered models and passes")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="POPE + CHAIR of the bundled testbed LLaVA under every mitigation pass "
                       "(--vision: also every vision model and kernel check)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--pope-images", type=int, default=100, help="POPE images per split, 6 questions each "
                   "(default: 100)")
    p.add_argument("--chair-images", type=int, default=50, help="CHAIR captions (default: 50)")
    p.add_argument("--passes", default=None, metavar="P1,P2",
                   help="mitigation passes to compare with the baseline (default: every registered pass)")
    p.add_argument("--seed", type=int, default=1, help="seed of the evaluation scenes and questions (default: 1)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate call (default: 32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy CPU)")
    p.add_argument("--out", default=None, metavar="DIR", help="keep the scenes and answers here (default: a "
                   "temporary folder; an existing DIR resumes)")
    p.add_argument("--write-docs", action="store_true", help="write the table into docs/testbed.md")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--skip-testbed", action="store_true", help="skip the testbed table")
    p.add_argument("--vision", action="store_true", help="also build every vision model on the bundled image and "
                   "check every kernel against its reference (the former demo)")
    p.add_argument("--model", action="append", metavar="NAME_OR_GLOB",
                   help="vision part: only these models (repeatable; shell globs such as 'nat_*'); implies --vision "
                        "and skips the kernel checks")
    p.add_argument("--image", default=str(DEMO_IMAGE), help="vision part: input image (default: the bundled demo.png)")
    p.add_argument("--skip-models", action="store_true", help="vision part (implies --vision): only the kernel checks")
    p.add_argument("--skip-kernels", action="store_true", help="vision part (implies --vision): only the models")
    p.set_defaults(func=cmd_demo)

    for name, (help_text, add_args, target) in _EXTRA_COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        _resolve(add_args)(p)
        p.set_defaults(func=lambda a, _t=target: _resolve(_t)(a))
    return parser


def _resolve(target: str) -> Callable:
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``attnzoo`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from attnzoo._logging import configure

    configure(args.verbose)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
