"""The ``attnzoo`` command line: one place for every subcommand.

    attnzoo info                 versions, device, kernel backends, registered models and passes
    attnzoo demo [--model PAT]   build every model, run it on the bundled image, check every kernel

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


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from attnzoo.vision import list_models

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
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


# ----------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``attnzoo`` command (subcommands info and demo, plus registered ones)."""
    parser = argparse.ArgumentParser(prog="attnzoo", description="attnzoo: attention kernels, vision zoo, LVLM "
                                     "hallucination mitigation")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: info logs, -vv: debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="versions, device, kernel backends, registered models and passes")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="build every model and run it on the bundled image; check every kernel")
    p.add_argument("--model", action="append", metavar="NAME_OR_GLOB",
                   help="only these models (repeatable; shell globs such as 'nat_*'); skips the kernel checks")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--image", default=str(DEMO_IMAGE), help="input image (default: the bundled demo.png)")
    p.add_argument("--skip-models", action="store_true", help="only run the kernel checks")
    p.add_argument("--skip-kernels", action="store_true", help="only run the models")
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
