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
