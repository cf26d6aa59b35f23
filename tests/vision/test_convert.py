"""`attnzoo convert`: official checkpoint -> timm-layout safetensors, end to end, and its error paths."""

from __future__ import annotations

import argparse

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_biformer import ARCH, official_state_dict

from attnzoo.cli import build_parser, main
from attnzoo.vision import biformer
from attnzoo.vision.convert import CheckpointMismatchError, convert_state_dict, load_checkpoint_file


class _Opaque:
    """A class weights_only loading refuses (pickled by reference to this test module)."""


@pytest.fixture(scope="module")
def tiny_official(tmp_path_factory):
    """An official-format biformer_tiny training checkpoint: weights under "model", plus args and epoch."""
    sd = official_state_dict(*ARCH["biformer_tiny"], seed=5)
    path = tmp_path_factory.mktemp("ckpt") / "biformer_tiny_in1k.pth"
    torch.save({"model": sd, "epoch": 299, "args": argparse.Namespace(model="biformer_tiny")}, path)
    return path, sd


def test_cli_registers_convert():
    args = build_parser().parse_args(["convert", "a.pth", "b.safetensors", "--model", "biformer_tiny"])
    assert (args.src, args.dst, args.model, args.force) == ("a.pth", "b.safetensors", "biformer_tiny", False)


def test_convert_end_to_end(tiny_official, tmp_path, capsys):
    src, sd = tiny_official
    dst = tmp_path / "biformer_tiny.safetensors"
    assert main(["convert", str(src), str(dst), "--model", "biformer_tiny"]) == 0
    assert "wrote" in capsys.readouterr().out

    with torch.device("meta"):
        layout = timm.create_model("biformer_tiny").state_dict()
    expected = biformer.checkpoint_filter_fn({"model": sd}, None)
    written = load_file(str(dst))
    assert sorted(written) == sorted(layout)
    for key, value in expected.items():
        assert torch.equal(written[key], value), key
    with safe_open(str(dst), "pt") as f:
        assert f.metadata()["attnzoo_model"] == "biformer_tiny"

    # The converted file loads through timm's pretrained path (its filter passes the timm layout through).
    from_file = timm.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(dst)))
    for key, value in from_file.state_dict().items():
        assert torch.equal(value, expected[key]), key

    # An existing destination is kept unless --force.
    assert main(["convert", str(src), str(dst), "--model", "biformer_tiny"]) == 2
    assert "--force" in capsys.readouterr().err


def test_wrong_model_names_keys_and_the_right_model(tiny_official, tmp_path, capsys):
    src, _ = tiny_official
    dst = tmp_path / "out.safetensors"
    assert main(["convert", str(src), str(dst), "--model", "biformer_small"]) == 1
    err = capsys.readouterr().err
    assert "checkpoint does not fit biformer_small" in err
    assert "missing keys: stages.0.blocks.2." in err
    assert "more)" in err  # long key lists are truncated
    assert "looks like a checkpoint for biformer_tiny" in err
    assert not dst.exists()

    with pytest.raises(CheckpointMismatchError) as info:
        convert_state_dict(torch.load(src, weights_only=False), "biformer_base")
    assert info.value.guess[:1] == ["biformer_tiny"]
    assert ("stages.0.blocks.0.attn.qkv.weight", (192, 64), (288, 96)) in info.value.mismatched


def test_unknown_model_and_unsafe_file(tmp_path, capsys):
    assert main(["convert", "missing.pth", str(tmp_path / "x.safetensors"), "--model", "biformer_tinyy"]) == 2
    assert "closest: biformer_tiny" in capsys.readouterr().err

    path = tmp_path / "opaque.pth"
    torch.save({"model": {"w": torch.ones(2)}, "extra": _Opaque()}, path)
    with pytest.raises(ValueError, match="--allow-pickle"):
        load_checkpoint_file(path)
    assert torch.equal(load_checkpoint_file(path, allow_pickle=True)["model"]["w"], torch.ones(2))
