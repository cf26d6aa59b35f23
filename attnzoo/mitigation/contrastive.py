"""The shared generation loop of the contrastive decoding passes (CausalMM, LQCD).

A contrastive pass scores every next token with ``k`` branches of the same model -- the positive one (the
real image and prompt) and one or two counterfactuals (an edited attention map, a leading query) -- and decodes
from a contrast of their logits with a VCD-style plausibility cut-off on the positive branch::

    l' = contrast(l_0, l_1, ...),   l'[v] = -inf where l_0[v] < log(eps) + max(l_0)

Batched (the default): the ``k`` branches are rendered as one left-padded batch of ``k * B`` rows (branch-major:
rows ``j*B .. (j+1)*B-1`` are branch ``j``) and run by ``model.generate`` in ONE forward per step; every row has
its own rows of the KV cache. A :class:`~transformers.LogitsProcessor` placed last takes the ``(k*B, V)`` logits,
contrasts the branches, picks the token (greedy, or multinomial sampling after temperature / top-k / top-p) and
returns scores that force that token in all ``k`` rows of the sample, so greedy selection inside ``generate``
appends the same token to every branch and transformers keeps its own EOS, padding and stopping handling.

Sequential (``batched=False``, for tests and benchmarks): the positive branch runs in ``generate`` and each
counterfactual branch in a separate forward with its own cache, one per step -- the naive implementation the
batched one must match token for token (LLaVA families only: Qwen2-VL keeps M-RoPE state on the model).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .._logging import get_logger
from .base import Pass

logger = get_logger("attnzoo.mitigation")

# generate() keyword arguments the loop implements itself (the rest go to transformers' generate unchanged)
_SAMPLING_KWARGS = ("temperature", "top_k", "top_p")
_REFUSED_KWARGS = {
    "num_beams": "beam search", "num_return_sequences": "several sequences per prompt",
    "return_dict_in_generate": "generate outputs (the loop returns token ids)", "output_scores": "scores",
    "output_logits": "logits (use contrastive_generate(..., return_logits=True))",
}


def plausibility_cutoff(positive: torch.Tensor, contrasted: torch.Tensor, eps: float) -> torch.Tensor:
    """VCD's adaptive plausibility constraint: ``contrasted`` with ``-inf`` wherever ``positive < log(eps) + max``.

    ``positive``, ``contrasted``: ``(B, V)`` float logits; ``eps`` in (0, 1]. Keeps exactly the tokens whose
    positive-branch probability is at least ``eps`` times the most likely token's. Tokens the positive branch
    already excludes (``-inf``, e.g. by ``min_new_tokens``) stay excluded.
    """
    cutoff = math.log(eps) + positive.max(dim=-1, keepdim=True).values
    return contrasted.masked_fill((positive < cutoff) | ~torch.isfinite(positive), float("-inf"))


@dataclasses.dataclass
class ContrastiveDecoding(Pass):
    """Base of the decoding-level passes: owns ``LVLM.generate`` while attached (see :meth:`generate_ids`).

    Subclasses define ``branch_prompts`` (the prompts of each branch), ``contrast`` (the paper's formula plus the
    cut-off) and, when a branch differs by more than its prompt, attention hooks keyed on :attr:`row_branch`.
    """

    extra_kwargs: ClassVar[tuple[str, ...]] = ()  # generate() keywords the pass consumes itself

    def __post_init__(self) -> None:
        self.rows: BranchRows | None = None  # the branch of each row of the running forward
        super().__post_init__()

    # ------------------------------------------------------------------ to implement

    def branch_prompts(self, lvlm: Any, batch: Any, extra: dict[str, Any]) -> list[list[str]]:
        """The user prompts of each branch, ``k`` lists of ``B`` strings; branch 0 is the positive one."""
        raise NotImplementedError(f"{type(self).__name__} (a ContrastiveDecoding pass) must define branch_prompts()")

    def contrast(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(B, V)`` contrasted logits (cut-off applied) from the ``k`` branches' ``(B, V)`` float32 logits."""
        raise NotImplementedError(f"{type(self).__name__} (a ContrastiveDecoding pass) must define contrast()")

    def sampling(self) -> bool | None:
        """True / False to force sampling / greedy decoding; None follows ``generate(do_sample=...)``."""
        return getattr(self, "do_sample", None)

    def start(self, lvlm: Any) -> None:
        """Called once at the start of each generation (reset per-generation state, seed generators)."""

    def begin(self, rows: BranchRows | None) -> None:
        """Set the branch of each row of the forwards that follow (None: no contrastive forward running)."""
        self.rows = rows

    @property
    def row_branch(self) -> torch.Tensor | None:
        """``(rows,)`` long: the branch of each row of the running forward (None when none is running)."""
        return None if self.rows is None else self.rows.tensor

    def branch_span(self, branch: int) -> slice | None:
        """The rows of ``branch`` in the running forward as a slice (host side: no device sync), or None."""
        return None if self.rows is None else self.rows.spans.get(branch)

    # ------------------------------------------------------------------ attach / generate

    def on_attach(self, lvlm: Any) -> None:
        others = [type(p).__name__ for p in lvlm.passes if callable(getattr(p, "generate_ids", None))]
        if others:
            raise ValueError(f"{type(self).__name__} and {others[0]} both replace the decoding loop with their own "
                             "contrast; a contrast of contrasts is defined by neither paper -- apply one of them")

    def generate_ids(self, lvlm: Any, batch: Any, **gen_kwargs: Any) -> torch.Tensor:
        """``LVLM.generate_ids`` while the pass is attached: new tokens ``(B, T)`` from the batched loop."""
        return contrastive_generate(lvlm, batch, self, **gen_kwargs)


