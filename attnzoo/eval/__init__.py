"""POPE and CHAIR evaluation of LVLMs, with the official protocols, and the runner behind ``attnzoo eval``.

- :mod:`~attnzoo.eval.pope`: build POPE question sets from COCO objects (random / popular / adversarial
  negative sampling, 500 images x (3 yes + 3 no) by default, seeded) or read the official files; parse yes/no
  answers as the official script; accuracy, precision, recall, F1, yes-ratio.
- :mod:`~attnzoo.eval.chair`: CHAIR_s, CHAIR_i, object recall and caption length, with the official synonym
  table (``data/synonyms.txt``) and an offline lemmatizer (lemminflect).
- :mod:`~attnzoo.eval.coco`: COCO annotations (pycocotools) and image files from a local folder.
- :mod:`~attnzoo.eval.runner`: batched generation with an ``attnzoo.mllm`` LVLM under optional mitigation
  passes; one fsync'd JSONL line per answer, resume after a crash, sharding under torchrun / accelerate.
- :mod:`~attnzoo.eval.evaluate`: plan (no model) -> execute -> score -> ``results.json`` + markdown table.

Example (scoring answers produced anywhere)::

    from attnzoo.eval import read_questions, read_jsonl, score_answers
    metrics = score_answers(read_jsonl("answers.jsonl"), read_questions("coco_pope_adversarial.json"))

Importing this package is light: pycocotools, lemminflect, PIL, tqdm and torch are imported by the
functions that use them.
"""

from __future__ import annotations

from .chair import CaptionScore, Chair, chair_metrics, coco_ground_truth, load_synonyms
from .coco import CocoDataset, check_coco_root
from .evaluate import Plan, execute, plan_chair, plan_pope, score_records
from .pope import (
    SPLITS,
    PopeQuestion,
    build_all_splits,
    build_questions,
    parse_yes_no,
    pope_metrics,
    read_jsonl,
    read_questions,
    sample_images,
    score_answers,
    write_questions,
)
from .results import markdown_table, results_table, write_results
from .runner import available_passes, check_passes, merge, prepare_output, read_records, run
from .tasks import TASKS, EvalItem, TaskSpec, chair_items, pope_items

__all__ = [
    "SPLITS", "TASKS", "CaptionScore", "Chair", "CocoDataset", "EvalItem", "Plan", "PopeQuestion", "TaskSpec",
    "available_passes", "build_all_splits", "build_questions", "chair_items", "chair_metrics", "check_coco_root",
    "check_passes", "coco_ground_truth", "execute", "load_synonyms", "markdown_table", "merge", "parse_yes_no",
    "plan_chair", "plan_pope", "pope_items", "pope_metrics", "prepare_output", "read_jsonl", "read_questions",
    "read_records", "results_table", "run", "sample_images", "score_answers", "score_records", "write_questions",
    "write_results",
]
