"""The package skeleton: import cost, CLI behaviour, logging, backend selection, test helpers."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from helpers import assert_close

from attnzoo import cli


def _run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "attnzoo.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_import_is_light():
    # timm itself imports triton; what matters is what attnzoo adds on top of `import torch, timm`.
    code = (
        "import sys, torch, timm\n"
        "before = set(sys.modules)\n"
        "import attnzoo\n"
        "heavy = ('transformers', 'triton', 'open_clip', 'pycocotools', 'albumentations', 'accelerate')\n"
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before if m.split('.')[0] in heavy}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"import attnzoo pulled in heavy modules: {out}"


def test_registered_models_are_timm_models():
    import timm

    import attnzoo

    for name in attnzoo.vision.list_models():
        assert name in timm.list_models(name), name


def test_unknown_subcommand_exits_2():
    res = _run("frobnicate")
    assert res.returncode == 2
    assert "usage:" in res.stderr


def test_unknown_option_exits_2():
    res = _run("info", "--no-such-option")
    assert res.returncode == 2
    assert "usage:" in res.stderr


def test_demo_unknown_model_names_closest(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        cli._select_models(["nat_tinny"], ["nat_tiny", "nat_mini", "biformer_tiny"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "nat_tinny" in err and "nat_tiny" in err


def test_demo_skip_testbed_alone_is_refused(capsys):
    """--skip-testbed without a vision option would run nothing: exit 2 with the fix in the message."""
    args = cli.build_parser().parse_args(["demo", "--skip-testbed"])
    assert cli.cmd_demo(args) == 2
    assert "--vision" in capsys.readouterr().err


def test_demo_select_globs():
    assert cli._select_models(["nat_*"], ["nat_tiny", "nat_mini", "dinat_tiny"]) == ["nat_tiny", "nat_mini"]
    assert cli._select_models(None, ["a", "b"]) == ["a", "b"]


def test_info_runs():
    res = _run("info")
    assert res.returncode == 0, res.stderr
    assert "torch" in res.stdout and "kernel backends" in res.stdout


def test_format_table():
    text = cli.format_table([{"a": 1, "b": "xy"}, {"a": 22}], ["a", "b"])
    assert text.splitlines()[0] == "| a  | b  |"
    assert text.splitlines()[3] == "| 22 | -  |"


def test_backend_override_and_errors(caplog):
    from attnzoo.kernels import resolve_backend, set_backend, use_backend

    with pytest.raises(ValueError, match="unknown kernel backend"):
        set_backend("cuda")
    assert resolve_backend("cpu", "test_op") == "torch"
    with use_backend("flex"):
        assert resolve_backend("cpu", "test_op") == "flex"
    assert resolve_backend("cpu", "test_op") == "torch"
    with caplog.at_level(logging.INFO, logger="attnzoo"):
        resolve_backend("cpu", "test_op_logged")
        resolve_backend("cpu", "test_op_logged")
    assert sum("test_op_logged" in r.message for r in caplog.records) == 1


def test_assert_close_helper_fails_outside_tolerance():
    ref = torch.randn(16, dtype=torch.float64)
    assert_close(ref.float(), ref)
    with pytest.raises(AssertionError):
        assert_close((ref + 1e-2).float(), ref)
    with pytest.raises(AssertionError):
        assert_close(torch.full((16,), float("nan")), ref)
    assert_close(ref.bfloat16(), ref)
