"""The evaluation tasks as data: prompts, generation settings and defaults of each protocol.

A task turns its ground truth into :class:`EvalItem` s (one prompt about one image each) that the runner
answers; the scoring functions of :mod:`attnzoo.eval.pope` and :mod:`attnzoo.eval.chair` then read the
answers. Keeping prompts and generation settings here, not in the runner, is what lmms-eval does with its
task YAML files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .pope import ANSWER_SUFFIX, SPLITS, PopeQuestion


@dataclass(frozen=True)
class TaskSpec:
    """Settings of one protocol.

    ``prompt`` is the user turn sent with the image (``{question}`` is filled per item); ``gen_kwargs`` go
    to ``LVLM.generate`` (greedy decoding as the papers report); ``num_images`` and ``seed`` choose the
    images when the question set is built here.
    """

    name: str
    prompt: str
    gen_kwargs: dict[str, Any] = field(default_factory=dict)
    num_images: int = 500
    seed: int = 0


TASKS: dict[str, TaskSpec] = {
    # LLaVA-1.5's POPE setting: the question plus the short-answer instruction, greedy, up to 128 tokens.
    "pope": TaskSpec("pope", "{question}" + ANSWER_SUFFIX, {"max_new_tokens": 128, "do_sample": False}),
    # The CHAIR setting of OPERA / VCD / VAR: 500 random val2014 images, a detailed description, 512 tokens.
    "chair": TaskSpec("chair", "Please describe this image in detail.", {"max_new_tokens": 512, "do_sample": False}),
}
POPE_SPLITS = SPLITS


@dataclass(frozen=True)
class EvalItem:
    """One prompt to answer: ``id`` is unique within a run, ``image`` a path, ``meta`` what scoring needs."""

    id: str
    image: str
    prompt: str
    meta: dict[str, Any] = field(default_factory=dict)


def pope_items(questions: list[PopeQuestion], image_dir: str | Path, spec: TaskSpec = TASKS["pope"]) -> list[EvalItem]:
    """Runner items for POPE questions; the image of each is ``image_dir / question.image``."""
    image_dir = Path(image_dir)
    return [EvalItem(str(q.question_id), str(image_dir / q.image), spec.prompt.format(question=q.text),
                     {"question_id": q.question_id, "image_id": q.image_id, "text": q.text, "label": q.label})
            for q in questions]


def chair_items(images: list[tuple[int, str]], spec: TaskSpec = TASKS["chair"]) -> list[EvalItem]:
    """Runner items for CHAIR from ``(image_id, image path)`` pairs: the same describe-prompt for each."""
    return [EvalItem(str(image_id), str(path), spec.prompt, {"image_id": image_id}) for image_id, path in images]
