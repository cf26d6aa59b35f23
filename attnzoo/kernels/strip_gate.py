"""Strip attention: gates over the rows and columns of a feature map (ELA, Coordinate Attention style).

For a map ``x`` of shape (B, C, H, W) the ops here compute

- the strip means ``z_h = mean_W(x)`` (B, C, H) and ``z_w = mean_H(x)`` (B, C, W);
- the gating ``out = act(x * y_h[..., :, None] * y_w[..., None, :] + shortcut)`` (act: none or ReLU), with
  the residual add and activation of a host block (timm's ResNet blocks) fused in;
- both together around a small gate function on the strips (:func:`strip_attention`);
- ELA's whole op (:func:`ela_attention`): the gates are ``sigmoid(GroupNorm(conv1d(z)))`` with one grouped
  1-D conv and one GroupNorm shared by both strips, which is how
  :class:`attnzoo.vision.ela.EfficientLocalAttention` runs.

Backends (:func:`attnzoo.kernels.set_backend`, logged once per op):
- ``"triton"`` (default on CUDA): one kernel reads x once for both means; one kernel applies both gates,
  the shortcut and the ReLU in one read and one write; the backward is one reduction pass (gate
  gradients, ReLU mask, shortcut gradient) and one element-wise pass. Accumulation in float32.
  :func:`ela_attention` adds one kernel for both strips' conv + GroupNorm + sigmoid (and one, hand-written,
  for their backward): three launches forward, three and a sum backward, replayed without Triton's
  per-call launch path, and no autograd node at all when nothing needs a gradient.
- ``"torch"`` (CPU; also used for ``"flex"`` and under ``torch.compile``): the plain PyTorch expressions.
Both accept NCHW-contiguous and channels_last maps (any strides) and keep x's memory layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._logging import get_logger, log_once
from ._backend import get_backend_override, resolve_backend
from ._checks import register_check

__all__ = ["apply_strip_gates", "ela_attention", "strip_attention", "strip_means"]

logger = get_logger("attnzoo.kernels")

GateFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _use_triton(x: torch.Tensor, op: str) -> bool:
    if torch.compiler.is_compiling():  # the compiler fuses the plain expressions itself
        return False
    return resolve_backend(x.device, op) == "triton"


def _ela_fused_pays() -> bool:
    """Whether the automatic choice runs :func:`ela_attention` on the fused kernels (on CUDA, eager): always.
    Measured on an H100 (batch 128, 224 px, bf16 autocast, 2026-11-24 01:56-02:37 UTC, four calls): resnet50_ela
    fused 7544-7728 img/s inference / 1834-1879 training against the PyTorch path's 5074-5109 / 1385-1395;
    mobilenetv2_100_ela fused 10703-12209 / 1850-1999 against 6404-9497 / 1585-1714. (The generic
    :func:`strip_attention` keeps its own choice, :func:`_fused_pays`.)"""
    return True


def _fused_pays(x: torch.Tensor, shortcut: torch.Tensor | None, params: Sequence[torch.Tensor]) -> bool:
    """Whether the automatic choice runs :func:`strip_attention` fused. Measured on an H100 (resnet50_ela, batch
    128, bf16, 2026-11-24): the fused kernels win the training step (1431-1449 vs 1340 img/s) but not inference
    (4706-4919 vs 5073 img/s; MobileNetV2-ELA 5763 vs 9477 with an earlier version of the kernels), where
    the extra autograd.Function and launches per block cost more host time than the saved memory traffic. So,
    unless ``set_backend("triton")`` forces the kernels, they run only when a gradient is recorded."""
    if get_backend_override() == "triton":
        return True
    recording = torch.is_grad_enabled() and (
        x.requires_grad or (shortcut is not None and shortcut.requires_grad) or any(p.requires_grad for p in params))
    if not recording:
        log_once(logger, "strip_attention: no gradient recorded, PyTorch expressions (measured faster than the "
                         "fused kernels at inference; set_backend('triton') forces the kernels)")
    return recording


def _check_map(x: torch.Tensor, shortcut: torch.Tensor | None = None, act: str | None = None) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be a (batch, channels, height, width) map, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if shortcut is not None and shortcut.shape != x.shape:
        raise ValueError(f"shortcut must have x's shape {tuple(x.shape)}, got {tuple(shortcut.shape)}")
    if act not in (None, "relu"):
        raise ValueError(f"act must be None or 'relu', got {act!r}; apply other activations after the call")


def _check_gates(x: torch.Tensor, y_h: torch.Tensor, y_w: torch.Tensor) -> None:
    b, c, h, w = x.shape
    if tuple(y_h.shape) != (b, c, h) or tuple(y_w.shape) != (b, c, w):
        raise ValueError(f"gates must be y_h (B, C, H) = {(b, c, h)} and y_w (B, C, W) = {(b, c, w)} for x of shape "
                         f"{tuple(x.shape)}, got {tuple(y_h.shape)} and {tuple(y_w.shape)}")


def _gate_torch(x: torch.Tensor, y_h: torch.Tensor, y_w: torch.Tensor, shortcut: torch.Tensor | None,
                act: str | None) -> torch.Tensor:
    # Gates in x's dtype: a float32 gate would promote the whole map to float32 under autocast.
    out = x * y_h.to(x.dtype).unsqueeze(-1) * y_w.to(x.dtype).unsqueeze(-2)
    if shortcut is not None:
        out += shortcut  # as timm's blocks add the shortcut: in place on the fresh branch output
    return out.relu_() if act == "relu" else out


def strip_means(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two strip means of a map, from one read of it on the triton backend.

    Args:
        x: (B, C, H, W), float dtype, NCHW-contiguous, channels_last or any strides.

    Returns:
        ``(z_h, z_w)``: ``z_h = x.mean(3)`` of shape (B, C, H) and ``z_w = x.mean(2)`` of shape (B, C, W),
        both float32 (float32 accumulation). Differentiable with respect to x.
    """
    _check_map(x)
    if _use_triton(x, "strip_means"):
        from ._ela_triton import StripMeans

        return StripMeans.apply(x)
    return x.mean(dim=3, dtype=torch.float32), x.mean(dim=2, dtype=torch.float32)


