"""The evaluation runner shared by POPE and CHAIR: batched, resumable, sharded generation.

:func:`run` answers a list of :class:`~attnzoo.eval.tasks.EvalItem` with an ``LVLM`` (``attnzoo.mllm``),
optionally under mitigation passes, and keeps everything it answers on disk as it goes::

    OUT/config.json            what was asked (task, model, passes, prompts, generation settings, question
                               set fingerprint); a later run with a different configuration is refused
    OUT/answers.rank<R>.jsonl  one JSON line per answer of process R, appended and fsync'd per batch
    OUT/answers.jsonl          all answers merged in item order (written by rank 0 at the end)

On restart every item already in some ``answers.rank*.jsonl`` is skipped, so nothing answered is lost or
asked twice. A kill in the middle of a write can leave a torn last line: it is detected (no newline or not
JSON) and cut off before appending resumes. Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1)
item ``i`` belongs to rank ``i % world_size``; ranks meet at a barrier (gloo) and every rank then reads the
merged answers.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from attnzoo._logging import get_logger

from .results import write_json
from .tasks import EvalItem

logger = get_logger("eval.runner")

CONFIG_FILE = "config.json"
MERGED_FILE = "answers.jsonl"


# ------------------------------------------------------------------------------------- mitigation


def available_passes() -> list[str]:
    """Names of the registered mitigation passes (empty while ``attnzoo.mitigation`` has no registry)."""
    module = importlib.import_module("attnzoo.mitigation")
    available = getattr(module, "available", None)
    return sorted(available()) if callable(available) else []


def pass_name(p: Any) -> str:
    """The registry name of a pass given by name or as an object (its ``name`` attribute)."""
    return p if isinstance(p, str) else str(getattr(p, "name", None) or type(p).__name__.lower())


def describe_pass(p: Any) -> dict[str, Any]:
    """``{"name": ..., **hyper-parameters}`` of a pass object (its ``config()``), for config and result files."""
    config = p.config() if callable(getattr(p, "config", None)) else {}
    return {"name": pass_name(p), **config}


def check_passes(passes: Sequence[Any]) -> None:
    """Raise ``ValueError`` for unknown pass names, listing the valid ones; pass objects are taken as they are."""
    names = [pass_name(p) for p in passes]
    if len(set(names)) != len(names):
        raise ValueError(f"mitigation pass listed twice: {names}")
    wanted = [p for p in passes if isinstance(p, str)]
    if not wanted:
        return
    valid = available_passes()
    unknown = [n for n in wanted if n not in valid]
    if unknown:
        listed = ", ".join(valid) if valid else "none are registered yet (attnzoo.mitigation has no passes)"
        raise ValueError(f"unknown mitigation pass{'es' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))};"
                         f" valid: {listed}")


def resolve_passes(passes: Sequence[Any]) -> list[Any]:
    """Pass objects: names go through ``attnzoo.mitigation.get`` (the paper's defaults; a registered class is
    instantiated), objects (e.g. ``VAR(first_layer=1)``) are kept."""
    check_passes(passes)
    if not any(isinstance(p, str) for p in passes):
        return list(passes)
    get = importlib.import_module("attnzoo.mitigation").get
    out = []
    for p in passes:
        obj = get(p) if isinstance(p, str) else p
        out.append(obj() if isinstance(obj, type) else obj)
    return out


@contextlib.contextmanager
def applied(lvlm: Any, passes: Sequence[Any]) -> Iterator[None]:
    """Apply every pass to ``lvlm`` (``pass.apply(lvlm)`` is a context manager) for the duration of the block."""
    with contextlib.ExitStack() as stack:
        for p in passes:
            stack.enter_context(p.apply(lvlm))
        yield


# --------------------------------------------------------------------------------- configuration


def items_fingerprint(items: Sequence[EvalItem]) -> str:
    """SHA-256 over the ids, image file names and prompts of ``items`` (order included)."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.id, Path(it.image).name, it.prompt]).encode())
    return h.hexdigest()[:16]


def prepare_output(out_dir: str | Path, config: Mapping[str, Any]) -> Path:
    """Create ``out_dir`` and record ``config`` there, or check it equals the recorded one.

    Raises:
        ValueError: the folder holds answers of a different configuration (naming the differing keys);
            results are never mixed, so choose another ``--out`` or delete the folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_FILE
    config = json.loads(json.dumps(dict(config), default=str))  # normalise (tuples -> lists) for comparison
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(recorded) | set(config) if recorded.get(k) != config.get(k))
        if diff:
            details = "; ".join(f"{k}: {recorded.get(k)!r} there, {config.get(k)!r} now" for k in diff[:4])
            raise ValueError(f"{out} holds results of a different configuration ({details}); refusing to mix them: "
                             "pass another --out or delete that folder")
    else:
        write_json(path, config)
    return out


# --------------------------------------------------------------------------------------- records


def read_records(path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """The answer records of one JSONL shard; a torn last line is skipped (and cut off when ``repair``).

    A line counts once it ends with a newline and parses as a JSON object with an ``id``. With ``repair``
    a complete but unterminated last record gets its newline, anything else after the last newline is
    truncated, so that appending can resume safely.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    records = []
    for n, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d is not JSON; ignoring it (was the file edited by hand?)", path, n)
            continue
        if isinstance(rec, dict) and "id" in rec:
            records.append(rec)
    tail = data[end:]
    if tail.strip():
        try:
            rec = json.loads(tail)
            complete = isinstance(rec, dict) and "id" in rec
        except json.JSONDecodeError:
            complete = False
        if complete:
            records.append(rec)
            if repair:
                with open(path, "ab") as f:
                    f.write(b"\n")
                    f.flush()
                    os.fsync(f.fileno())
        else:
            logger.warning("%s: discarding a torn last line (%d bytes) left by an interrupted write", path, len(tail))
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(end)
                    f.flush()
                    os.fsync(f.fileno())
    elif tail and repair:
        with open(path, "r+b") as f:
            f.truncate(end)
    return records


