"""Self-checks that ``attnzoo demo`` runs: each kernel on small random inputs against its reference.

A kernel module registers a check with :func:`register_check`. The check function takes a device and
returns ``(output, reference, backend)``: the op's output through the active backend, the float64
reference on the same inputs, and the backend name that ran.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CheckFn = Callable[[torch.device], tuple[torch.Tensor, torch.Tensor, str]]
_CHECKS: dict[str, CheckFn] = {}


def register_check(name: str) -> Callable[[CheckFn], CheckFn]:
    """Decorator registering ``fn(device) -> (output, float64 reference, backend name)`` under ``name``."""

    def deco(fn: CheckFn) -> CheckFn:
        _CHECKS[name] = fn
        return fn

    return deco


def list_checks() -> dict[str, CheckFn]:
    """All registered kernel self-checks, by name."""
    return dict(_CHECKS)
