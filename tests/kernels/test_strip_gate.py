"""Strip means and strip gates (attnzoo.kernels.strip_gate): the Triton kernels (under TRITON_INTERPRET=1) and
the torch backend against float64 re-statements, forward and backward, NCHW / channels_last / strided maps,
odd sizes and maps wider than one column tile."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from attnzoo.kernels import apply_strip_gates, ela_attention, list_checks, set_backend, strip_attention, strip_means

BACKENDS = ["triton", "torch"]
# (B, C, H, W): odd sizes; W = 131 spans two 128-wide column tiles of the means pass (partial row sums) and
# three 64-wide tiles of the gating pass; H = 1 and W = 1 edges
SHAPES = [(2, 5, 3, 7), (1, 3, 4, 131), (1, 37, 1, 6), (2, 4, 9, 1)]


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a view with no unit stride on W: every other column of a wider map
        wide = torch.repeat_interleave(x, 2, dim=3).clone()
        return wide[..., ::2]
    return x.contiguous()


def _ref_means(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xd = x.double()
    return xd.sum(dim=3) / x.shape[3], xd.sum(dim=2) / x.shape[2]


def _ref_gate(x, y_h, y_w, shortcut, act):
    out = x.double() * y_h.double()[..., :, None] * y_w.double()[..., None, :]
    if shortcut is not None:
        out = out + shortcut.double()
    return torch.clamp_min(out, 0.0) if act == "relu" else out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strip_means(rng, backend, layout, shape, dtype):
    set_backend(backend)
    x = _layout(torch.randn(*shape, generator=rng).to(dtype), layout).requires_grad_()
    z_h, z_w = strip_means(x)
    assert z_h.dtype == z_w.dtype == torch.float32
    ref_h, ref_w = _ref_means(x.detach())
    # float32 sums of values exact in x's dtype: float32 tolerances whatever x's dtype
    assert_close(z_h, ref_h, dtype=torch.float32)
    assert_close(z_w, ref_w, dtype=torch.float32)
    g_h, g_w = torch.randn(z_h.shape, generator=rng), torch.randn(z_w.shape, generator=rng)
    (dx,) = torch.autograd.grad((z_h, z_w), x, (g_h, g_w))
    ref_dx = g_h.double()[..., None] / shape[3] + g_w.double()[..., None, :] / shape[2]
    assert_close(dx, ref_dx)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("residual", [None, "relu"])
def test_apply_strip_gates_fp32(rng, backend, layout, shape, residual):
    set_backend(backend)
    x = _layout(torch.randn(*shape, generator=rng), layout).requires_grad_()
    b, c, h, w = shape
    y_h = torch.rand(b, c, h, generator=rng).requires_grad_()
    y_w = torch.rand(b, c, w, generator=rng).requires_grad_()
    shortcut = None if residual is None else torch.randn(*shape, generator=rng).requires_grad_()
    out = apply_strip_gates(x, y_h, y_w, shortcut, act=residual)
    ref = _ref_gate(x, y_h, y_w, shortcut, residual)
    assert_close(out, ref)
    assert out.stride() == x.detach().clone().stride() or layout == "strided"
    g = torch.randn(shape, generator=rng)
    inputs = [t for t in (x, y_h, y_w, shortcut) if t is not None]
    grads = torch.autograd.grad(out, inputs, g)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref_out = _ref_gate(*ref_inputs[:3], ref_inputs[3] if shortcut is not None else None, residual)
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, g.double())
    for name, a, e in zip(["dx", "dy_h", "dy_w", "dshortcut"], grads, ref_grads):
        assert_close(a, e, msg=name)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_apply_strip_gates_bf16_triton(rng, layout):
    set_backend("triton")
    shape = (2, 6, 5, 9)
    x = _layout(torch.randn(*shape, generator=rng).bfloat16(), layout).requires_grad_()
    shortcut = torch.randn(*shape, generator=rng).bfloat16().requires_grad_()
    y_h = torch.rand(2, 6, 5, generator=rng).requires_grad_()  # float32 gates, as ELA's under autocast
    y_w = torch.rand(2, 6, 9, generator=rng).requires_grad_()
    out = apply_strip_gates(x, y_h, y_w, shortcut, act="relu")
    assert out.dtype == torch.bfloat16
    assert_close(out, _ref_gate(x, y_h, y_w, shortcut, "relu"))
    g = torch.randn(shape, generator=rng).bfloat16()
    dx, dy_h, dy_w, ds = torch.autograd.grad(out, (x, y_h, y_w, shortcut), g)
    assert dx.dtype == ds.dtype == torch.bfloat16 and dy_h.dtype == torch.float32
    # reference from the same bf16 values in float64, with the kernel's ReLU mask (out > 0)
    mask = (out.detach() > 0).double() * g.double()
    xd = x.detach().double()
    assert_close(ds, mask)
    assert_close(dx, mask * y_h.detach().double()[..., None] * y_w.detach().double()[..., None, :])
    # dy_h/dy_w: float32 sums of products of bf16 inputs -> bf16 tolerance relative to the sum's magnitude
    assert_close(dy_h, (mask * xd * y_w.detach().double()[..., None, :]).sum(3), dtype=torch.bfloat16)
    assert_close(dy_w, (mask * xd * y_h.detach().double()[..., None]).sum(2), dtype=torch.bfloat16)


def _small_gate_module(channels: int) -> torch.nn.Module:
    # an ELA-like gate: grouped conv1d + GroupNorm + sigmoid on (B, C, L), non-trivial affine parameters
    torch.manual_seed(1)
    mod = torch.nn.Sequential(torch.nn.Conv1d(channels, channels, 3, padding=1, groups=channels // 2, bias=False),
                              torch.nn.GroupNorm(2, channels), torch.nn.Sigmoid())
    with torch.no_grad():
        mod[1].weight.normal_()
        mod[1].bias.normal_()
    return mod


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape,act", [((2, 4, 5, 7), "relu"), ((1, 6, 3, 3), None), ((1, 4, 2, 67), "relu")])
def test_strip_attention_triton_vs_float64(rng, layout, shape, act):
    gate = _small_gate_module(shape[1])
    params = list(gate.parameters())

    def gate_fn(z_h, z_w):
        return gate(z_h.to(params[0].dtype)), gate(z_w.to(params[0].dtype))

    x = _layout(torch.randn(*shape, generator=rng), layout).requires_grad_()
    shortcut = torch.randn(*shape, generator=rng).requires_grad_() if act else None
    g = torch.randn(shape, generator=rng)
    set_backend("triton")
    out = strip_attention(x, gate_fn, shortcut, act, params=params)
    inputs = [x, *params] + ([shortcut] if act else [])
    grads = torch.autograd.grad(out, inputs, g)

    set_backend("torch")  # reference: the plain expressions in float64, differentiated by autograd
    gate.double()
    ref_inputs = [t.detach().double().requires_grad_() for t in (x, shortcut) if t is not None]
    ref_params = list(gate.parameters())
    ref = strip_attention(ref_inputs[0], gate_fn, ref_inputs[1] if act else None, act)
    ref_grads = torch.autograd.grad(ref, [ref_inputs[0], *ref_params, *ref_inputs[1:]], g.double())
    assert_close(out, ref)
    for i, (a, e) in enumerate(zip(grads, ref_grads)):
        # params' gradients are sums over B*L of products of gate gradients: a few float32 roundings more
        assert_close(a, e, scale=1.0 if i == 0 else 5.0, msg=f"grad {i}")


def test_strip_attention_inference_skips_autograd(rng):
    set_backend("triton")
    gate = _small_gate_module(4)
    x = torch.randn(1, 4, 3, 5, generator=rng)
    with torch.no_grad():
        out = strip_attention(x, lambda a, b: (gate(a), gate(b)), act="relu", params=list(gate.parameters()))
    assert out.grad_fn is None
    ref = _ref_gate(x, gate(x.double().mean(3).float()), gate(x.double().mean(2).float()), None, "relu")
    assert_close(out, ref, dtype=torch.float32)


def test_expanded_grad_output(rng):
    # out.sum().backward() hands the kernels a stride-0 gradient
    set_backend("triton")
    x = torch.randn(1, 3, 4, 5, generator=rng).requires_grad_()
    y_h, y_w = torch.rand(1, 3, 4, generator=rng), torch.rand(1, 3, 5, generator=rng)
    apply_strip_gates(x, y_h, y_w).sum().backward()
    assert_close(x.grad, (y_h.double()[..., None] * y_w.double()[..., None, :]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_self_check(backend):
    set_backend(backend)
    out, ref, ran = list_checks()["strip_attention"](torch.device("cpu"))
    assert ran == backend
    assert_close(out, ref, dtype=torch.float32)


def test_errors():
    x = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="gates must be y_h"):
        apply_strip_gates(x, torch.rand(1, 2, 4), torch.rand(1, 2, 3))
    with pytest.raises(ValueError, match="act must be None or 'relu'"):
        apply_strip_gates(x, torch.rand(1, 2, 3), torch.rand(1, 2, 4), act="gelu")
    with pytest.raises(ValueError, match="shortcut must have x's shape"):
        apply_strip_gates(x, torch.rand(1, 2, 3), torch.rand(1, 2, 4), torch.randn(1, 2, 3, 5))
    with pytest.raises(ValueError, match=r"\(batch, channels, height, width\)"):
        strip_means(torch.randn(2, 3, 4))


def test_automatic_choice_runs_the_kernels_only_when_a_gradient_is_recorded(monkeypatch, rng):
    """Auto backend on a (pretend) CUDA device: inference takes the PyTorch expressions (measured faster
    there), a recorded gradient takes the fused kernels; set_backend('triton') forces them in both."""
    from attnzoo.kernels import _ela_triton, strip_gate

    set_backend(None)
    calls = []
    real = _ela_triton.strip_attention

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(strip_gate, "resolve_backend", lambda device, op: "triton")
    monkeypatch.setattr(_ela_triton, "strip_attention", spy)
    x = torch.randn(2, 3, 5, 4, generator=rng)

    def gates(z_h, z_w):
        return torch.sigmoid(z_h), torch.sigmoid(z_w)

    with torch.no_grad():
        inference = strip_attention(x, gates)
    assert calls == []
    training = strip_attention(x.clone().requires_grad_(True), gates)
    assert calls == [1]
    assert_close(training.detach(), inference)
    set_backend("triton")
    try:
        with torch.no_grad():
            strip_attention(x, gates)
    finally:
        set_backend(None)
    assert calls == [1, 1]


# --- ela_attention: the whole ELA op (strip means, one kernel for both strips' conv + GroupNorm + sigmoid with a
# hand-written backward, gating) against the same op in float64 through PyTorch's conv1d and group_norm ---


def _ela_inputs(shape, conv_groups_size, kernel_size, rng, residual, dtype=torch.float32):
    c = shape[1]
    x = torch.randn(*shape, generator=rng).to(dtype)
    conv_weight = torch.randn(c, conv_groups_size, kernel_size, generator=rng) / (conv_groups_size * kernel_size) ** 0.5
    gamma, beta = 1 + 0.5 * torch.randn(c, generator=rng), torch.randn(c, generator=rng)
    shortcut = torch.randn(*shape, generator=rng).to(dtype) if residual else None
    return x, conv_weight, gamma, beta, shortcut


def _ela_grads(x, conv_weight, gamma, beta, shortcut, norm_groups, g, backend, dtype=None):
    """(out, grads of x, conv weight, gamma, beta[, shortcut]) on ``backend``, inputs cast to ``dtype`` first."""
    set_backend(backend)
    inputs = [t if dtype is None else t.to(dtype) for t in (x, conv_weight, gamma, beta, shortcut) if t is not None]
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    s = inputs[4] if shortcut is not None else None
    out = ela_attention(inputs[0], *inputs[1:4], norm_groups, 1e-5, s, "relu" if s is not None else None)
    return out, torch.autograd.grad(out, inputs, g.to(out.dtype) if dtype is None else g.to(dtype))


ELA_CASES = [  # (shape, channels per conv group, kernel size, GroupNorm groups, residual, layout)
    ((2, 32, 6, 6), 8, 5, 16, True, "nchw"),  # ELA-S, square: conv groups of 8 span 4 GroupNorm groups of 2
    ((2, 48, 5, 7), 8, 5, 16, False, "channels_last"),  # GroupNorm groups of 3: 24-channel blocks, 32-wide tiles
    ((1, 16, 3, 9), 1, 7, 16, True, "nchw"),  # ELA-B (depthwise), one channel per GroupNorm group
    ((2, 144, 4, 4), 8, 5, 16, True, "channels_last"),  # MobileNetV2's 144 channels: groups of 9 and 8, 72 per block
    ((1, 32, 2, 131), 8, 5, 16, True, "nchw"),  # means over two column tiles; 256-long strip tile, 2-long rows
    ((2, 64, 3, 5), 1, 5, 32, False, "nchw"),  # ELA-T
    ((2, 40, 4, 6), 8, 5, 8, True, "nchw"),  # GroupNorm groups of 5: 40-channel blocks, 64-wide tiles
    ((1, 24, 3, 4), 3, 3, 8, True, "nchw"),  # 3 channels per conv group, 3 taps
    # GroupNorm groups of whole conv groups of 8: the register-reuse forward (16-long strip tiles: also in training)
    ((2, 64, 9, 12), 8, 5, 8, True, "nchw"),
    ((3, 256, 10, 3), 8, 7, 16, False, "channels_last"),  # ELA-L
]


@pytest.mark.parametrize("shape,cg,k,groups,residual,layout", ELA_CASES)
def test_ela_attention_triton_vs_float64(rng, shape, cg, k, groups, residual, layout):
    x, conv_weight, gamma, beta, shortcut = _ela_inputs(shape, cg, k, rng, residual)
    x = _layout(x, layout)
    g = torch.randn(shape, generator=rng)
    out, grads = _ela_grads(x, conv_weight, gamma, beta, shortcut, groups, g, "triton")
    ref, ref_grads = _ela_grads(x, conv_weight, gamma, beta, shortcut, groups, g, "torch", torch.float64)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last) == (layout != "nchw")
    assert_close(out, ref)
    names = ["dx", "dconv", "dgamma", "dbeta", "dshortcut"]
    for i, (name, a, e) in enumerate(zip(names, grads, ref_grads)):
        # parameter gradients sum B * C * (H + W) float32 products (partials per program, then one sum)
        assert_close(a, e, scale=1.0 if i in (0, 4) else 5.0, msg=name)


def test_ela_attention_bf16_map_float32_params(rng):
    # autocast's situation: a bf16 map, float32 parameters; means, gates and the gating in float32, out in bf16
    x, conv_weight, gamma, beta, shortcut = _ela_inputs((2, 32, 5, 6), 8, 5, rng, True, torch.bfloat16)
    g = torch.randn(x.shape, generator=rng).bfloat16()
    out, grads = _ela_grads(x, conv_weight, gamma, beta, shortcut, 16, g, "triton")
    assert out.dtype == grads[0].dtype == grads[4].dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    # reference from the same bf16 values in float64: the kernels round only the stored map and map gradients
    ref, ref_grads = _ela_grads(x, conv_weight, gamma, beta, shortcut, 16, g, "torch", torch.float64)
    assert_close(out, ref)
    for name, a, e in zip(["dx", "dconv", "dgamma", "dbeta", "dshortcut"], grads, ref_grads):
        assert_close(a, e, dtype=torch.bfloat16, msg=name)


def test_ela_attention_backward_sums_runs_of_strips(rng, monkeypatch):
    # few backward programs: each sums the parameter gradients of several strips (rows and columns of different
    # samples), the last run shorter
    from attnzoo.kernels import _ela_triton

    monkeypatch.setattr(_ela_triton, "_ELA_PLANS", {})
    monkeypatch.setattr(_ela_triton, "_BWD_PROGRAMS", 4)  # 6 strips -> 3 programs of 2
    x, conv_weight, gamma, beta, shortcut = _ela_inputs((3, 16, 4, 5), 8, 5, rng, True)
    g = torch.randn(x.shape, generator=rng)
    out, grads = _ela_grads(x, conv_weight, gamma, beta, shortcut, 16, g, "triton")
    plan = next(iter(_ela_triton._ELA_PLANS.values()))
    assert (plan.n_sb, plan.spp) == (3, 2)
    ref, ref_grads = _ela_grads(x, conv_weight, gamma, beta, shortcut, 16, g, "torch", torch.float64)
    assert_close(out, ref)
    for i, (a, e) in enumerate(zip(grads, ref_grads)):
        assert_close(a, e, scale=1.0 if i in (0, 4) else 5.0, msg=f"grad {i}")


@pytest.mark.parametrize("train", [False, True])
def test_ela_attention_g8_forward_runs_of_strips(rng, monkeypatch, train):
    # the conv-groups-of-8 forward with small tiles: 2 strips per tile, 8 per program, so programs run several
    # tiles, one tile mixes row and column strips (10 strips: rows 0-4, columns 5-9) and the last program is short
    from attnzoo.kernels import _ela_triton

    monkeypatch.setattr(_ela_triton, "_ELA_PLANS", {})
    monkeypatch.setattr(_ela_triton, "_G8_INFER", (128, 4))
    monkeypatch.setattr(_ela_triton, "_G8_TRAIN", (128, 2))
    x, conv_weight, gamma, beta, shortcut = _ela_inputs((5, 32, 6, 9), 8, 5, rng, True)
    g = torch.randn(x.shape, generator=rng)
    ref, ref_grads = _ela_grads(x, conv_weight, gamma, beta, shortcut, 2, g, "torch", torch.float64)
    if train:
        out, grads = _ela_grads(x, conv_weight, gamma, beta, shortcut, 2, g, "triton")
        for i, (a, e) in enumerate(zip(grads, ref_grads)):
            assert_close(a, e, scale=1.0 if i in (0, 4) else 5.0, msg=f"grad {i}")
    else:
        set_backend("triton")
        with torch.no_grad():
            out = ela_attention(x, conv_weight, gamma, beta, 2, 1e-5, shortcut, "relu")
    assert_close(out, ref)
    plan = next(iter(_ela_triton._ELA_PLANS.values()))
    launch = plan.gates_keep if train else plan.gates
    assert plan.g8 and launch.kernel is _ela_triton._ela_gates_fwd_g8
    assert (launch.meta["NS"], launch.ints[-1], launch.grid) == (2, 8, (1, 2))


def test_ela_attention_g8_training_keeps_per_tap_kernel_on_short_strips(rng):
    # measured: at strip tiles of 8 (ResNet-50's 7x7 stage) the per-tap kernel is the faster one when the conv
    # output is kept
    from attnzoo.kernels import _ela_triton

    x, conv_weight, gamma, _, _ = _ela_inputs((2, 32, 7, 7), 8, 5, rng, False)
    plan = _ela_triton._ela_plan(x, False, conv_weight, gamma, 2)
    assert plan.g8 and plan.gates.kernel is _ela_triton._ela_gates_fwd_g8
    assert plan.gates_keep.kernel is _ela_triton._ela_gates_fwd


def test_ela_attention_inference_builds_no_graph(rng):
    x, conv_weight, gamma, beta, shortcut = _ela_inputs((2, 32, 4, 4), 8, 5, rng, True)
    params = [t.requires_grad_() for t in (conv_weight, gamma, beta)]
    set_backend("triton")
    with torch.no_grad():
        out = ela_attention(x, *params, 16, 1e-5, shortcut, "relu")
    assert out.grad_fn is None
    set_backend("torch")
    with torch.no_grad():
        ref = ela_attention(x.double(), *(p.double() for p in params), 16, 1e-5, shortcut.double(), "relu")
    assert_close(out, ref)


def test_ela_attention_large_strip_tiles_fall_back(rng):
    # one GroupNorm group of 64 channels over 300-long strips does not fit the kernel's registers: PyTorch runs
    from attnzoo.kernels import _ela_triton

    x, conv_weight, gamma, beta, _ = _ela_inputs((1, 64, 2, 300), 1, 3, rng, False)
    set_backend("triton")
    out = ela_attention(x, conv_weight, gamma, beta, 1)
    assert not _ela_triton._ela_plan(x, False, conv_weight, gamma, 1).fits
    set_backend("torch")
    ref = ela_attention(x.double(), conv_weight.double(), gamma.double(), beta.double(), 1)
    assert_close(out, ref)


def test_ela_attention_errors():
    x = torch.randn(1, 16, 3, 4)
    w, gamma, beta = torch.randn(16, 8, 5), torch.randn(16), torch.randn(16)
    with pytest.raises(ValueError, match=r"conv_weight must be \(C, C / conv_groups, K\)"):
        ela_attention(x, torch.randn(16, 3, 5), gamma, beta, 16)
    with pytest.raises(ValueError, match="kernel size must be odd"):
        ela_attention(x, torch.randn(16, 8, 4), gamma, beta, 16)
    with pytest.raises(ValueError, match="do not divide into 5 GroupNorm groups"):
        ela_attention(x, w, gamma, beta, 5)
    with pytest.raises(ValueError, match=r"norm_weight and norm_bias must be \(16,\)"):
        ela_attention(x, w, gamma[:8], beta, 16)
