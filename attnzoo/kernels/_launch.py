"""Launching an already-compiled Triton kernel without ``JITFunction.run``'s per-call work.

``kernel[grid](*args, **meta)`` binds every argument, computes each one's specialization (pointer alignment,
integer divisibility), builds a cache key and looks the compiled kernel up, on every call: tens of microseconds
of host time for kernels with ~40 arguments, which is what a small eager NA call is bound by. Our launch plans
fix every integer argument and constexpr per plan, so after the first launch only the tensor pointers and
float scalars change. :class:`DirectLaunch` keeps the compiled kernel that the first launch returned and calls
its launcher directly, exactly as ``JITFunction.run`` does (triton >= 3.3 passes every bound argument,
constexprs included, and the launcher skips the specialized ones), after checking the one specialization
that can change between calls: whether every pointer is 16-byte aligned. Any other situation (a launch hook
installed by a profiler, an older triton, the CPU interpreter, a misaligned view) takes the normal path.

Imported lazily (only when a triton backend runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton

from ._backend import triton_interpreting

_KNOBS = getattr(triton, "knobs", None)  # triton >= 3.4: the launch hooks live here


def _version_at_least(major: int, minor: int) -> bool:
    parts = triton.__version__.split(".")
    return (int(parts[0]), int(parts[1])) >= (major, minor)


# The launcher takes every bound argument (constexprs included) since triton 3.3; hooks live in triton.knobs
# since 3.4. Older releases keep the normal launch path.
SUPPORTED = _KNOBS is not None and _version_at_least(3, 4)


def _hook_set(hook: Any) -> bool:
    # triton 3.4-3.6: a callable or None; later releases: an always-present HookChain with a list of calls
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooks_installed() -> bool:
    runtime = _KNOBS.runtime
    return _hook_set(runtime.launch_enter_hook) or _hook_set(runtime.launch_exit_hook)


def current_stream(device: int | None = None) -> int:
    """The raw handle of the current CUDA stream of ``device`` (default: the current device), which is what
    triton launches on."""
    return torch._C._cuda_getCurrentRawStream(torch.cuda.current_device() if device is None else device)


class DirectLaunch:
    """One compiled specialization of a kernel, launched with new pointers and scalars on every call.

    Built by :func:`launch_and_capture` from the launch that compiled (or found) the kernel; ``int_args`` and
    the constexprs are the ones that launch used and must not change (the caller's plan fixes them).
    Pointers reach the launcher as integers: given a tensor, triton's launcher calls its ``data_ptr`` and asks
    the CUDA driver whether the address is device memory (``cuPointerGetAttribute``), per pointer and per
    launch; the tensors here are CUDA tensors that the first launch already accepted.
    """

    __slots__ = ("_run", "_function", "_packed", "_grid", "_int_args", "_tail")

    def __init__(self, compiled: Any, grid: tuple[int, int, int], int_args: tuple, tail: tuple) -> None:
        self._run = compiled.run  # the launcher; the property loads the module on first access
        self._function = compiled.function
        self._packed = compiled.packed_metadata
        self._grid = grid
        self._int_args = int_args
        self._tail = tail

    def __call__(self, ptrs: Sequence[torch.Tensor], scalars: Sequence[float], device: int | None = None) -> bool:
        """Launch on the current CUDA stream of ``device`` (default: the current device); False (nothing
        launched) when the fast path does not apply."""
        addrs = [t.data_ptr() for t in ptrs]
        bits = 0
        for a in addrs:
            bits |= a
        if bits & 15 or _hooks_installed():  # compiled for 16-byte aligned pointers only; a profiler's hook
            return False
        g0, g1, g2 = self._grid
        self._run(g0, g1, g2, current_stream(device), self._function, self._packed, None, None, None, *addrs,
                  *self._int_args, *scalars, *self._tail)
        return True


def launch_and_capture(kernel: Any, grid: tuple[int, ...], ptrs: Sequence[torch.Tensor], int_args: tuple,
                       scalars: Sequence[float], meta: dict[str, Any]) -> DirectLaunch | None:
    """Launch ``kernel[grid](*ptrs, *int_args, *scalars, **meta)`` the normal way and return a
    :class:`DirectLaunch` for later calls with the same plan, or None when this launch cannot be replayed
    directly (interpreter, old triton, unaligned pointers, a parameter not given explicitly)."""
    compiled = kernel[grid](*ptrs, *int_args, *scalars, **meta)
    if not SUPPORTED or triton_interpreting() or compiled is None or not hasattr(compiled, "packed_metadata"):
        return None
    if any(t.data_ptr() & 15 for t in ptrs):
        return None
    n_given = len(ptrs) + len(int_args) + len(scalars)
    names = kernel.arg_names
    if any(name not in meta for name in names[n_given:]):
        return None
    tail = tuple(meta[name] for name in names[n_given:])
    grid3 = (*grid, 1, 1)[:3]
    return DirectLaunch(compiled, grid3, tuple(int_args), tail)