@dataclasses.dataclass(frozen=True)
class BranchRows:
    """The branch of each row of a contrastive forward, on the device and on the host.

    Attributes:
        tensor: ``(rows,)`` long, the branch of each row (for boolean indexing of per-row tensors).
        spans: branch -> the slice of its rows (rows of a branch are contiguous: branch-major batches), so that
            per-layer hooks select them without a device sync.
    """

    tensor: torch.Tensor
    spans: dict[int, slice]

    @classmethod
    def build(cls, branches: Sequence[int], per_branch: int, device: torch.device) -> BranchRows:
        """Rows of ``branches`` (branch ids in row order), ``per_branch`` consecutive rows each."""
        spans = {j: slice(i * per_branch, (i + 1) * per_branch) for i, j in enumerate(branches)}
        tensor = torch.tensor(list(branches), dtype=torch.long).repeat_interleave(per_branch).to(device)
        return cls(tensor, spans)


class _Selector:
    """The last logits processor of ``generate``: contrast the branches, choose a token, force it in every branch."""

    def __init__(self, decoder: ContrastiveDecoding, batch_size: int, branches: int, do_sample: bool,
                 warpers: Any, generator: torch.Generator | None, record: list[torch.Tensor] | None,
                 counterfactual: Any = None) -> None:
        self.decoder, self.B, self.k = decoder, batch_size, branches
        self.do_sample, self.warpers, self.generator = do_sample, warpers, generator
        self.record = record
        self.counterfactual = counterfactual  # sequential mode: callable(input_ids) -> list of (B, V) logits

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        B = self.B
        if self.counterfactual is None:  # batched: rows are branch-major
            branches = [scores[j * B:(j + 1) * B].float() for j in range(self.k)]
        else:
            branches = [scores.float(), *self.counterfactual(input_ids)]
        logits = self.decoder.contrast(branches)
        if self.record is not None:
            self.record.append(logits.detach().clone())
        if self.do_sample:
            logits = self.warpers(input_ids[:B], logits)
            tokens = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=self.generator).squeeze(1)
        else:
            tokens = logits.argmax(dim=-1)
        rows = scores.shape[0] // B
        forced = torch.full_like(scores, float("-inf"))
        forced.scatter_(1, tokens.repeat(rows)[:, None], 0.0)
        return forced


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