def apply_strip_gates(x: torch.Tensor, y_h: torch.Tensor, y_w: torch.Tensor, shortcut: torch.Tensor | None = None,
                      act: str | None = None) -> torch.Tensor:
    """``act(x * y_h[..., :, None] * y_w[..., None, :] + shortcut)`` in one pass over the map.

    Args:
        x: (B, C, H, W), float dtype, any strides.
        y_h: (B, C, H) row gates; y_w: (B, C, W) column gates; any float dtype (float32 is fine: they are
            read once per row/column and never promote the map).
        shortcut: optional (B, C, H, W) residual added after the gating (a ResNet block's shortcut).
        act: None or "relu" (applied last, as timm's ResNet blocks do after the residual add).

    Returns:
        (B, C, H, W) in x's dtype and memory layout. Triton computes in float32 and rounds once; the torch
        backend multiplies in x's dtype. Differentiable with respect to x, y_h, y_w and shortcut.
    """
    _check_map(x, shortcut, act)
    _check_gates(x, y_h, y_w)
    if _use_triton(x, "apply_strip_gates"):
        from ._ela_triton import StripGate

        return StripGate.apply(x, y_h, y_w, shortcut, act == "relu")
    return _gate_torch(x, y_h, y_w, shortcut, act)


def strip_attention(x: torch.Tensor, gate_fn: GateFn, shortcut: torch.Tensor | None = None, act: str | None = None,
                    params: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """Strip attention end to end: ``act(x * y_h * y_w + shortcut)`` with ``(y_h, y_w) = gate_fn(z_h, z_w)``.

    Args:
        x: (B, C, H, W), float dtype, any strides.
        gate_fn: maps the strip means ``z_h`` (B, C, H) and ``z_w`` (B, C, W) to the gates ``y_h`` (B, C, H)
            and ``y_w`` (B, C, W) (ELA: shared conv1d + GroupNorm + sigmoid). On the triton backend it receives
            float32 means; on the torch backend means in x's dtype (``x.mean``).
        shortcut: optional (B, C, H, W) residual added after the gating.
        act: None or "relu", applied last.
        params: every tensor ``gate_fn`` reads that may need a gradient (e.g. its module's parameters). The
            fused backward differentiates gate_fn's recorded graph and hands these their gradients; one
            missing here gets no gradient on the triton backend.

    Returns:
        (B, C, H, W) in x's dtype and memory layout. Differentiable with respect to x, shortcut and params.
        On the triton backend the map is read once for both means and once (plus the shortcut) for the
        gating; the backward reads the output gradient, x and (with ReLU) the output once for the gate
        gradients, then writes dx in one more pass.
    """
    _check_map(x, shortcut, act)
    if _use_triton(x, "strip_attention") and _fused_pays(x, shortcut, params):
        from ._ela_triton import strip_attention as fused

        return fused(x, gate_fn, shortcut, act == "relu", tuple(params))
    y_h, y_w = gate_fn(x.mean(dim=3), x.mean(dim=2))
    return _gate_torch(x, y_h, y_w, shortcut, act)



def _check_ela(x: torch.Tensor, conv_weight: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
               norm_groups: int) -> None:
    c = x.shape[1]
    if conv_weight.dim() != 3 or conv_weight.shape[0] != c or c % conv_weight.shape[1]:
        raise ValueError(f"conv_weight must be (C, C / conv_groups, K) = ({c}, C / groups, K) for x with {c} channels, "
                         f"got {tuple(conv_weight.shape)}")
    if conv_weight.shape[2] % 2 == 0:
        raise ValueError(f"conv kernel size must be odd ('same' padding K // 2), got {conv_weight.shape[2]}")
    if norm_groups < 1 or c % norm_groups:
        raise ValueError(f"{c} channels do not divide into {norm_groups} GroupNorm groups; pick a divisor of {c}")
    if tuple(norm_weight.shape) != (c,) or tuple(norm_bias.shape) != (c,):
        raise ValueError(f"norm_weight and norm_bias must be ({c},), got {tuple(norm_weight.shape)} and "
                         f"{tuple(norm_bias.shape)}")


def _ela_gates_torch(z: torch.Tensor, conv_weight: torch.Tensor, norm_weight: torch.Tensor,
                     norm_bias: torch.Tensor, norm_groups: int, eps: float) -> torch.Tensor:
    # (N, C, L) -> (N, C, L): the shared grouped conv1d ('same' zero padding), GroupNorm, sigmoid
    k = conv_weight.shape[2]
    u = torch.nn.functional.conv1d(z.to(conv_weight.dtype), conv_weight, padding=k // 2,
                                   groups=conv_weight.shape[0] // conv_weight.shape[1])
    return torch.sigmoid(torch.nn.functional.group_norm(u, norm_groups, norm_weight, norm_bias, eps))


def ela_attention(x: torch.Tensor, conv_weight: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                  norm_groups: int, eps: float = 1e-5, shortcut: torch.Tensor | None = None,
                  act: str | None = None) -> torch.Tensor:
    """ELA (Xu & Wan, 2024) with an optional residual tail: ``act(x * y_h[..., None] * y_w[..., None, :] + shortcut)``
    where ``y_h = G(mean_W(x))``, ``y_w = G(mean_H(x))`` and ``G(z) = sigmoid(GroupNorm(conv1d(z)))`` uses ONE
    grouped 1-D conv (no bias, zero padding K // 2) and ONE GroupNorm for both strips.

    Args:
        x: (B, C, H, W), float dtype, NCHW-contiguous, channels_last or any strides.
        conv_weight: (C, C / conv_groups, K), K odd (``nn.Conv1d(C, C, K, groups=conv_groups).weight``).
        norm_weight, norm_bias: (C,) GroupNorm affine parameters; ``norm_groups`` divides C; ``eps`` its epsilon.
        shortcut: optional (B, C, H, W) residual added after the gating (a ResNet block's shortcut).
        act: None or "relu", applied last (timm's ResNet blocks: ReLU after the residual add).

    Returns:
        (B, C, H, W) in x's dtype and (dense) memory layout. Differentiable with respect to x, shortcut and the
        three parameters. Triton: strip means and gates in float32, the map rounded once; the torch backend runs
        the conv in the parameters' dtype (or autocast's) and multiplies in x's dtype.
    """
    _check_map(x, shortcut, act)
    _check_ela(x, conv_weight, norm_weight, norm_bias, norm_groups)
    if _use_triton(x, "ela_attention") and _ela_fused_pays():
        from ._ela_triton import ela_attention as fused

        out = fused(x, conv_weight, norm_weight, norm_bias, norm_groups, eps, shortcut, act == "relu")
        if out is not None:
            return out
        log_once(logger, f"ela_attention: strip tiles of {tuple(conv_weight.shape)} at {tuple(x.shape)} exceed the "
                         "fused kernel's registers; PyTorch expressions")
    z_h, z_w = x.mean(dim=3), x.mean(dim=2)
    if z_h.shape == z_w.shape:
        # square maps: both strips through one conv + GroupNorm call (GroupNorm's statistics are per sample, so
        # stacking along the batch changes only the number of launches)
        y_h, y_w = _ela_gates_torch(torch.cat([z_h, z_w]), conv_weight, norm_weight, norm_bias, norm_groups,
                                    eps).chunk(2)
    else:
        y_h = _ela_gates_torch(z_h, conv_weight, norm_weight, norm_bias, norm_groups, eps)
        y_w = _ela_gates_torch(z_w, conv_weight, norm_weight, norm_bias, norm_groups, eps)
    return _gate_torch(x, y_h, y_w, shortcut, act)


@register_check("strip_attention")
def _check(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, str]:
    # a GroupNorm + sigmoid gate on the strips (no conv: cuDNN's TF32 would blur the comparison), the ReLU
    # residual tail, odd map sizes
    gen = torch.Generator().manual_seed(0)
    x, shortcut = torch.randn(2, 16, 9, 7, generator=gen), torch.randn(2, 16, 9, 7, generator=gen)
    gamma, beta = torch.randn(16, generator=gen), torch.randn(16, generator=gen)

    def gate_fn_for(g: torch.Tensor, b: torch.Tensor) -> GateFn:
        def gate(z: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(torch.nn.functional.group_norm(z.to(g.dtype), 4, g, b))

        return lambda z_h, z_w: (gate(z_h), gate(z_w))

    # x records a gradient, so the automatic choice takes the kernels the backend label names (see _fused_pays)
    x_dev = x.to(device).requires_grad_(True)
    out = strip_attention(x_dev, gate_fn_for(gamma.to(device), beta.to(device)), shortcut.to(device), "relu").detach()
    xd = x.double()
    y_h, y_w = gate_fn_for(gamma.double(), beta.double())(xd.mean(3), xd.mean(2))
    ref = torch.relu(xd * y_h[..., None] * y_w[..., None, :] + shortcut.double())
    return out.cpu(), ref, resolve_backend(device, "strip_attention")
