"""Convert an official checkpoint to a timm-layout safetensors file: ``attnzoo convert SRC DST --model NAME``.

Works for every model timm can build (attnzoo's families included): the source file (``torch.load`` with
``weights_only=True``, or safetensors) is unwrapped (``"model"`` / ``"state_dict"``, or the EMA weights with
``--ema``), passed through the ``checkpoint_filter_fn`` of the module that registered the model, checked
key by key and shape by shape against the freshly built timm model, loaded with ``strict=True``, and written
as safetensors. A file for another model fails with the missing / unexpected / mismatched keys and, where
one of attnzoo's models matches the file exactly, that model's name.

The result loads with ``timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=DST))``.

Only light modules are imported at the top: torch, timm and safetensors load inside the functions.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["CheckpointMismatchError", "add_arguments", "convert_checkpoint", "convert_state_dict", "guess_model",
           "load_checkpoint_file", "run"]

_LIST_LIMIT = 8  # keys shown per list in a mismatch error


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the requested model after conversion.

    Attributes:
        missing: model keys the converted checkpoint lacks.
        unexpected: converted checkpoint keys the model does not have.
        mismatched: ``(key, checkpoint shape, model shape)`` for keys present in both with different shapes.
        guess: attnzoo models whose layout the file matches exactly (may be empty).
    """

    def __init__(self, message: str, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]], guess: list[str]) -> None:
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched, self.guess = missing, unexpected, mismatched, guess


def load_checkpoint_file(path: str | Path, allow_pickle: bool = False) -> dict[str, Any]:
    """Read a checkpoint file onto the CPU.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``
    (``argparse.Namespace`` allowed, as training scripts store their ``args``). ``allow_pickle=True`` falls
    back to full unpickling, which runs code from the file: only for files you trust.

    Returns:
        the loaded object (a dict: a state dict, or a training checkpoint holding one).
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not allow_pickle:
            raise ValueError(
                f"{path} holds Python objects that weights_only loading refuses ({str(err).splitlines()[0]}); "
                "if you trust the file, rerun with --allow-pickle (attnzoo convert) or allow_pickle=True") from err
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict or checkpoint dict")
    return checkpoint


def _unwrap(checkpoint: Mapping[str, Any], use_ema: bool) -> dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint (tensors only), with DDP / torch.compile prefixes removed."""
    import torch

    keys = ("state_dict_ema", "model_ema") if use_ema else ("state_dict", "model")
    found = [k for k in keys if isinstance(checkpoint.get(k), Mapping)]
    if use_ema and not found:
        raise ValueError("EMA weights requested (--ema) but the checkpoint has no state_dict_ema / model_ema; "
                         f"top-level keys: {_short(sorted(map(str, checkpoint)))}")
    state_dict = checkpoint[found[0]] if found else checkpoint
    out = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        out[key] = value
    if not out:
        raise ValueError(f"no tensors found in the checkpoint; top-level keys: {_short(sorted(map(str, checkpoint)))}")
    return out


def _filter_fn(model_name: str, model: Any) -> Callable | None:
    """The ``checkpoint_filter_fn`` of the module that registered ``model_name`` (else of the model's class)."""
    from timm.models import model_entrypoint

    for module_name in (model_entrypoint(model_name).__module__, type(model).__module__):
        fn = getattr(importlib.import_module(module_name), "checkpoint_filter_fn", None)
        if fn is not None:
            return fn
    return None


