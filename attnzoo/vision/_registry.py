"""Registration of attnzoo's vision models with timm, and the list of what attnzoo registered."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import TypeVar

from timm.models import register_model as _timm_register_model

F = TypeVar("F", bound=Callable)
_NAMES: list[str] = []


def register_model(fn: F) -> F:
    """Register ``fn`` with timm (``timm.create_model(fn.__name__)``) and record it as an attnzoo model."""
    fn = _timm_register_model(fn)
    if fn.__name__ not in _NAMES:
        _NAMES.append(fn.__name__)
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Names of the models attnzoo registered with timm, filtered by a shell-style ``pattern``."""
    return sorted(n for n in _NAMES if fnmatch.fnmatch(n, pattern))
