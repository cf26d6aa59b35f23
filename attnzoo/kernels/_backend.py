"""Kernel backend selection: explicit, overridable, and logged once per op and backend.

Backends:
- ``"triton"``: the fused Triton kernels (default on CUDA; on the CPU only under ``TRITON_INTERPRET=1``).
- ``"torch"``: vectorised PyTorch (gather/unfold); the default on the CPU.
- ``"flex"``: ``torch.nn.attention.flex_attention`` with a block mask built from the same semantics.

The float64 reference in :mod:`attnzoo.kernels.reference` is ground truth for tests, never a backend.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

from .._logging import get_logger, log_once

logger = get_logger("attnzoo.kernels")

BACKENDS = ("triton", "torch", "flex")
_override: str | None = None


def set_backend(name: str | None) -> None:
    """Force every kernel to use backend ``name`` ("triton", "torch" or "flex"); ``None`` restores auto.

    Auto picks "triton" for CUDA tensors and "torch" for CPU tensors.
    """
    global _override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {BACKENDS} or None for auto")
    _override = name


def get_backend_override() -> str | None:
    """The backend forced by :func:`set_backend`, or ``None`` when the choice is automatic."""
    return _override


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager form of :func:`set_backend`; restores the previous choice on exit."""
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


# Looked up once, at import and without importing triton: torch.compile (2.11) refuses to trace find_spec.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_RESOLVED: dict[tuple[str, str, str | None], str] = {}  # (device type, op, override) -> backend, once logged


def triton_available() -> bool:
    """True when triton is installed (checked once, at import, without importing it)."""
    return _TRITON_INSTALLED


def triton_interpreting() -> bool:
    """True when Triton kernels would run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(device: torch.device | str, op: str) -> str:
    """The backend ``op`` will use for tensors on ``device``; logs the choice once per (op, backend).

    Raises a ValueError when the forced backend cannot run there (Triton on a CPU without the interpreter).
    """
    if not torch.compiler.is_compiling():  # (a traced dict lookup would add guards on the cache)
        dev_type = device.type if isinstance(device, torch.device) else torch.device(device).type
        fast = _RESOLVED.get((dev_type, op, _override))
        if fast is not None:
            return fast  # validated and logged before: every eager kernel call passes here (host time)
    device = torch.device(device)
    backend = _override
    if backend is None:
        backend = "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend 'triton' requested but triton is not installed; use set_backend('torch')")
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError(
                f"backend 'triton' on a {device.type} tensor needs TRITON_INTERPRET=1 set before triton is "
                "imported; or use set_backend('torch') on the CPU"
            )
    if not torch.compiler.is_compiling():  # logging is a graph break under torch.compile; eager calls log it
        log_once(logger, f"{op}: using the {backend} backend on {device.type}")
        if backend != "triton" or device.type == "cuda":  # the interpreter check reads the environment each time
            _RESOLVED[(device.type, op, _override)] = backend
    return backend


def describe_backends() -> dict[str, str]:
    """What each device type would get right now: {"cpu": ..., "cuda": ...} (for ``attnzoo info``)."""
    out = {}
    for dev in ("cpu", "cuda"):
        if _override is not None:
            out[dev] = _override
        else:
            out[dev] = "triton" if dev == "cuda" and triton_available() else "torch"
    return out
