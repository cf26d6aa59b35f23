"""``attnzoo testbed scenes|train``: write synthetic co-occurrence scenes; train the testbed's tiny LLaVA.

    attnzoo testbed scenes --out DIR --split eval --num-images 500 --cooccurrence 0.25 [--seed 1]
    attnzoo testbed train  --out runs/testbed [--vision-steps 1200] [--steps 4000] [--resume] [--threads 1]

Evaluate a trained model with ``attnzoo eval pope --model runs/testbed/model --coco-root DIR --coco-split eval``.
Only light modules are imported at top level.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``scenes`` and ``train`` subcommands and their options to ``parser``."""
    from .scenes import EVAL_COOCCURRENCE
    from .testbed import TrainConfig

    sub = parser.add_subparsers(dest="testbed_cmd", metavar="COMMAND", required=True)
    scenes = sub.add_parser("scenes", help="write a synthetic COCO-format scene split")
    scenes.add_argument("--out", required=True, metavar="DIR", help="dataset folder (annotations/, <split>/)")
    scenes.add_argument("--split", default="eval", help="split name (default: eval)")
    scenes.add_argument("--num-images", type=int, default=500, help="scenes to write (default: 500)")
    scenes.add_argument("--seed", type=int, default=1, help="generator seed (default: 1; training uses 0)")
    scenes.add_argument("--cooccurrence", type=float, default=EVAL_COOCCURRENCE,
                        help=f"P(both members | a companion pair is drawn) (default: {EVAL_COOCCURRENCE})")
    scenes.add_argument("--image-size", type=int, default=64, help="image side in pixels (default: 64)")

    train = sub.add_parser("train", help="train (or resume) the testbed's tiny LLaVA on the scenes")
    train.add_argument("--out", required=True, metavar="DIR", help="run folder (checkpoint/, model/, logs)")
    train.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint")
    train.add_argument("--data", metavar="DIR", help="scene folder with a 'train' split (default: generate DIR/scenes)")
    train.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a shared, busy CPU)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        train.add_argument(flag, type=type(getattr(defaults, f.name)), default=None, dest=f"cfg_{f.name}",
                           metavar=f.name.upper(), help=f"(default: {getattr(defaults, f.name)})")


def run(args: argparse.Namespace) -> int:
    """Execute the parsed ``testbed`` command; returns the exit code."""
    if args.testbed_cmd == "scenes":
        from .scenes import generate_scenes

        root = generate_scenes(args.out, args.split, args.num_images, seed=args.seed, cooccurrence=args.cooccurrence,
                               image_size=args.image_size, progress=True)
        print(f"wrote {args.num_images} scenes to {root}/{args.split} "
              f"(annotations in {root}/annotations, cooccurrence={args.cooccurrence})")
        return 0
    import json
    from pathlib import Path

    import torch

    from .testbed import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    given: dict[str, Any] = {f.name: getattr(args, f"cfg_{f.name}") for f in fields(TrainConfig)
                             if getattr(args, f"cfg_{f.name}") is not None}
    stored = Path(args.out) / "train_config.json"
    config = None
    if args.resume and stored.is_file():
        base = json.loads(stored.read_text())
        config = TrainConfig.from_dict({**base, **given})
    elif given or not args.resume:
        config = TrainConfig.from_dict(given)
    result = train(args.out, config, resume=args.resume, data_root=args.data, progress=not args.no_progress)
    losses = result["losses"]
    tail = losses[-50:]
    print(f"step {result['step']} ({len(result['vision_losses'])} vision + {len(losses)} LLaVA steps); mean "
          f"answer-token loss of the last {len(tail)} steps: {sum(tail) / max(1, len(tail)):.4f}")
    if result["model_dir"] is not None:
        print(f"model: {result['model_dir']} (attnzoo.mllm.load({str(result['model_dir'])!r}))")
    return 0