def shard_files(out_dir: str | Path) -> list[Path]:
    """The per-rank answer files in ``out_dir`` (any world size of earlier runs)."""
    return sorted(Path(out_dir).glob("answers.rank*.jsonl"))


def answered(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``{item id: record}`` of every answer in the folder's shards (first answer wins)."""
    out: dict[str, dict[str, Any]] = {}
    for path in shard_files(out_dir):
        for rec in read_records(path):
            out.setdefault(str(rec["id"]), rec)
    return out


# ----------------------------------------------------------------------------------- distribution


def distributed_context() -> tuple[int, int]:
    """``(rank, world_size)``; joins the process group (gloo) when launched with ``WORLD_SIZE`` > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        import torch.distributed as dist
    except ImportError:  # a torch build without distributed support
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if world <= 1:
        return 0, 1
    # gloo only carries the barriers here (no tensors), so it serves CPU and GPU runs alike.
    dist.init_process_group("gloo", timeout=timedelta(hours=4))
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def finish_distributed() -> None:
    """Leave the process group if one was joined (call once at the end of a launched program)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- run


def _load_images(paths: Sequence[str]) -> list[Any]:
    from PIL import Image

    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    return images


def run(lvlm: Any, items: Sequence[EvalItem], out_dir: str | Path, config: Mapping[str, Any], *,
        batch_size: int = 8, gen_kwargs: Mapping[str, Any] | None = None, mitigation: Sequence[Any] = (),
        progress: bool = True, desc: str = "eval") -> list[dict[str, Any]]:
    """Answer ``items`` with ``lvlm.generate`` and return one record per item, in item order.

    Args:
        lvlm: an ``attnzoo.mllm`` LVLM (anything with ``generate(images, prompts, **gen_kwargs) -> list[str]``).
        items: what to ask; ids must be unique.
        out_dir: the run folder (see the module docstring); checked against ``config`` first.
        config: the run's configuration, recorded in ``config.json`` (see :func:`prepare_output`).
        batch_size: prompts per ``generate`` call (per process).
        gen_kwargs: passed to ``generate`` (e.g. ``max_new_tokens``, ``do_sample``).
        mitigation: passes applied together while generating: registry names (``attnzoo.mitigation.get``,
            the paper's defaults) or pass objects.
        progress: show a tqdm bar (one per rank) on stderr.
        desc: the bar's label.

    Returns:
        Records ``{"id", "image", "prompt", "answer", "time_s", "batch", "rank", **item.meta}``; ``time_s`` is
        the item's share of its batch's ``generate`` time in seconds.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError("item ids must be unique within a run")
    passes = resolve_passes(list(mitigation))
    out = prepare_output(out_dir, config)
    rank, world = distributed_context()
    shard_path = out / f"answers.rank{rank}.jsonl"
    read_records(shard_path, repair=True)  # cut a torn tail of our own shard before appending to it
    done = set(answered(out))
    mine = [it for i, it in enumerate(items) if i % world == rank]
    todo = [it for it in mine if it.id not in done]
    if done:
        logger.info("rank %d: resuming, %d of its %d items already answered", rank, len(mine) - len(todo), len(mine))
    gen_kwargs = dict(gen_kwargs or {})

    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=desc if world == 1 else f"{desc} [rank {rank}]",
               unit="item", disable=not progress, position=rank if world > 1 else None, file=sys.stderr,
               dynamic_ncols=True)
    with applied(lvlm, passes), open(shard_path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            images = _load_images([it.image for it in batch])
            t0 = time.perf_counter()
            answers = lvlm.generate(images, [it.prompt for it in batch], **gen_kwargs)
            elapsed = time.perf_counter() - t0
            if len(answers) != len(batch):
                raise RuntimeError(f"generate returned {len(answers)} answers for a batch of {len(batch)} prompts")
            for it, answer in zip(batch, answers):
                rec = {"id": it.id, **it.meta, "image": Path(it.image).name, "prompt": it.prompt,
                       "answer": answer, "time_s": elapsed / len(batch), "batch": len(batch), "rank": rank}
                f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())  # the batch is on disk before the next one starts
            bar.update(len(batch))
    bar.close()
    _barrier(world)
    return merge(out, items, write=rank == 0)


def merge(out_dir: str | Path, items: Sequence[EvalItem], write: bool = True) -> list[dict[str, Any]]:
    """Collect the shards' answers to ``items`` in item order (and write ``answers.jsonl`` when ``write``).

    Raises:
        RuntimeError: some item has no answer (a shard is missing or a rank failed).
    """
    found = answered(out_dir)
    missing = [it.id for it in items if it.id not in found]
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(items)} items have no answer in {out_dir} (first: {missing[:5]}); "
                           "run again to answer them")
    records = [found[it.id] for it in items]
    if write:
        path = Path(out_dir) / MERGED_FILE
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return records


def throughput(records: Sequence[Mapping[str, Any]]) -> float:
    """Items per second of generation time (per process): ``len(records) / sum(time_s)``."""
    total = sum(float(r.get("time_s", 0.0)) for r in records)
    return len(records) / total if total > 0 else float("nan")