def _apply_filter(fn: Callable | None, state_dict: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    if fn is None:
        return dict(state_dict)
    try:
        return fn(dict(state_dict), model)
    except TypeError:  # timm filters that take only the state dict
        return fn(dict(state_dict))


def _build(model_name: str, meta: bool) -> Any:
    import timm
    import torch

    if meta:
        with torch.device("meta"):
            return timm.create_model(model_name, pretrained=False)
    return timm.create_model(model_name, pretrained=False)


def _compare(converted: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
             ) -> tuple[list[str], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    mismatched = [(k, tuple(converted[k].shape), tuple(expected[k].shape)) for k in expected
                  if k in converted and tuple(converted[k].shape) != tuple(expected[k].shape)]
    return missing, unexpected, mismatched


def guess_model(state_dict: Mapping[str, torch.Tensor], candidates: Iterable[str] | None = None,
                limit: int = 4) -> list[str]:
    """Names of attnzoo models (or ``candidates``) whose converted layout matches ``state_dict`` exactly.

    Each candidate is built on the meta device (no memory, no init cost; on the CPU if that fails) and the
    state dict is passed through its module's ``checkpoint_filter_fn``; a match needs identical key sets and
    shapes. After the first match only models of the same module are tried (variants that differ in
    non-parameter settings, such as NAT and DiNAT, share a layout); at most ``limit`` names are returned.
    """
    from timm.models import model_entrypoint

    from . import list_models

    matches: list[str] = []
    for name in candidates if candidates is not None else list_models():
        if matches and model_entrypoint(name).__module__ != model_entrypoint(matches[0]).__module__:
            continue
        try:
            try:
                model = _build(name, meta=True)
            except Exception:  # noqa: BLE001 - some inits need real tensors; any failure just means "try the CPU"
                model = _build(name, meta=False)
            converted = _apply_filter(_filter_fn(name, model), dict(state_dict), model)
        except Exception:  # noqa: BLE001 - a filter choking on a foreign layout means "not this model"
            continue
        if not any(_compare(converted, model.state_dict())):
            matches.append(name)
            if len(matches) >= limit:
                break
    return matches


def _short(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f", ... ({len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else "")


def _ordered_candidates(model_name: str) -> list[str]:
    """attnzoo models, those from ``model_name``'s module first (the likeliest mix-up: another size)."""
    from timm.models import model_entrypoint

    from . import list_models

    names = [n for n in list_models() if n != model_name]
    home = model_entrypoint(model_name).__module__
    return sorted(names, key=lambda n: model_entrypoint(n).__module__ != home)


def _check_model_name(model_name: str) -> None:
    import timm

    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=5, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown model {model_name!r}{hint} (`attnzoo info` lists attnzoo's models)")


def convert_state_dict(checkpoint: Mapping[str, Any], model_name: str, use_ema: bool = False
                       ) -> dict[str, torch.Tensor]:
    """Convert a loaded official checkpoint to the timm layout of ``model_name`` and verify it loads strictly.

    Args:
        checkpoint: what :func:`load_checkpoint_file` returned (a state dict or a training checkpoint).
        model_name: a name ``timm.create_model`` knows, e.g. ``"biformer_tiny"``.
        use_ema: take the EMA weights (``state_dict_ema`` / ``model_ema``) instead of ``state_dict`` / ``model``.

    Returns:
        the model's state dict (timm key names, the model's dtypes) after ``load_state_dict(strict=True)``.

    Raises:
        CheckpointMismatchError: keys or shapes differ; the message lists them (truncated) and names the
            attnzoo model the file matches, if any.
        ValueError: ``model_name`` is unknown.
    """
    _check_model_name(model_name)
    state_dict = _unwrap(checkpoint, use_ema)
    # Compare against a meta-device model first: a wrong file then fails fast, without initialising weights.
    try:
        model = _build(model_name, meta=True)
    except Exception:  # noqa: BLE001 - some inits need real tensors
        model = _build(model_name, meta=False)
    fn = _filter_fn(model_name, model)
    try:
        converted = _apply_filter(fn, state_dict, model)
        missing, unexpected, mismatched = _compare(converted, model.state_dict())
        failure = ""
    except Exception as err:  # noqa: BLE001 - reported below together with the likely right model
        missing, unexpected, mismatched = [], [], []
        failure = (f"the checkpoint_filter_fn of {getattr(fn, '__module__', '?')} failed on it "
                   f"({type(err).__name__}: {err})")
    if failure or missing or unexpected or mismatched:
        guess = guess_model(state_dict, _ordered_candidates(model_name))
        parts = [f"checkpoint does not fit {model_name}"]
        if failure:
            parts.append(failure)
        if missing:
            parts.append(f"{len(missing)} missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_short(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches: "
                         + _short([f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in mismatched]))
        if guess:
            parts.append(f"the file looks like a checkpoint for {' or '.join(guess)}: try --model {guess[0]}")
        else:
            parts.append("no attnzoo model matches it exactly")
        raise CheckpointMismatchError("; ".join(parts), missing, unexpected, mismatched, guess)
    if any(t.is_meta for t in model.state_dict().values()):
        # Filters may read the model (shapes, buffers): run it again against the real one.
        model = _build(model_name, meta=False)
        converted = _apply_filter(fn, state_dict, model)
    model.load_state_dict(converted, strict=True)
    return {k: v.detach() for k, v in model.state_dict().items()}


def convert_checkpoint(src: str | Path, dst: str | Path, model_name: str, use_ema: bool = False,
                       allow_pickle: bool = False, overwrite: bool = False) -> dict[str, torch.Tensor]:
    """Read ``src``, convert it for ``model_name`` (:func:`convert_state_dict`), write ``dst`` as safetensors.

    The file's metadata records the model name and the source file name. Returns the written state dict.
    Raises FileExistsError when ``dst`` exists and ``overwrite`` is False.
    """
    from safetensors.torch import save_file

    import attnzoo

    _check_model_name(model_name)
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --force (overwrite=True) to replace it")
    if dst.suffix != ".safetensors":
        raise ValueError(f"destination {dst} must end in .safetensors (timm picks the loader by the suffix)")
    state_dict = convert_state_dict(load_checkpoint_file(src, allow_pickle), model_name, use_ema)
    # safetensors refuses tensors that share storage (tied weights): give each its own copy.
    seen: set[int] = set()
    tensors = {}
    for key, value in state_dict.items():
        ptr = value.untyped_storage().data_ptr()
        tensors[key] = value.clone().contiguous() if ptr in seen else value.contiguous()
        seen.add(ptr)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata={"format": "pt", "attnzoo_model": model_name,
                                           "source": Path(src).name, "attnzoo_version": attnzoo.__version__})
    return tensors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``attnzoo convert``."""
    parser.add_argument("src", help="official checkpoint (.pth/.pt/.bin via torch.load, or .safetensors)")
    parser.add_argument("dst", help="output .safetensors file in the timm layout")
    parser.add_argument("--model", required=True, metavar="NAME", help="timm model name, e.g. biformer_tiny")
    parser.add_argument("--ema", action="store_true", help="convert the EMA weights of a training checkpoint")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow full unpickling when weights_only loading refuses the file (trusted files only)")
    parser.add_argument("--force", action="store_true", help="overwrite DST if it exists")


def run(args: argparse.Namespace) -> int:
    """Run ``attnzoo convert``; returns the exit code (0 ok, 1 checkpoint does not fit, 2 bad arguments)."""
    try:
        tensors = convert_checkpoint(args.src, args.dst, args.model, use_ema=args.ema,
                                     allow_pickle=args.allow_pickle, overwrite=args.force)
    except CheckpointMismatchError as err:
        print(f"attnzoo convert: error: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"attnzoo convert: error: {err}", file=sys.stderr)
        return 2
    params = sum(t.numel() for t in tensors.values())
    print(f"wrote {args.dst}: {len(tensors)} tensors, {params / 1e6:.2f}M values, timm layout of {args.model}")
    print(f"load it with timm.create_model({args.model!r}, pretrained=True, "
          f"pretrained_cfg_overlay=dict(file={str(args.dst)!r}))")
    return 0
