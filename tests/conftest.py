"""Shared test setup. Environment first: Triton reads TRITON_INTERPRET when it is imported, and the
Hugging Face libraries read the offline flags when they are imported."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def rng() -> torch.Generator:
    """A seeded torch Generator; also seeds the global torch, numpy and random RNGs for the test."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    return torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True)
def _reset_kernel_backend():
    """Every test starts with automatic backend choice, whatever the previous one forced."""
    from attnzoo.kernels import set_backend

    set_backend(None)
    yield
    set_backend(None)
