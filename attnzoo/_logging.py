"""One logger hierarchy for the library (``attnzoo``, ``attnzoo.kernels``, ...).

Library code never prints; it logs. The CLI configures handlers. ``log_once`` reports a choice (which
kernel backend ran, which fallback was taken) a single time per process, so a hot loop does not flood
the log but the choice is never silent.
"""

from __future__ import annotations

import logging

_seen: set[tuple[str, str]] = set()


def get_logger(name: str) -> logging.Logger:
    """Return the logger ``attnzoo.<name>`` (or ``attnzoo`` for an empty name)."""
    if name and not name.startswith("attnzoo"):
        name = f"attnzoo.{name}"
    return logging.getLogger(name or "attnzoo")


def log_once(logger: logging.Logger, message: str, level: int = logging.INFO) -> None:
    """Log ``message`` on ``logger`` the first time this (logger, message) pair is seen in the process."""
    key = (logger.name, message)
    if key in _seen:
        return
    _seen.add(key)
    logger.log(level, message)


def configure(verbosity: int = 0) -> None:
    """Send ``attnzoo`` logs to stderr: warnings by default, info with ``verbosity=1``, debug with 2."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    root = logging.getLogger("attnzoo")
    root.setLevel(level)
    if not any(getattr(h, "_attnzoo", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._attnzoo = True  # type: ignore[attr-defined]
        root.addHandler(handler)


logging.getLogger("attnzoo").addHandler(logging.NullHandler())
