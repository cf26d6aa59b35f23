"""``attnzoo eval pope|chair``: score answer files, or run a model (optionally sharded with torchrun).

    attnzoo eval pope  --score ANSWERS.jsonl --questions coco_pope_adversarial.json
    attnzoo eval chair --score CAPTIONS.jsonl --coco-root DIR
    attnzoo eval pope  --model llava-hf/llava-1.5-7b-hf --coco-root DIR [--split adversarial]
                       [--mitigation var --mitigation var,vhr] [--batch-size 8] [--out runs/eval] [--limit N]
    torchrun --nproc-per-node 4 -m attnzoo.cli eval pope --model ... --coco-root DIR

Every input is checked before a model is loaded. Only light modules are imported at top level.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

DEFAULT_OUT = "runs/eval"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``pope`` and ``chair`` subcommands and their options to ``parser``."""
    sub = parser.add_subparsers(dest="eval_task", metavar="TASK", required=True)
    pope = sub.add_parser("pope", help="POPE yes/no object probing (random / popular / adversarial)")
    chair = sub.add_parser("chair", help="CHAIR object hallucination in detailed captions")
    for p, task in ((pope, "pope"), (chair, "chair")):
        p.add_argument("--score", metavar="FILE", help="score this answer file (JSON Lines) instead of running a model"
                       + (": question_id and answer per line" if task == "pope" else ": image_id and caption per line"))
        p.add_argument("--model", metavar="HUB_ID_OR_PATH", help="the LVLM to evaluate (attnzoo.mllm.load)")
        p.add_argument("--coco-root", metavar="DIR", help="COCO folder with annotations/ and the image split folder")
        p.add_argument("--coco-split", default="val2014", help="COCO annotation/image split (default: val2014)")
        p.add_argument("--num-images", type=int, default=500, help="images to sample (default: 500)")
        p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
        p.add_argument("--mitigation", action="append", metavar="PASS[,PASS]",
                       help="passes applied together, e.g. 'var' or 'var,vhr'; repeat for several runs; "
                            "'none' is the baseline (default: baseline only)")
        p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default: 8)")
        p.add_argument("--max-new-tokens", type=int, default=None,
                       help=f"override the task's limit (default: {128 if task == 'pope' else 512})")
        p.add_argument("--limit", type=int, default=None, help="only the first N items (smoke runs)")
        p.add_argument("--out", default=None, help=f"output folder (default: {DEFAULT_OUT}; when scoring: next to "
                       "the answer file)")
        p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK when available)")
        p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                       help="model dtype (default: the loader's)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    chair.add_argument("--clip-model", metavar="ARCH", default=None,
                       help="also report a CLIP image-caption score with this open_clip architecture (e.g. ViT-B-32)")
    chair.add_argument("--clip-pretrained", metavar="TAG_OR_FILE", default="openai",
                       help="open_clip pretrained tag (needs network once) or local checkpoint (default: openai)")
    pope.add_argument("--split", default=None,
                      help="comma-separated POPE splits: random, popular, adversarial (default: all three)")
    pope.add_argument("--questions", metavar="FILE",
                      help="an official question file (coco_pope_<split>.json) instead of building the questions")


class UsageError(Exception):
    """A bad command line or input; reported as one line, exit code 2."""


