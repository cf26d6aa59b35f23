"""POPE and CHAIR runs end to end: plan (items + configuration, no model), execute (generate), score, write.

Planning is separate so that every input can be checked -- COCO files, splits, passes, an output folder
holding another configuration -- before a model is loaded::

    plan = plan_pope(questions, "coco/val2014", split="adversarial", model="llava-hf/llava-1.5-7b-hf")
    prepare_output("runs/pope_adversarial", plan.config)      # refuses a folder of another configuration
    result = execute(load("llava-hf/llava-1.5-7b-hf"), plan, "runs/pope_adversarial", batch_size=16)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .chair import Chair, chair_metrics
from .pope import PopeQuestion, parse_yes_no, pope_metrics
from .results import write_results
from .runner import describe_pass, distributed_context, items_fingerprint, pass_name, resolve_passes, run, throughput
from .tasks import TASKS, EvalItem, TaskSpec, chair_items, pope_items


@dataclass
class Plan:
    """What one run asks: its items (after ``limit``), its configuration and, for CHAIR, the ground truth."""

    task: str
    split: str
    items: list[EvalItem]
    config: dict[str, Any]
    gen_kwargs: dict[str, Any]
    mitigation: list[Any]
    ground_truth: dict[int, set[str]] = field(default_factory=dict)


def _config(task: str, split: str, model: str, spec: TaskSpec, gen_kwargs: Mapping[str, Any],
            passes: Sequence[Any], all_items: Sequence[EvalItem]) -> dict[str, Any]:
    # ``limit`` is not part of the configuration: a longer run over the same questions resumes a shorter one.
    return {"task": task, "split": split, "model": model, "mitigation": [describe_pass(p) for p in passes],
            "prompt": spec.prompt,
            "gen_kwargs": dict(gen_kwargs), "items": len(all_items), "items_sha256": items_fingerprint(all_items)}


def mitigation_label(mitigation: Sequence[Any]) -> str:
    """``"none"`` for the baseline, else the pass names joined by ``+``."""
    return "+".join(pass_name(p) for p in mitigation) or "none"


def plan_pope(questions: Sequence[PopeQuestion], image_dir: str | Path, *, split: str, model: str,
              mitigation: Sequence[Any] = (), gen_kwargs: Mapping[str, Any] | None = None, limit: int | None = None,
              spec: TaskSpec = TASKS["pope"]) -> Plan:
    """A POPE run over ``questions`` (images under ``image_dir``), the first ``limit`` of them if given.

    ``mitigation``: passes applied together, as registry names (the paper's defaults) or pass objects; their
    names and hyper-parameters become part of the configuration. Unknown names raise ``ValueError`` here,
    before any model is loaded.
    """
    passes = resolve_passes(mitigation)
    kwargs = {**spec.gen_kwargs, **(gen_kwargs or {})}
    items = pope_items(list(questions), image_dir, spec)
    config = _config("pope", split, model, spec, kwargs, passes, items)
    return Plan("pope", split, items[:limit], config, kwargs, passes)


def plan_chair(images: Sequence[tuple[int, str]], ground_truth: Mapping[int, set[str]], *, model: str,
               split: str = "val2014", mitigation: Sequence[Any] = (), gen_kwargs: Mapping[str, Any] | None = None,
               limit: int | None = None, spec: TaskSpec = TASKS["chair"]) -> Plan:
    """A CHAIR run describing ``images`` (``(image_id, path)``) scored against ``ground_truth`` (image_id ->
    categories, see :func:`attnzoo.eval.chair.coco_ground_truth`); ``mitigation`` as in :func:`plan_pope`."""
    passes = resolve_passes(mitigation)
    kwargs = {**spec.gen_kwargs, **(gen_kwargs or {})}
    items = chair_items(list(images), spec)
    config = _config("chair", split, model, spec, kwargs, passes, items)
    return Plan("chair", split, items[:limit], config, kwargs, passes, dict(ground_truth))


def score_records(plan: Plan, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Metrics of a finished run's answer records (POPE: :func:`pope_metrics`; CHAIR: :func:`chair_metrics`)."""
    if plan.task == "pope":
        return pope_metrics([parse_yes_no(r["answer"]) for r in records], [r["label"] for r in records])
    chair = Chair()
    scores = [chair.score_caption(int(r["image_id"]), r["answer"], plan.ground_truth[int(r["image_id"])])
              for r in records]
    return chair_metrics(scores)


def execute(lvlm: Any, plan: Plan, out_dir: str | Path, *, batch_size: int = 8, progress: bool = True,
            model_label: str | None = None) -> dict[str, Any]:
    """Run ``plan`` with ``lvlm`` in ``out_dir`` (resuming), score it, write ``results.json`` / ``results.md``.

    Returns the result dict ``{"task", "split", "model", "mitigation", "mitigation_label", "metrics",
    "questions_per_s", "out"}``; ``questions_per_s`` is items per second of ``generate`` time per process.
    """
    desc = f"{plan.task} {plan.split} ({mitigation_label(plan.mitigation)})"
    records = run(lvlm, plan.items, out_dir, plan.config, batch_size=batch_size, gen_kwargs=plan.gen_kwargs,
                  mitigation=plan.mitigation, progress=progress, desc=desc)
    result = {"task": plan.task, "split": plan.split, "model": model_label or plan.config["model"],
              "mitigation": plan.config["mitigation"], "mitigation_label": mitigation_label(plan.mitigation),
              "metrics": score_records(plan, records), "questions_per_s": throughput(records), "out": str(out_dir)}
    if distributed_context()[0] == 0:
        write_results([result], Path(out_dir) / "results.json", Path(out_dir) / "results.md")
    return result
