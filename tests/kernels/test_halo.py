"""halo_attention against the float64 reference and against timm's HaloAttn module."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from timm.layers.halo_attn import HaloAttn

from attnzoo.kernels import halo_attention, use_backend
from attnzoo.kernels.reference import halo_attention_reference

BACKENDS = ["torch", "flex", "triton"]


def _inputs(rng, b, h, w, heads, dqk, dv, stride=1, dtype=torch.float32):
    q = torch.randn(b, h // stride, w // stride, heads, dqk, generator=rng).to(dtype).requires_grad_()
    k = torch.randn(b, h, w, heads, dqk, generator=rng).to(dtype).requires_grad_()
    v = torch.randn(b, h, w, heads, dv, generator=rng).to(dtype).requires_grad_()
    return q, k, v


def _tables(rng, win, dqk):
    return [(0.3 * torch.randn(2 * win - 1, dqk, generator=rng)).requires_grad_() for _ in range(2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("b", "h", "w", "block", "halo", "stride", "pos", "scale_pos"), [
    (2, 8, 12, 4, 1, 1, True, False),   # non-square map, halo at every border, batch > 1
    (1, 8, 8, 4, 2, 2, True, True),     # query subsampling (block_stride 2), scaled position logits
    (1, 4, 8, 4, 5, 1, False, False),   # halo reaching past a whole block, no position logits
    (1, 6, 12, 6, 1, 1, True, False),   # block edge not a power of two (padded tiles)
])
def test_halo_matches_reference(rng, backend, b, h, w, block, halo, stride, pos, scale_pos):
    q, k, v = _inputs(rng, b, h, w, 2, 16, 8, stride)
    rel = _tables(rng, block + 2 * halo, 16) if pos else [None, None]
    kwargs = dict(rel_height=rel[0], rel_width=rel[1], block_stride=stride, scale_pos_embed=scale_pos, scale=0.3)
    ref = halo_attention_reference(q, k, v, block, halo, **kwargs)
    if backend == "flex":  # FlexAttention has no backward on the CPU; its backward is checked on the GPU
        with use_backend(backend), torch.no_grad():
            out = halo_attention(q.detach(), k.detach(), v.detach(), block, halo,
                                 **{**kwargs, "rel_height": rel[0] if rel[0] is None else rel[0].detach(),
                                    "rel_width": rel[1] if rel[1] is None else rel[1].detach()})
        assert_close(out, ref)
        return
    with use_backend(backend):
        out = halo_attention(q, k, v, block, halo, **kwargs)
    assert_close(out, ref, msg="forward")
    inputs = [q, k, v] + [t for t in rel if t is not None]
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, inputs, grad.float())
    want = torch.autograd.grad(ref, inputs, grad)
    # gradients pass two more rounded matmuls (and a sum over all queries for the tables): a few ulps more
    for i, (g, r) in enumerate(zip(got, want)):
        assert_close(g, r, scale=4.0, msg=f"grad of input {i}, {backend}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_halo_triton_half(rng, dtype):
    q, k, v = _inputs(rng, 1, 8, 8, 2, 16, 16, dtype=dtype)
    rel_h, rel_w = _tables(rng, 6, 16)
    ref = halo_attention_reference(q, k, v, 4, 1, rel_h, rel_w)
    with use_backend("triton"):
        out = halo_attention(q, k, v, 4, 1, rel_h, rel_w)
    assert_close(out, ref, dtype=dtype)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v, rel_h), grad.to(dtype))
    want = torch.autograd.grad(ref, (q, k, v, rel_h), grad)
    for g, r in zip(got, want):
        assert_close(g, r, dtype=dtype, scale=4.0)


def _halo_attn_via_kernel(attn: HaloAttn, x: torch.Tensor) -> torch.Tensor:
    """HaloAttn.forward through halo_attention, exactly as documented in attnzoo.kernels.halo."""
    nh, dqk = attn.num_heads, attn.dim_head_qk
    q = attn.q(x).unflatten(1, (nh, dqk)).permute(0, 3, 4, 1, 2)
    kv = attn.kv(x).unflatten(1, (nh, dqk + attn.dim_head_v))
    k = kv[:, :, :dqk].permute(0, 3, 4, 1, 2)
    v = kv[:, :, dqk:].permute(0, 3, 4, 1, 2)
    out = halo_attention(q, k, v, attn.block_size, attn.halo_size, attn.pos_embed.height_rel,
                         attn.pos_embed.width_rel, scale=attn.scale, block_stride=attn.block_stride,
                         scale_pos_embed=attn.scale_pos_embed)
    return attn.pool(out.flatten(3).permute(0, 3, 1, 2))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("hw", "kwargs"), [
    ((8, 12), dict(dim=16, num_heads=2, block_size=4, halo_size=1)),
    ((8, 8), dict(dim=16, dim_out=24, num_heads=2, block_size=4, halo_size=2, stride=2, qkv_bias=True)),
    ((8, 8), dict(dim=16, num_heads=2, block_size=4, halo_size=1, stride=2, avg_down=True, scale_pos_embed=True)),
])
def test_timm_haloattn_equals_kernel(rng, backend, hw, kwargs):
    torch.manual_seed(0)
    attn = HaloAttn(**kwargs).double()
    for p in attn.parameters():  # biases start at zero in timm: make every parameter matter
        torch.nn.init.normal_(p, std=0.3)
    attn = attn.float()
    x = torch.randn(1, kwargs["dim"], *hw, generator=rng, requires_grad=True)
    want = attn(x)
    want_grads = torch.autograd.grad(want, [x, *attn.parameters()], torch.ones_like(want))
    with use_backend(backend):
        got = _halo_attn_via_kernel(attn, x)
    got_grads = torch.autograd.grad(got, [x, *attn.parameters()], torch.ones_like(got))
    # both sides are float32 computations of the same function in a different order
    assert_close(got, want, dtype=torch.float32, scale=2.0)
    for (name, _), g, r in zip([("x", None), *attn.named_parameters()], got_grads, want_grads):
        assert_close(g, r, dtype=torch.float32, scale=10.0, msg=f"grad {name}")


def test_halo_errors_name_the_fix(rng):
    k = torch.randn(1, 10, 8, 2, 8)
    with pytest.raises(ValueError, match=r"height 10 is not divisible by block_size 4; pad it by 2 \(to 12\)"):
        halo_attention(k, k, k, 4, 1)
    k = torch.randn(1, 12, 12, 2, 8)
    with pytest.raises(ValueError, match=r"block_size 6 is not divisible by block_stride 4"):
        halo_attention(k[:, ::4, ::4], k, k, 6, 1, block_stride=4)
    with pytest.raises(ValueError, match=r"rel_height must be \(2 \* \(block_size \+ 2 \* halo_size\) - 1, d_qk\)"):
        halo_attention(k, k, k, 4, 1, torch.zeros(5, 8), torch.zeros(11, 8))
    with pytest.raises(ValueError, match=r"q must be \(batch, H/block_stride"):
        halo_attention(k, k, k, 4, 1, block_stride=2)
