"""LQCD: Leading Query Contrastive Decoding (Zhao et al., "Towards Analyzing and Mitigating Sycophancy in Large
Vision-Language Models", arXiv 2408.11261 v1; no official code).

The same image is asked twice in one batched forward: with the neutral query and with the leading query the
user wrote. Tokens the leading cue makes likely are suppressed::

    p(y) = softmax[(1 + alpha) logit(y | neutral, image) - alpha logit(y | leading, image)]

restricted, as in VCD, to the tokens with ``p(y | neutral) >= beta * max p(. | neutral)``.

The neutral query is given by the caller (``generate(..., neutral_prompts=[...])`` or ``neutralizer=``) or
produced by :func:`neutralize_query`, a documented rule-based rewrite of the common leading forms. A prompt the
rules leave unchanged is contrasted with itself, which is plain decoding.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from .base import check_range, register_pass
from .contrastive import ContrastiveDecoding, plausibility_cutoff

_BE = r"(?P<be>is|are)"
# Each rule: (pattern on one line of the prompt, replacement). Applied in order, first match wins per line.
NEUTRALIZER_RULES: tuple[tuple[str, str], ...] = (
    # "There is a dog in the image, isn't there?" -> "Is there a dog in the image?"
    (rf"^there {_BE} (?P<rest>.+?),?\s+(isn't|aren't|is not|are not) there\s*\?", "{Be} there {rest}?"),
    # "There isn't a dog in the image, is there?" -> "Is there a dog in the image?"
    (r"^there (?P<be>is|are)(n't| not) (?P<rest>.+?),?\s+(is|are) there\s*\?", "{Be} there {rest}?"),
    # "Isn't there a dog in the image?" -> "Is there a dog in the image?"
    (r"^(?P<be>is|are)(n't| not) there (?P<rest>.+?)\s*\?", "{Be} there {rest}?"),
    # "Don't you think there is a dog in the image?" / "I think there is a dog in the image." -> "Is there ...?"
    (rf"^(don't you think|do you agree|would you agree|wouldn't you agree|i think|i believe|i'm sure|i am sure|"
     rf"surely|obviously|clearly)( that)? there {_BE} (?P<rest>.+?)\s*[?.!]", "{Be} there {rest}?"),
)
# A trailing suggestion after the question: "Is there a dog in the image? It seems like there isn't."
SUGGESTION = re.compile(
    r"(?<=\?)\s+(it (seems|looks)( like| as if)?|i (think|believe|guess|suppose)|i'm (sure|certain)|"
    r"i am (sure|certain)|i don't think|surely|obviously|clearly|right\s*\?|correct\s*\?|don't you think)\b.*$",
    re.IGNORECASE)


def neutralize_query(prompt: str) -> str:
    """The neutral form of a leading yes/no query, by rule (each line of ``prompt`` on its own):

    - tag questions: "There is a X ..., isn't there?" and "There isn't a X ..., is there?" -> "Is there a X ...?";
    - negated questions: "Isn't there a X ...?" -> "Is there a X ...?";
    - opinion prefixes: "Don't you think / I think / Surely (that) there is a X ..." -> "Is there a X ...?";
    - trailing suggestions after the question mark ("It seems like there isn't.", "I think so.", "Right?")
      are dropped.

    Lines matching no rule (e.g. POPE's "Answer the question using a single word or phrase.") are unchanged.
    """
    lines = []
    for line in prompt.split("\n"):
        stripped = line.strip()
        for pattern, template in NEUTRALIZER_RULES:
            m = re.match(pattern, stripped, flags=re.IGNORECASE)
            if m:
                be = m.group("be").lower()
                tail = stripped[m.end():]
                stripped = template.format(Be=be.capitalize(), rest=m.group("rest")) + tail
                break
        stripped = SUGGESTION.sub("", stripped)
        lines.append(stripped if stripped != line.strip() else line)
    return "\n".join(lines)


@register_pass
@dataclasses.dataclass
class LQCD(ContrastiveDecoding):
    """Leading Query Contrastive Decoding.

    Attributes:
        alpha: contrast strength (1.0).
        beta: plausibility cut-off on the neutral branch, keep ``p >= beta * max p`` (0.1).
        neutralizer: ``prompt -> neutral prompt``; None uses :func:`neutralize_query`. Per call,
            ``generate(..., neutral_prompts=[...])`` overrides both.
        do_sample: True / False forces sampling / greedy; None (default) follows ``generate(do_sample=...)``.

    Neither the paper text reachable here (arXiv 2408.11261 v1 abstract and introduction; the v2 / Neurocomputing
    version replaces LQCD by a different framework) nor any code states LQCD's alpha / beta, and the paper has no
    official code (searched again 2026-11-24: paper pages, code and issue corpora). The defaults are therefore
    VCD's (alpha 1, beta 0.1), whose contrast and cut-off LQCD adopts.
    """

    name: ClassVar[str] = "lqcd"
    summary: ClassVar[str] = "contrast the neutral query's logits with the leading query's"
    extra_kwargs: ClassVar[tuple[str, ...]] = ("neutral_prompts",)

    alpha: float = 1.0
    beta: float = 0.1
    neutralizer: Callable[[str], str] | None = None
    do_sample: bool | None = None

    def validate(self) -> None:
        check_range("alpha", self.alpha, 0.0, None)
        check_range("beta", self.beta, 0.0, 1.0, low_open=True)
        if self.neutralizer is not None and not callable(self.neutralizer):
            raise ValueError(f"neutralizer must be a callable str -> str or None, got {type(self.neutralizer)}")

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        fn = self.neutralizer
        cfg["neutralizer"] = "neutralize_query" if fn is None else getattr(fn, "__qualname__", repr(fn))
        return cfg

    def plan(self, ctx: Any) -> None:
        return None  # decoding only: no attention is touched

    def branch_prompts(self, lvlm: Any, batch: Any, extra: dict[str, Any]) -> list[list[str]]:
        leading = list(batch.layout.prompts)
        neutral = extra.get("neutral_prompts")
        if neutral is None:
            fn = self.neutralizer or neutralize_query
            neutral = [fn(p) for p in leading]
        neutral = list(neutral)
        if len(neutral) != len(leading) or not all(isinstance(p, str) for p in neutral):
            raise ValueError(f"neutral_prompts must be {len(leading)} strings (one per prompt), got {neutral!r:.80}")
        return [neutral, leading]

    def contrast(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        neutral, leading = logits
        return plausibility_cutoff(neutral, (1 + self.alpha) * neutral - self.alpha * leading, self.beta)