class _Stream:
    """One counterfactual branch run by hand with its own KV cache (the sequential reference implementation)."""

    def __init__(self, lvlm: Any, batch: Any, decoder: ContrastiveDecoding, branch: int) -> None:
        self.lvlm, self.batch, self.decoder = lvlm, batch, decoder
        self.rows = BranchRows.build([branch], batch.layout.batch_size, lvlm.device)
        self.cache: Any = None
        self.mask = batch.inputs["attention_mask"]

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Feed the newest token (nothing at the first step) and return the next-token logits ``(B, V)``."""
        previous = self.decoder.rows
        self.decoder.begin(self.rows)
        try:
            with self.lvlm.use_layout(self.batch.layout):
                if self.cache is None:
                    kwargs = dict(self.batch.inputs)
                    out = self.lvlm.model(**kwargs, position_ids=_position_ids(self.mask), use_cache=True)
                else:
                    self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=-1)
                    out = self.lvlm.model(input_ids=input_ids[:, -1:], attention_mask=self.mask,
                                          position_ids=_position_ids(self.mask)[:, -1:], past_key_values=self.cache,
                                          use_cache=True)
        finally:
            self.decoder.begin(previous)
        self.cache = out.past_key_values
        return out.logits[:, -1].float()


def _warpers(temperature: float | None, top_k: int | None, top_p: float | None) -> Any:
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None and top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


_TILED_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_sizes")


def branch_batch(lvlm: Any, batch: Any, prompts: Sequence[Sequence[str]]) -> Any:
    """The ``k * B``-row batch of the branches (branch-major), as ``lvlm.prepare(images * k, prompts...)`` builds it.

    When every branch asks the batch's own prompts (CausalMM: the branches differ inside the model) on a LLaVA
    family, the batch's processed inputs and layout are tiled ``k`` times instead: the same tensors without
    running the image processor and tokenizer on ``k * B`` samples again (tested equal to ``prepare``)."""
    k = len(prompts)
    own = list(batch.layout.prompts)
    if lvlm.family in ("llava", "llava_next") and all(list(p) == own for p in prompts) \
            and set(batch.inputs.keys()) <= set(_TILED_INPUTS):
        B = batch.layout.batch_size
        inputs = {key: torch.cat([value] * k) for key, value in batch.inputs.items()}
        layout = batch.layout.select(list(range(B)) * k)
        if batch.layout.vision_rows is not None:
            layout.vision_rows = torch.cat([batch.layout.vision_rows + j * B for j in range(k)])
        return dataclasses.replace(batch, inputs=inputs, layout=layout, images=tuple(batch.images) * k)
    return lvlm.prepare(list(batch.images) * k, [p for branch in prompts for p in branch], system=batch.system)


def check_composition(lvlm: Any, decoder: ContrastiveDecoding) -> None:
    """Raise ValueError when the attached passes cannot run under ``decoder`` (checked before generating)."""
    decoders = [p for p in lvlm.passes if callable(getattr(p, "generate_ids", None))]
    if len(decoders) > 1:
        raise ValueError(f"passes {[type(p).__name__ for p in decoders]} each own the decoding loop; attach only one")
    check = getattr(decoder, "check_passes", None)
    if check is not None:
        check(lvlm)


@torch.no_grad()
def contrastive_generate(lvlm: Any, batch: Any, decoder: ContrastiveDecoding, batched: bool = True,
                         return_logits: bool = False, **gen_kwargs: Any) -> Any:
    """Generate with ``decoder``'s contrast; returns the new tokens ``(B, T)`` (pad after EOS).

    Args:
        lvlm: an :class:`attnzoo.mllm.LVLM`; other attached (attention) passes act on every branch.
        batch: from ``lvlm.prepare`` (its ``images`` and ``system`` are re-rendered for the branches).
        decoder: the contrastive pass (attached or not: its attention hooks act only when attached).
        batched: one ``k*B``-row forward per step (default) or the sequential reference (separate forwards).
        return_logits: also return the contrasted logits of each step, a list of ``(B, V)`` float32 tensors.
        gen_kwargs: ``max_new_tokens``, ``min_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
            ``eos_token_id``, ``pad_token_id``, ``generator`` (a ``torch.Generator`` for sampling), the pass's own
            keywords (LQCD: ``neutral_prompts``) and any other ``generate`` option that acts per row.
    """
    gen_kwargs = dict(gen_kwargs)
    for key, what in _REFUSED_KWARGS.items():
        value = gen_kwargs.pop(key, None)
        if value not in (None, False, 1):
            raise ValueError(f"{type(decoder).__name__} decoding does not support {key}={value!r} ({what}); "
                             "leave it out")
    extra = {k: gen_kwargs.pop(k) for k in decoder.extra_kwargs if k in gen_kwargs}
    generator = gen_kwargs.pop("generator", None)
    sampling = {k: gen_kwargs.pop(k, None) for k in _SAMPLING_KWARGS}
    do_sample = bool(gen_kwargs.pop("do_sample", False))
    forced = decoder.sampling()
    do_sample = do_sample if forced is None else bool(forced)
    gen_kwargs.setdefault("max_new_tokens", 32)
    gen_kwargs.setdefault("pad_token_id", lvlm.tokenizer.pad_token_id)
    if batch.images is None:
        raise ValueError("the batch records no images; build it with lvlm.prepare(images, prompts)")
    check_composition(lvlm, decoder)

    prompts = decoder.branch_prompts(lvlm, batch, extra)
    k, B = len(prompts), len(prompts[0])
    if any(len(p) != B for p in prompts):
        raise ValueError(f"every branch needs {B} prompts, got {[len(p) for p in prompts]}")
    record: list[torch.Tensor] | None = [] if return_logits else None
    warpers = _warpers(**sampling) if do_sample else None
    images = list(batch.images)
    decoder.start(lvlm)
    from transformers import LogitsProcessorList

    if batched:
        run = branch_batch(lvlm, batch, prompts)
        selector = _Selector(decoder, B, k, do_sample, warpers, generator, record)
        rows = BranchRows.build(range(k), B, lvlm.device)
    else:
        if lvlm.family.startswith("qwen"):
            raise ValueError("the sequential contrastive loop runs LLaVA families only (Qwen2-VL keeps its M-RoPE "
                             "state on the model between forwards); use batched=True")
        run = lvlm.prepare(images, prompts[0], system=batch.system)
        streams = [_Stream(lvlm, lvlm.prepare(images, prompts[j], system=batch.system), decoder, j)
                   for j in range(1, k)]
        selector = _Selector(decoder, B, k, do_sample, warpers, generator, record,
                             counterfactual=lambda ids: [s.step(ids[:, run.layout.prompt_length:]) for s in streams])
        rows = BranchRows.build([0], B, lvlm.device)
    decoder.begin(rows)
    try:
        with lvlm.use_layout(run.layout):
            out = lvlm.model.generate(**run.inputs, logits_processor=LogitsProcessorList([selector]),
                                      do_sample=False, **gen_kwargs)
    finally:
        decoder.begin(None)
    sequences = out.sequences if hasattr(out, "sequences") else out
    new = sequences[:B, run.layout.prompt_length:]
    return (new, record) if return_logits else new
