"""CHAIR: caption hallucination of COCO objects (Rohrbach et al., 2018), as ``LisaAnne/Hallucination``.

A caption's COCO objects are found the way ``utils/chair.py`` does it: lower-case, tokenize, singularize
every token, merge the listed two-word names ("hot dog", "teddy bear", "baby giraffe" -> "giraffe",
"passenger jet" -> "jet", "toilet seat" -> "toilet"), drop "seat" when "toilet" is mentioned, keep the words
found in the synonym table (``data/synonyms.txt``, the official table; surrounding spaces normalised) and
map each to its COCO category. An image's ground truth is the union of its instance categories and the
objects named in its reference captions.

- ``CHAIR_s``: share of captions with at least one hallucinated object;
- ``CHAIR_i``: hallucinated object mentions / all object mentions (mentions counted with repeats, as there);
- ``recall``: ground-truth objects mentioned / ground-truth objects, summed over captions;
- ``mean_length``: mean number of whitespace-separated words per caption.

Two deliberate substitutions, because their data cannot be downloaded here: tokens come from a regular
expression instead of NLTK's ``word_tokenize``, and ``lemminflect`` (which ships its data) singularizes
nouns instead of ``pattern.en.singularize``. Both agree on the COCO vocabulary (knives -> knife,
people -> people, skis -> ski, glasses -> glass).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .coco import CocoDataset

SYNONYMS_PATH = Path(__file__).resolve().parent / "data" / "synonyms.txt"

# The official hard-coded rules (utils/chair.py): two-word names kept as one word, and qualifiers that
# would otherwise fire a false "person" (baby/adult animals, passenger vehicles).
DOUBLE_WORDS: tuple[str, ...] = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "stove top oven", "home plate",
)
ANIMAL_WORDS: tuple[str, ...] = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
                                 "giraffe", "animal", "cub")
VEHICLE_WORDS: tuple[str, ...] = ("jet", "train")

_TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def load_synonyms(path: str | Path = SYNONYMS_PATH) -> list[list[str]]:
    """The synonym table: one list per COCO category, the category name first."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        words = [w.strip() for w in line.split(",") if w.strip()]
        if words:
            rows.append(words)
    return rows


@lru_cache(maxsize=65536)
def singularize(word: str) -> str:
    """The singular of a (lower-case) noun with lemminflect: ``knives -> knife``; unknown words by rule."""
    from lemminflect import getLemma

    lemmas = getLemma(word, upos="NOUN")
    return lemmas[0] if lemmas else word


def double_word_map() -> dict[str, str]:
    """Two-word phrase -> the word it counts as (the official ``double_word_dict``)."""
    table = {w: w for w in DOUBLE_WORDS}
    for animal in ANIMAL_WORDS:
        table[f"baby {animal}"] = animal
        table[f"adult {animal}"] = animal
    for vehicle in VEHICLE_WORDS:
        table[f"passenger {vehicle}"] = vehicle
    table["bow tie"] = "tie"
    table["toilet seat"] = "toilet"
    table["wine glas"] = "wine glass"  # pattern.en singularizes "glass" to "glas"; kept for fidelity
    return table


@dataclass
class CaptionScore:
    """CHAIR of one caption: its object mentions as (word, category), the hallucinated ones, the ground truth."""

    image_id: int
    caption: str
    mentions: list[tuple[str, str]]
    hallucinated: list[tuple[str, str]]
    ground_truth: list[str] = field(default_factory=list)

    @property
    def covered(self) -> set[str]:
        """Ground-truth categories the caption mentions."""
        return {node for _, node in self.mentions if node in set(self.ground_truth)}


class Chair:
    """The CHAIR object extractor and scorer (synonym table + the official rules).

    Args:
        synonyms: rows of synonyms, category name first (default: the shipped official table).
    """

    def __init__(self, synonyms: Sequence[Sequence[str]] | None = None) -> None:
        rows = load_synonyms() if synonyms is None else [list(r) for r in synonyms]
        self.category_of: dict[str, str] = {}
        for row in rows:
            for word in row:
                self.category_of.setdefault(word, row[0])
        self.double_words = double_word_map()

    def caption_objects(self, caption: str) -> list[tuple[str, str]]:
        """The COCO object mentions of a caption, in order, as ``(word, category)`` pairs (repeats kept)."""
        words = [singularize(w) for w in _TOKEN.findall(caption.lower())]
        merged: list[str] = []
        i = 0
        while i < len(words):
            pair = " ".join(words[i:i + 2])
            if pair in self.double_words:
                merged.append(self.double_words[pair])
                i += 2
            else:
                merged.append(words[i])
                i += 1
        if "toilet" in merged and "seat" in merged:
            merged = [w for w in merged if w != "seat"]
        return [(w, self.category_of[w]) for w in merged if w in self.category_of]

    def ground_truth(self, categories: Iterable[str], reference_captions: Iterable[str] = ()) -> set[str]:
        """An image's ground-truth categories: its annotated ``categories`` plus the objects of its captions."""
        truth = {self.category_of.get(c, c) for c in categories}
        for cap in reference_captions:
            truth.update(node for _, node in self.caption_objects(cap))
        return truth

    def score_caption(self, image_id: int, caption: str, ground_truth: set[str]) -> CaptionScore:
        """Mentions and hallucinated mentions of one caption against its image's ground truth."""
        mentions = self.caption_objects(caption)
        hallucinated = [(w, node) for w, node in mentions if node not in ground_truth]
        return CaptionScore(image_id, caption, mentions, hallucinated, sorted(ground_truth))

    def score(self, captions: Sequence[tuple[int, str]],
              ground_truth: Mapping[int, set[str]]) -> tuple[dict[str, float | int], list[CaptionScore]]:
        """Score ``(image_id, caption)`` pairs; returns (:func:`chair_metrics`, the per-caption scores)."""
        missing = sorted({i for i, _ in captions} - set(ground_truth))
        if missing:
            raise ValueError(f"no ground truth for {len(missing)} image ids (e.g. {missing[:5]}); are the captions "
                             "for images of this COCO split?")
        per_caption = [self.score_caption(i, c, ground_truth[i]) for i, c in captions]
        return chair_metrics(per_caption), per_caption


def chair_metrics(scores: Sequence[CaptionScore]) -> dict[str, float | int]:
    """CHAIR_s, CHAIR_i, recall and mean caption length (words) over per-caption scores (fractions in [0, 1])."""
    if not scores:
        raise ValueError("no captions to score")
    n = len(scores)
    mentions = sum(len(s.mentions) for s in scores)
    hallucinated = sum(len(s.hallucinated) for s in scores)
    gt = sum(len(s.ground_truth) for s in scores)
    covered = sum(len(s.covered) for s in scores)
    return {
        "chair_s": sum(bool(s.hallucinated) for s in scores) / n,
        "chair_i": hallucinated / mentions if mentions else 0.0,
        "recall": covered / gt if gt else 0.0,
        "mean_length": sum(len(s.caption.split()) for s in scores) / n,
        "n": n, "mentions": mentions, "hallucinated_mentions": hallucinated,
    }


def coco_ground_truth(chair: Chair, dataset: CocoDataset, image_ids: Iterable[int]) -> dict[int, set[str]]:
    """Ground truth of ``image_ids`` from a :class:`~attnzoo.eval.coco.CocoDataset` loaded with captions."""
    return {i: chair.ground_truth(dataset.objects(i), dataset.reference_captions(i)) for i in image_ids}
