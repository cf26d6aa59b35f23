"""Training-free hallucination-mitigation passes for the LVLMs wrapped by :mod:`attnzoo.mllm`.

Each pass is a dataclass of the paper's hyper-parameters (defaults = the paper's) with ``apply(lvlm)``
returning a handle that is a context manager::

    import attnzoo.mitigation as mitigation
    lvlm = attnzoo.mllm.load("llava-hf/llava-1.5-7b-hf")
    with mitigation.get("var").apply(lvlm):          # or mitigation.VAR(p=0.6).apply(lvlm)
        answers = lvlm.generate(images, prompts)

Registry: :func:`available` lists the names, :func:`get` builds a pass by name. Passes so far:
``var`` (:class:`VAR`), ``cca`` (:class:`CCA`), ``vhr`` (:class:`VHR`), and the decoding-level ``causalmm``
(:class:`CausalMM`) and ``lqcd`` (:class:`LQCD`), which run their contrast in one batched forward
(:mod:`.contrastive`). See docs/mitigation.md.
"""

from __future__ import annotations

from .base import Pass, available, check_range, get, register_pass
from .causalmm import CausalMM, language_counterfactual, vision_counterfactual
from .cca import CCA, concentric_rings
from .contrastive import ContrastiveDecoding, contrastive_generate, plausibility_cutoff
from .lqcd import LQCD, neutralize_query
from .var import VAR, find_sink_dims, known_sink_dims
from .vhr import VHR

__all__ = ["CCA", "LQCD", "VAR", "VHR", "CausalMM", "ContrastiveDecoding", "Pass", "available", "check_range",
           "concentric_rings", "contrastive_generate", "find_sink_dims", "get", "known_sink_dims",
           "language_counterfactual", "neutralize_query", "plausibility_cutoff", "register_pass",
           "vision_counterfactual"]
