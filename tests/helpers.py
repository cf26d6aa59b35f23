"""Helpers shared by the tests: dtype-aware comparison against float64 references."""

from __future__ import annotations

import torch

# (rtol, atol) for comparing a result computed in `dtype` against a float64 reference. They follow the
# unit roundoff of the input dtype (fp32 accumulation inside kernels): about 8 ulps relative for fp32,
# a few ulps of bf16/fp16 after a softmax-weighted sum.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for results computed from inputs of ``dtype``."""
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 scale: float = 1.0, msg: str = "") -> None:
    """``torch.testing.assert_close`` with tolerances chosen from ``dtype`` (default: ``actual.dtype``).

    ``expected`` is usually a float64 reference; both are compared in float64. ``scale`` widens both
    tolerances for results that went through several rounded steps (e.g. gradients), and must be
    justified where it is used. NaN never passes.
    """
    dtype = dtype or actual.dtype
    rtol, atol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)} {msg}"
    assert torch.isfinite(actual).all(), f"non-finite values in result {msg}"
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol * scale, atol=atol * scale,
                               msg=(lambda m: f"{m} {msg}") if msg else None)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()