def _fail(task: str, message: str) -> int:
    print(f"attnzoo eval {task}: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Entry point of ``attnzoo eval``; returns the exit code."""
    task = args.eval_task
    try:
        args.clip_scorer = _clip_scorer(args)  # before any LVLM loads: an offline refusal comes first
        if args.score:
            return _score(args)
        plans = _plans(args)
    except (UsageError, ValueError, FileNotFoundError, RuntimeError) as e:
        return _fail(task, str(e))
    return _execute(args, plans)


def _clip_scorer(args: argparse.Namespace) -> Any:
    if getattr(args, "clip_model", None) is None:
        return None
    from .clip_score import CLIPScorer

    return CLIPScorer(args.clip_model, args.clip_pretrained, device=args.device)


def _add_clip_score(args: argparse.Namespace, metrics: dict[str, Any], pairs: list[tuple[str, str]]) -> None:
    """Add ``clip_score`` (mean CLIPScore of the captions) to CHAIR ``metrics`` when --clip-model was given."""
    if args.clip_scorer is None:
        return
    from .clip_score import mean_clip_score

    metrics["clip_score"] = round(mean_clip_score(args.clip_scorer, pairs), 4)
    metrics["clip_model"] = args.clip_scorer.name


# ---------------------------------------------------------------------------------------- scoring


def _split_label(path: Path) -> str:
    m = re.search(r"pope_(random|popular|adversarial)", path.name)
    return m.group(1) if m else path.stem


def _score_paths(args: argparse.Namespace, answers: Path) -> tuple[Path, Path]:
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        return out / "results.json", out / "results.md"
    return answers.with_name(answers.stem + ".results.json"), answers.with_name(answers.stem + ".results.md")


def _score(args: argparse.Namespace) -> int:
    from .pope import read_jsonl
    from .results import write_results

    answers_path = Path(args.score)
    if not answers_path.is_file():
        raise UsageError(f"answer file {answers_path} not found")
    if args.model:
        raise UsageError("--score and --model exclude each other: score a file or run a model")
    records = read_jsonl(answers_path)
    if not records:
        raise UsageError(f"{answers_path} holds no answers")
    if args.eval_task == "pope":
        from .pope import read_questions, score_answers

        if not args.questions:
            raise UsageError("--score needs --questions FILE (the question file with the labels)")
        qpath = Path(args.questions)
        if not qpath.is_file():
            raise UsageError(f"question file {qpath} not found")
        metrics = score_answers(records, read_questions(qpath))
        result = {"task": "pope", "split": _split_label(qpath), "metrics": metrics, "answers": str(answers_path)}
    else:
        metrics = _score_chair(args, records, answers_path)
        result = {"task": "chair", "split": args.coco_split, "metrics": metrics, "answers": str(answers_path)}
    json_path, md_path = _score_paths(args, answers_path)
    print(write_results([result], json_path, md_path))
    print(f"\nwritten: {json_path}, {md_path}")
    return 0


def _score_chair(args: argparse.Namespace, records: list[dict], path: Path) -> dict[str, Any]:
    from .chair import Chair, coco_ground_truth
    from .coco import CocoDataset, check_coco_root

    if not args.coco_root:
        raise UsageError("CHAIR scoring needs --coco-root DIR (instance and caption annotations)")
    check_coco_root(args.coco_root, args.coco_split, captions=True, images=False)
    captions = []
    for n, rec in enumerate(records, 1):
        text = rec.get("caption", rec.get("answer", rec.get("text")))
        if "image_id" not in rec or text is None:
            raise UsageError(f"{path}: record {n} needs image_id and caption (or answer, or text)")
        captions.append((int(rec["image_id"]), str(text)))
    dataset = CocoDataset(args.coco_root, args.coco_split, captions=True)
    chair = Chair()
    metrics, _ = chair.score(captions, coco_ground_truth(chair, dataset, {i for i, _ in captions}))
    if args.clip_scorer is not None:
        check_coco_root(args.coco_root, args.coco_split, captions=True, images=True)
        _add_clip_score(args, metrics, [(str(dataset.image_path(i)), text) for i, text in captions])
    return metrics


# ----------------------------------------------------------------------------------------- model


def _mitigations(args: argparse.Namespace) -> list[list[str]]:
    configs = []
    for value in args.mitigation or ["none"]:
        names = [n.strip() for n in value.split(",") if n.strip() and n.strip() != "none"]
        if names not in configs:
            configs.append(names)
    return configs


def _pope_questions(args: argparse.Namespace) -> dict[str, list]:
    from .pope import SPLITS, build_questions, read_questions, sample_images

    if args.questions:
        qpath = Path(args.questions)
        if not qpath.is_file():
            raise UsageError(f"question file {qpath} not found")
        if args.split:
            raise UsageError("--questions fixes the split; leave out --split")
        return {_split_label(qpath): read_questions(qpath)}
    splits = [s.strip() for s in (args.split or ",".join(SPLITS)).split(",") if s.strip()]
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise UsageError(f"unknown POPE split {', '.join(map(repr, bad))}; valid splits: {', '.join(SPLITS)}")
    from .coco import CocoDataset

    dataset = CocoDataset(args.coco_root, args.coco_split)
    images = sample_images(dataset.image_objects(), args.num_images, 3, args.seed)
    ids = dataset.file_to_id()
    return {s: build_questions(images, s, 3, args.seed, image_ids=ids) for s in splits}


def _check_images(paths: set[str]) -> None:
    missing = sorted(p for p in paths if not os.path.isfile(p))
    if missing:
        raise UsageError(f"{len(missing)} of {len(paths)} image files are missing, e.g. {missing[0]}; is --coco-root "
                         "/ --coco-split the folder the annotations describe?")


def _plans(args: argparse.Namespace) -> list[tuple[Any, Path]]:
    from .coco import check_coco_root
    from .evaluate import mitigation_label, plan_chair, plan_pope
    from .runner import check_passes, prepare_output

    task = args.eval_task
    if not args.model:
        raise UsageError("give --model HUB_ID_OR_PATH to run a model, or --score FILE to score answers")
    if not args.coco_root:
        raise UsageError("--coco-root DIR is required (COCO annotations and images)")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    mitigations = _mitigations(args)
    for names in mitigations:
        check_passes(names)
    check_coco_root(args.coco_root, args.coco_split, captions=task == "chair")
    image_dir = Path(args.coco_root) / args.coco_split
    gen = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    out_root = Path(args.out or DEFAULT_OUT)
    plans = []
    if task == "pope":
        for split, questions in _pope_questions(args).items():
            for names in mitigations:
                plan = plan_pope(questions, image_dir, split=split, model=args.model, mitigation=names,
                                 gen_kwargs=gen, limit=args.limit)
                plans.append((plan, out_root / f"pope_{split}_{mitigation_label(names)}"))
    else:
        from .chair import Chair, coco_ground_truth
        from .coco import CocoDataset

        dataset = CocoDataset(args.coco_root, args.coco_split, captions=True)
        ids = dataset.sample_image_ids(args.num_images, args.seed)
        truth = coco_ground_truth(Chair(), dataset, ids[:args.limit])
        images = [(i, str(dataset.image_path(i))) for i in ids]
        for names in mitigations:
            plan = plan_chair(images, truth, model=args.model, split=args.coco_split, mitigation=names,
                              gen_kwargs=gen, limit=args.limit)
            plans.append((plan, out_root / f"chair_{args.coco_split}_{mitigation_label(names)}"))
    _check_images({it.image for plan, _ in plans for it in plan.items})
    for plan, out in plans:
        prepare_output(out, plan.config)
    return plans


def _execute(args: argparse.Namespace, plans: list[tuple[Any, Path]]) -> int:
    from .evaluate import execute
    from .results import write_results
    from .runner import distributed_context, finish_distributed

    rank, _ = distributed_context()
    lvlm = _load_model(args)
    results = [execute(lvlm, plan, out, batch_size=args.batch_size, progress=not args.no_progress,
                       model_label=args.model) for plan, out in plans]
    if args.eval_task == "chair" and args.clip_scorer is not None and rank == 0:
        from .pope import read_jsonl
        from .results import write_results as write_one
        from .runner import MERGED_FILE

        for result, (plan, out) in zip(results, plans):
            image_of = {it.id: it.image for it in plan.items}
            _add_clip_score(args, result["metrics"], [(image_of[r["id"]], r["answer"])
                                                      for r in read_jsonl(Path(out) / MERGED_FILE)])
            write_one([result], Path(out) / "results.json", Path(out) / "results.md")
    if rank == 0:
        out_root = Path(args.out or DEFAULT_OUT)
        table = write_results(results, out_root / f"{args.eval_task}_results.json",
                              out_root / f"{args.eval_task}_results.md")
        print(table)
        print(f"\nwritten: {out_root / (args.eval_task + '_results.json')} (and .md); answers in "
              f"{', '.join(str(out) for _, out in plans)}")
    finish_distributed()
    return 0


def _load_model(args: argparse.Namespace) -> Any:
    import torch

    from attnzoo.mllm import load

    device = args.device
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    kwargs: dict[str, Any] = {"device": device}
    if args.dtype:
        kwargs["dtype"] = getattr(torch, args.dtype)
    return load(args.model, **kwargs)
