"""key_group_attention (PyTorch backend and the Triton kernel in the interpreter) against the float64 reference,
which builds the full softmax matrix and sums it group by group."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from attnzoo.kernels import grouped_attention, key_group_attention, use_backend
from attnzoo.kernels.reference import key_group_attention_reference

# (batch, heads, kv_heads, q_len, kv_len, head_dim, groups)
CASES = {
    "prefill": (2, 4, 4, 13, 13, 16, 4),
    "gqa-odd": (2, 4, 2, 7, 19, 16, 3),  # queries at the end of a longer key sequence (KV cache)
    "mqa-decode": (3, 4, 1, 1, 21, 8, 4),
    "wide-dim": (1, 2, 1, 9, 9, 40, 5),  # head_dim and group count not powers of two
    "long": (1, 2, 1, 37, 75, 16, 4),  # several query and key tiles in the Triton kernel (online rescaling)
}


def _inputs(case: str, dtype: torch.dtype, gen: torch.Generator, padding: bool = True, mask_kind: str | None = None):
    b, h, hkv, lq, lkv, d, g = CASES[case]
    q = torch.randn(b, h, lq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, lkv, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, lkv, d, generator=gen).to(dtype)
    groups = torch.randint(0, g, (b, lkv), generator=gen)
    if padding:  # left padding of different lengths: group -1 removes the key
        for i in range(b):
            groups[i, : 2 * i] = -1
    mask = None
    if mask_kind is not None:
        mask = torch.rand(b, h if mask_kind == "heads" else 1, lq, lkv, generator=gen) > 0.4
    return q, k, v, groups, g, mask


def _check(out, mass, ref_out, ref_mass, dtype):
    assert out.dtype == torch.float32 and mass.dtype == torch.float32
    # tolerances of the input dtype: on the GPU the kernel rounds the weights to it before the value matmul
    assert_close(out, ref_out, dtype, msg="group outputs")
    assert_close(mass, ref_mass, dtype, msg="group masses")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mask_kind", [None, "shared", "heads"], ids=["causal", "mask", "mask-per-head"])
def test_torch_backend_matches_reference(case, dtype, mask_kind, rng):
    q, k, v, groups, g, mask = _inputs(case, dtype, rng, mask_kind=mask_kind)
    with use_backend("torch"):
        out, mass = key_group_attention(q, k, v, groups, g, mask=mask)
    ref_out, ref_mass = key_group_attention_reference(q, k, v, groups, g, mask=mask)
    _check(out, mass, ref_out, ref_mass, dtype)


def test_torch_backend_chunks_queries(rng, monkeypatch):
    q, k, v, groups, g, _ = _inputs("gqa-odd", torch.float32, rng)
    ref = key_group_attention_reference(q, k, v, groups, g)
    monkeypatch.setattr(grouped_attention, "_TORCH_CHUNK_ELEMENTS", 2 * 4 * 19 * 2)  # 2 queries per chunk
    with use_backend("torch"):
        out, mass = key_group_attention(q, k, v, groups, g)
    _check(out, mass, *ref, torch.float32)


@pytest.mark.parametrize("case,dtype,mask_kind", [
    ("prefill", torch.float32, None),
    ("gqa-odd", torch.bfloat16, None),
    ("mqa-decode", torch.float32, "shared"),
    ("wide-dim", torch.float16, "heads"),
    ("gqa-odd", torch.float32, "heads"),
    ("long", torch.float32, None),
    ("long", torch.bfloat16, "heads"),
])
def test_triton_kernel_matches_reference(case, dtype, mask_kind, rng):
    q, k, v, groups, g, mask = _inputs(case, dtype, rng, mask_kind=mask_kind)
    with use_backend("triton"):
        out, mass = key_group_attention(q, k, v, groups, g, mask=mask)
    _check(out, mass, *key_group_attention_reference(q, k, v, groups, g, mask=mask), dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_groups_add_up_to_plain_attention(backend, rng):
    """Masses sum to 1 per cell and the group outputs to SDPA's output; non-causal too."""
    q, k, v, groups, g, _ = _inputs("gqa-odd", torch.float32, rng, padding=False)
    with use_backend(backend):
        out, mass = key_group_attention(q, k, v, groups, g, causal=False)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    assert_close(out.sum(-2), plain, torch.float32)
    assert_close(mass.sum(-1), torch.ones_like(mass[..., 0]), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_query_without_keys_gets_zeros(backend, rng):
    q, k, v, groups, g, _ = _inputs("prefill", torch.float32, rng, padding=False)
    groups[:, :3] = -1  # causal: the first three queries see only removed keys
    with use_backend(backend):
        out, mass = key_group_attention(q, k, v, groups, g)
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    assert torch.equal(mass[:, :, :3], torch.zeros_like(mass[:, :, :3]))
    assert (mass[:, :, 3:].sum(-1) > 0.99).all()


def test_argument_errors():
    q = torch.randn(1, 4, 5, 8)
    k = v = torch.randn(1, 3, 5, 8)
    groups = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"kv heads \(3\) must divide q heads \(4\)"):
        key_group_attention(q, k, v, groups, 2)
    k = v = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=r"key_groups must be an integer tensor of shape \(batch, kv_length\)"):
        key_group_attention(q, k, v, groups.float(), 2)
    with pytest.raises(ValueError, match="num_groups must be a positive int"):
        key_group_attention(q, k, v, groups, 0)
    with pytest.raises(ValueError, match="mask must be bool of shape"):
        key_group_attention(q, k, v, groups, 2, mask=torch.ones(1, 2, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be a 4-D tensor"):
        key_group_attention(q[0], k, v, groups, 2)


# ---------------------------------------------------------------- var_attention (VAR fused into the epilogue)

def _var_reference(q, k, v, groups, after, image_eps, p, summ, rho, mask=None):
    """Float64 VAR on the explicit softmax matrix: edit the weights of image-centric cells, then multiply by v.
    ``groups`` (B, Lkv) covers every key. Returns (B, Lq, H, D) float64."""
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    rep = heads // k.shape[1]
    kd, vd = (t.double().repeat_interleave(rep, dim=1) for t in (k, v))
    logits = q.double() @ kd.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is None:
        mask = (torch.arange(kv_len - q_len, kv_len)[:, None] >= torch.arange(kv_len)[None, :])[None, None]
    keep = (mask & (groups >= 0)[:, None, None, :]).expand(batch, heads, q_len, kv_len)
    weights = torch.zeros_like(logits)
    rows = keep.any(-1)
    weights[rows] = logits[rows].masked_fill(~keep[rows], float("-inf")).softmax(-1)
    edited = weights.clone()
    for b in range(batch):
        image, vsink, tsink = (groups[b] == g for g in (1, 2, 3))
        sink = vsink | tsink
        for h in range(heads):
            for i in range(q_len):
                w = weights[b, h, i]
                on_image = w[image | vsink].sum()
                share = w[vsink].sum() / (on_image + float(image_eps[b]))
                if not (on_image >= summ and share <= rho and kv_len - q_len + i > int(after[b])):
                    continue
                budget = (1 - p) * w[sink].sum()
                new = w.clone()
                new[sink] = w[sink] * p
                receivers = w[image].sum()
                if receivers > 0:
                    new[image] = w[image] + budget * w[image] / receivers
                edited[b, h, i] = new
    return (edited @ vd).transpose(1, 2)


def _var_inputs(case, dtype, gen, mask_kind=None, prompt_ids=True):
    q, k, v, groups, _, mask = _inputs(case, dtype, gen, mask_kind=mask_kind)
    groups = torch.randint(0, 4, groups.shape, generator=gen).masked_fill(groups < 0, -1)
    batch, kv_len = groups.shape
    if prompt_ids:  # the last keys are generated tokens: group 0, not in the ids handed to var_attention
        groups[:, kv_len - 3:] = 0
    ids = groups[:, : kv_len - 3 if prompt_ids else kv_len].to(torch.int32).contiguous()
    after = torch.tensor([kv_len - q.shape[2] + 1, -1, 2**30][:batch], dtype=torch.int32)
    image_eps = 1e-6 * (groups == 1).sum(-1).float()
    return q, k, v, groups, ids, after, image_eps, mask


VAR_CASES = [("prefill", torch.float32, None), ("gqa-odd", torch.bfloat16, None),
             ("mqa-decode", torch.float32, "shared"), ("long", torch.float16, "heads"),
             ("wide-dim", torch.float32, None)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case,dtype,mask_kind", VAR_CASES, ids=[f"{c}-{str(d)[6:]}-{m}" for c, d, m in VAR_CASES])
def test_var_attention_matches_reference(backend, case, dtype, mask_kind, rng):
    """Selection thresholds that split the cells (some edited, some not), left padding, generated-token keys past
    the ids, a sample whose queries are all before ``redistribute_after`` and one with none."""
    q, k, v, groups, ids, after, image_eps, mask = _var_inputs(case, dtype, rng, mask_kind)
    p, summ, rho = 0.6, 0.2, 0.7
    ref = _var_reference(q, k, v, groups, after, image_eps, p, summ, rho, mask)
    plain = _var_reference(q, k, v, groups, after, image_eps, 1.0, 2.0, rho, mask)  # nothing selected
    assert (ref - plain).abs().amax() > 1e-2, "no cell was edited: the test could not fail"
    with use_backend(backend):
        out = grouped_attention.var_attention(q, k, v, ids, after, image_eps, p, summ, rho, mask=mask)
    assert out.dtype == dtype and out.shape == (q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_var_attention_writes_into_out(backend, rng):
    q, k, v, _, ids, after, image_eps, _ = _var_inputs("gqa-odd", torch.float32, rng)
    out = torch.empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    with use_backend(backend):
        got = grouped_attention.var_attention(q, k, v, ids, after, image_eps, 0.6, 0.2, 0.5, out=out)
        fresh = grouped_attention.var_attention(q, k, v, ids, after, image_eps, 0.6, 0.2, 0.5)
        strided = grouped_attention.var_attention(q, k, v, torch.cat([ids, ids], 1)[:, : ids.shape[1]], after,
                                                  image_eps, 0.6, 0.2, 0.5)  # rows of a wider id buffer
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out, fresh)
    assert torch.equal(strided, fresh)


def test_var_attention_argument_errors():
    q = k = v = torch.randn(1, 2, 5, 8)
    after, eps = torch.zeros(1, dtype=torch.int32), torch.zeros(1)
    with pytest.raises(ValueError, match="key_groups must be contiguous int32"):
        grouped_attention.var_attention(q, k, v, torch.zeros(1, 6, dtype=torch.int32), after, eps, 0.6, 0.2, 0.5)
    with pytest.raises(ValueError, match="redistribute_after must be int32"):
        grouped_attention.var_attention(q, k, v, torch.zeros(1, 5, dtype=torch.int32), after.long(), eps, 0.6, 0.2,
                                        0.5)


def test_int_specialization_is_at_least_as_fine_as_triton():
    """Two integer sets with one specialization key must get one compiled kernel from triton too; otherwise a direct
    launch would replay a kernel compiled for other integers."""
    import itertools

    from attnzoo.kernels._grouped_attention_triton import _int_specialization

    native = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.backends.compiler import BaseBackend

    values = [0, 1, 2, 15, 16, 17, 32, 600, 608, 76800, 77824, 2**31 - 16, 2**31, 2**31 + 16, 2**40, -1, -16]
    for a, b in itertools.product(values, repeat=2):
        if _int_specialization((a,)) == _int_specialization((b,)):
            assert native(BaseBackend, a, False, True, True) == native(BaseBackend, b, False, True, True), (a, b)


class _FakeCompiled:
    packed_metadata = ()


class _FakeKernel:
    """Stands in for a jitted kernel: records normal launches and returns a compiled kernel."""

    def __init__(self):
        self.normal = []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.normal.append(args)
            return _FakeCompiled()
        return launch


class _FakeDirect:
    made: list = []
    calls: list = []

    def __init__(self, compiled, grid, ints, tail):
        self.compiled, self.ints = compiled, ints
        _FakeDirect.made.append(self)

    def __call__(self, ptrs, scalars):
        if any(t.data_ptr() & 15 for t in ptrs):
            return False
        _FakeDirect.calls.append(self.ints)
        return True


def test_direct_launch_reuse(monkeypatch):
    """One normal launch per integer specialization; integer sets of the same specialization (decode steps) reuse the
    compiled kernel through direct launches; misaligned pointers and a disabled launcher take the normal path."""
    from attnzoo.kernels import _grouped_attention_triton as gat
    from attnzoo.kernels import _launch

    kernel = _FakeKernel()
    launches = gat.SpecializedLaunches(kernel)
    monkeypatch.setattr(gat, "_INTERPRETING", False)
    monkeypatch.setattr(_launch, "SUPPORTED", True)
    monkeypatch.setattr(_launch, "DirectLaunch", _FakeDirect)
    _FakeDirect.made, _FakeDirect.calls = [], []
    ptrs = (torch.zeros(8), torch.zeros(8))
    config = (True, 128, torch.bfloat16, True, False, False)

    def launch(ints, p=ptrs, cfg=config):
        launches((1, 32), p, ints, (0.1,), {}, (), cfg, 0)

    launch((610 * 128, 1))  # first: compiles the normal way
    assert len(kernel.normal) == 1 and not _FakeDirect.calls
    launch((610 * 128, 1))  # the next layer of the same step
    launch((611 * 128, 1))  # the next step: same specialization (multiples of 16), new launcher, no compile
    assert len(kernel.normal) == 1 and _FakeDirect.calls == [(610 * 128, 1), (611 * 128, 1)]
    launch((611 * 128 + 1, 1))  # another specialization: normal launch (and compile)
    launch((611 * 128, 1), cfg=(True, 128, torch.float16, True, False, False))  # another dtype: normal launch
    assert len(kernel.normal) == 3
    misaligned = (torch.zeros(9)[1:], torch.zeros(8))
    launch((610 * 128, 1), p=misaligned)  # the cached launcher declines: normal path
    assert len(kernel.normal) == 4 and len(_FakeDirect.calls) == 2
    launches.enabled = False  # neither new nor cached launchers
    launch((612 * 128, 1))
    launch((611 * 128, 1))
    assert len(kernel.normal) == 6 and len(_FakeDirect.calls) == 2
