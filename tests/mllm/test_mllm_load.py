"""Tiny builders, save/reload through attnzoo.mllm.load, family detection and its errors."""

from __future__ import annotations

import pytest
import torch
from mllm_testing import ALL_FAMILIES, FAMILIES, PROMPTS, images

from attnzoo.mllm import ARCHITECTURES, LVLM, build_tiny, load


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_build_save_reload(family, tmp_path):
    model, processor = build_tiny(family, tmp_path / family, seed=3)
    size = sum(f.stat().st_size for f in (tmp_path / family).iterdir())
    assert size < 5e6, f"tiny {family} is {size / 1e6:.1f} MB"
    lvlm = load(tmp_path / family)
    assert isinstance(lvlm, LVLM) and lvlm.family == family
    assert lvlm.model.config._attn_implementation == "attnzoo"
    assert lvlm.num_layers == 2 and lvlm.num_heads == 4 and lvlm.num_kv_heads == 2 and lvlm.head_dim == 16
    assert len(lvlm.decoder_layers) == 2 and len(lvlm.vision_layers) == 2
    # the weights round-trip exactly
    reloaded = lvlm.model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(reloaded[k], v), k
    # and the reloaded model runs and answers through the chat template
    out = lvlm.generate(images(), PROMPTS, max_new_tokens=3)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)


@pytest.mark.parametrize("family", FAMILIES)
def test_builder_deterministic(family):
    a, pa = build_tiny(family, seed=1)
    b, pb = build_tiny(family, seed=1)
    c, _ = build_tiny(family, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point() and sa[k].ndim == 2)
    assert pa.tokenizer.get_vocab() == pb.tokenizer.get_vocab()


def test_load_dtype(tmp_path):
    build_tiny("llava", tmp_path / "m")
    lvlm = load(tmp_path / "m", dtype="bfloat16", attn_backend="eager")
    assert lvlm.dtype == torch.bfloat16 and lvlm.attn_backend == "eager"
    batch = lvlm.prepare(images()[:1], PROMPTS[:1])
    assert batch.inputs["pixel_values"].dtype == torch.bfloat16


def test_unsupported_architecture(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError) as err:
        load(tmp_path / "llama")
    msg = str(err.value)
    assert "LlamaForCausalLM" in msg
    for arch in ARCHITECTURES:
        assert arch in msg


def test_bad_backend(tmp_path):
    with pytest.raises(ValueError, match="attn_backend 'flash' not supported"):
        load(tmp_path, attn_backend="flash")
