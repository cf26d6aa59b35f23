"""The pass base class and the registry of mitigation passes.

A pass is a small dataclass whose fields are the paper's hyper-parameters (defaults = the paper's). It is an
:class:`attnzoo.mllm.AttentionPass`, so it plugs into the wrapper's single attention function; ``apply``
attaches it and returns a handle that is a context manager::

    from attnzoo import mitigation
    with mitigation.get("var").apply(lvlm):
        lvlm.generate(images, prompts)

Bad hyper-parameters raise a ValueError at construction naming the field and the valid range; a pass that
cannot apply to a model (a layer past its depth, an unsupported family) raises when it is applied, before
any generation.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, ClassVar, TypeVar

from ..mllm.attention import AttentionPass

P = TypeVar("P", bound="Pass")
_REGISTRY: dict[str, type[Pass]] = {}


def check_range(name: str, value: float, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise ``ValueError("<name> = <value> outside <range>")`` unless ``low <= value <= high`` (open ends as asked)."""
    ok = True
    if low is not None:
        ok &= value > low if low_open else value >= low
    if high is not None:
        ok &= value < high if high_open else value <= high
    if not ok:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        rng = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name} = {value} is outside the valid range {rng}")


@dataclasses.dataclass
class Pass(AttentionPass):
    """Base of every mitigation pass: hyper-parameters as dataclass fields, ``apply(lvlm)`` -> handle.

    Subclasses set ``name`` (registry and CLI name) and ``summary`` (one line), validate their fields in
    ``validate`` (called at construction) and check the model in ``on_attach`` (called by ``apply``).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the hyper-parameters; raise ValueError naming the field and the valid range."""

    def apply(self, lvlm: Any) -> Any:
        """Attach the pass to ``lvlm`` (an :class:`attnzoo.mllm.LVLM`); returns a ``PassHandle`` that is a context
        manager and detaches with ``remove()``."""
        return lvlm.attach(self)

    def config(self) -> dict[str, Any]:
        """The hyper-parameters as a plain dict (for result files)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}


def register_pass(cls: type[P]) -> type[P]:
    """Class decorator adding a :class:`Pass` subclass to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no registry name")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Registry names of every mitigation pass, sorted."""
    return sorted(_REGISTRY)


def get(name: str, **hyper_parameters: Any) -> Pass:
    """A new pass by registry name, with the paper's defaults overridden by ``hyper_parameters``.

    Raises ValueError for an unknown name (listing the available ones and the closest match) or an unknown
    hyper-parameter (listing the pass's fields).
    """
    key = name.strip().lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown mitigation pass {name!r}{hint}; available: {', '.join(available())}")
    cls = _REGISTRY[key]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(hyper_parameters) - fields
    if unknown:
        raise ValueError(f"{key} has no hyper-parameter {', '.join(sorted(unknown))}; its fields are "
                         f"{', '.join(sorted(fields))}")
    return cls(**hyper_parameters)
