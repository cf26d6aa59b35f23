"""DirectLaunch replays a compiled kernel with exactly the arguments JITFunction.run would pass, and steps aside
whenever the replay would not be the same specialization (checked with a stand-in kernel: no GPU here)."""

from __future__ import annotations

import pytest
import torch

from attnzoo.kernels import _launch


class _FakeCompiled:
    def __init__(self, calls):
        self.calls = calls
        self.function, self.packed_metadata = "function-handle", ("packed",)

    def run(self, *args):
        self.calls.append(("direct", args))


class _FakeKernel:
    """Records launches; parameters: two pointers, two ints, one float scalar, two constexprs."""

    arg_names = ["x_ptr", "y_ptr", "n", "stride", "scale", "BLOCK", "FLAG"]

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.calls.append(("jit", grid, args, meta))
            return _FakeCompiled(self.calls)
        return launch


@pytest.fixture
def fast_path(monkeypatch):
    monkeypatch.setattr(_launch, "SUPPORTED", True)
    monkeypatch.setattr(_launch, "triton_interpreting", lambda: False)
    monkeypatch.setattr(_launch, "current_stream", lambda device=None: 1234)


def test_replay_passes_every_bound_argument_in_order(fast_path):
    kernel = _FakeKernel()
    x, y = torch.zeros(64), torch.zeros(64)
    meta = dict(BLOCK=32, FLAG=True, num_warps=4)
    direct = _launch.launch_and_capture(kernel, (7, 3), (x, y), (64, 1), (0.5,), meta)
    assert direct is not None and kernel.calls[0][0] == "jit"
    x2, y2 = torch.ones(64), torch.ones(64)
    assert direct((x2, y2), (0.25,))
    kind, args = kernel.calls[1]
    assert kind == "direct"
    # grid padded to 3-D, stream, function, packed metadata, no launch metadata or hooks, then the arguments
    # in the kernel's parameter order with the constexprs last (num_warps is an option, not a parameter).
    assert args[:9] == (7, 3, 1, 1234, "function-handle", ("packed",), None, None, None)
    assert args[9] == x2.data_ptr() and args[10] == y2.data_ptr()  # pointers as integers
    assert args[11:] == (64, 1, 0.25, 32, True)


def test_no_replay_for_misaligned_pointers(fast_path):
    kernel = _FakeKernel()
    x, y = torch.zeros(64), torch.zeros(64)
    direct = _launch.launch_and_capture(kernel, (1,), (x, y), (64, 1), (0.5,), dict(BLOCK=32, FLAG=False))
    assert direct is not None
    assert not direct((x[1:], y), (0.5,))  # 4-byte offset: the kernel was compiled for 16-byte alignment
    assert len(kernel.calls) == 1
    # a launch that itself saw a misaligned pointer is never captured
    assert _launch.launch_and_capture(kernel, (1,), (x[1:], y), (63, 1), (0.5,), dict(BLOCK=32, FLAG=False)) is None


def test_no_replay_when_a_parameter_was_left_to_its_default(fast_path):
    kernel = _FakeKernel()
    x, y = torch.zeros(64), torch.zeros(64)
    assert _launch.launch_and_capture(kernel, (1,), (x, y), (64, 1), (0.5,), dict(BLOCK=32)) is None


def test_no_replay_with_a_launch_hook(fast_path, monkeypatch):
    kernel = _FakeKernel()
    x, y = torch.zeros(64), torch.zeros(64)
    direct = _launch.launch_and_capture(kernel, (1,), (x, y), (64, 1), (0.5,), dict(BLOCK=32, FLAG=False))
    assert direct((x, y), (0.5,))  # no hook: replayed
    hooks = _launch._KNOBS.runtime
    if hasattr(hooks.launch_enter_hook, "add"):  # triton >= 3.7: a chain of hooks
        profiler_hook = lambda *a: None  # noqa: E731
        hooks.launch_enter_hook.add(profiler_hook)
        try:
            assert not direct((x, y), (0.5,))
        finally:
            hooks.launch_enter_hook.remove(profiler_hook)
    else:
        monkeypatch.setattr(hooks, "launch_enter_hook", lambda *a: None)
        assert not direct((x, y), (0.5,))


def test_interpreter_never_replays(monkeypatch):
    monkeypatch.setattr(_launch, "triton_interpreting", lambda: True)
    kernel = _FakeKernel()
    x, y = torch.zeros(64), torch.zeros(64)
    assert _launch.launch_and_capture(kernel, (1,), (x, y), (64, 1), (0.5,), dict(BLOCK=32, FLAG=False)) is None
    assert kernel.calls[0][0] == "jit"  # the launch itself still happened
