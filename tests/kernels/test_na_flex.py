"""Neighborhood attention: the FlexAttention backend against the float64 reference (forward; FlexAttention
has no backward on the CPU, so its backward is checked on the GPU by ``benchmarks/na.py``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_na import CASES, _check_backend

FLEX_CASES = [CASES[0], CASES[1], CASES[6]]  # 1-D dilated + rpb; 1-D causal strided GQA + extras; 3-D rpb + extras


@pytest.mark.parametrize("case", FLEX_CASES, ids=["1d-dil-rpb", "1d-causal-gqa-extra", "3d-rpb-extra"])
def test_flex_backend_matches_reference(case, rng):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "flex_attention called without torch.compile()"
        _check_backend("flex", case, torch.float32, rng, backward=False)


def test_flex_attention_fn_compiled_call_has_its_own_recompile_limit(monkeypatch):
    """CUDA gets one compiled flex_attention, run under a recompile limit above dynamo's default 8 (past it,
    flex silently runs eagerly and materialises the score matrix); the CPU gets the eager function."""
    from torch.nn.attention.flex_attention import flex_attention

    from attnzoo.kernels import _flex

    assert _flex.flex_attention_fn("cpu") is flex_attention
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: lambda *a, **k: seen.append(
        torch._dynamo.config.recompile_limit))
    _flex._compiled_flex.cache_clear()
    try:
        fn = _flex.flex_attention_fn("cuda")
        assert _flex.flex_attention_fn(torch.device("cuda")) is fn  # compiled once per process
        fn()
        assert seen == [_flex.FLEX_RECOMPILE_LIMIT] and _flex.FLEX_RECOMPILE_LIMIT > 8
        assert torch._dynamo.config.recompile_limit != _flex.FLEX_RECOMPILE_LIMIT  # restored after the call
    finally:
        _flex._compiled_flex.cache_clear()
