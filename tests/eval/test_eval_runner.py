"""The runner: JSONL records, resume after an interruption or a torn write, configuration check, passes,
and the same on a tiny LLaVA (attnzoo.mllm), incl. a 2-process gloo run under torchrun."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attnzoo.eval import EvalItem, build_questions, merge, plan_pope, prepare_output, read_records, run
from attnzoo.eval.evaluate import mitigation_label
from attnzoo.eval.runner import answered


class FakeLVLM:
    """Answers ``"<prompt> @ <image size>"``; records every prompt it is asked; can fail after N calls."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.asked: list[str] = []
        self.calls = 0
        self.fail_after = fail_after
        self.active_passes: list[str] = []

    def generate(self, images, prompts, **gen_kwargs):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        self.asked += prompts
        tag = "+".join(self.active_passes)
        return [f"{p} @ {im.size[1]} {tag} {gen_kwargs.get('max_new_tokens')}" for p, im in zip(prompts, images)]


@pytest.fixture
def items(tmp_path):
    rng = np.random.default_rng(0)
    out = []
    for i in range(7):
        path = tmp_path / f"img{i}.png"
        Image.fromarray((rng.random((8 + i, 8, 3)) * 255).astype("uint8")).save(path)
        out.append(EvalItem(f"q{i}", str(path), f"prompt {i}", {"label": "yes" if i % 2 else "no"}))
    return out


CONFIG = {"task": "test", "model": "fake"}


def test_records_in_item_order_with_meta(tmp_path, items):
    lvlm = FakeLVLM()
    recs = run(lvlm, items, tmp_path / "out", CONFIG, batch_size=3, gen_kwargs={"max_new_tokens": 5}, progress=False)
    assert [r["id"] for r in recs] == [it.id for it in items]
    assert recs[2]["answer"] == "prompt 2 @ 10  5" and recs[2]["label"] == "no" and recs[2]["batch"] == 3
    assert recs[6]["batch"] == 1 and all(r["time_s"] >= 0 for r in recs)
    assert lvlm.calls == 3
    merged = [json.loads(x) for x in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert merged == recs


def test_resume_after_interruption_asks_nothing_twice(tmp_path, items):
    out = tmp_path / "out"
    first = FakeLVLM(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        run(first, items, out, CONFIG, batch_size=2, progress=False)
    assert len(read_records(out / "answers.rank0.jsonl")) == 4  # two batches were on disk before the kill
    second = FakeLVLM()
    recs = run(second, items, out, CONFIG, batch_size=2, progress=False)
    assert sorted(first.asked + second.asked) == sorted(it.prompt for it in items)  # each asked exactly once
    assert second.asked == ["prompt 4", "prompt 5", "prompt 6"]
    assert [r["answer"] for r in recs] == [r["answer"] for r in run(FakeLVLM(), items, tmp_path / "fresh", CONFIG,
                                                                     batch_size=2, progress=False)]
    third = FakeLVLM()
    run(third, items, out, CONFIG, batch_size=2, progress=False)
    assert third.calls == 0  # everything answered


def test_torn_last_line_is_discarded_and_the_item_asked_again(tmp_path, items):
    out = tmp_path / "out"
    run(FakeLVLM(), items[:3], out, CONFIG | {"n": 3}, batch_size=8, progress=False)
    shard = out / "answers.rank0.jsonl"
    good = shard.read_bytes()
    lines = good.splitlines(keepends=True)
    shard.write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # kill -9 in the middle of a write
    assert [r["id"] for r in read_records(shard)] == ["q0", "q1"]
    lvlm = FakeLVLM()
    recs = run(lvlm, items[:3], out, CONFIG | {"n": 3}, batch_size=8, progress=False)
    assert lvlm.asked == ["prompt 2"] and [r["id"] for r in recs] == ["q0", "q1", "q2"]
    assert shard.read_bytes().count(b"\n") == 3 and all(json.loads(x) for x in shard.read_bytes().splitlines())
    # a complete record that only lost its newline is kept (and terminated before appending)
    shard.write_bytes(shard.read_bytes()[:-1])
    lvlm = FakeLVLM()
    run(lvlm, items[:3], out, CONFIG | {"n": 3}, progress=False)
    assert lvlm.calls == 0 and shard.read_bytes().endswith(b"}\n")


_KILLED_WORKER = """
import json, os, signal, sys
from attnzoo.eval import EvalItem, run

items = [EvalItem(**it) for it in json.loads(sys.argv[2])]
real_fsync = os.fsync
durable = {"batches": 0}


def fsync_then_die(fd):
    real_fsync(fd)
    if os.readlink(f"/proc/self/fd/{fd}").endswith("answers.rank0.jsonl"):
        durable["batches"] += 1
        if durable["batches"] == 2:  # two batches on disk; die half-way through writing the next record
            os.write(fd, b'{"id": "q4", "image": "img4.png", "answ')
            os.kill(os.getpid(), signal.SIGKILL)


class Echo:
    def generate(self, images, prompts, **kw):
        return [p.upper() for p in prompts]


os.fsync = fsync_then_die
run(Echo(), items, sys.argv[1], {"task": "kill"}, batch_size=2, progress=False)
"""


def test_kill_9_in_the_middle_of_a_write(tmp_path, items):
    out = tmp_path / "out"
    script = tmp_path / "worker.py"
    script.write_text(_KILLED_WORKER)
    payload = json.dumps([{"id": it.id, "image": it.image, "prompt": it.prompt, "meta": it.meta} for it in items])
    proc = subprocess.run([sys.executable, str(script), str(out), payload], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    shard = out / "answers.rank0.jsonl"
    assert shard.read_bytes().count(b"\n") == 4 and not shard.read_bytes().endswith(b"\n")  # a torn 5th line
    lvlm = FakeLVLM()
    recs = run(lvlm, items, out, {"task": "kill"}, batch_size=2, progress=False)
    assert lvlm.asked == ["prompt 4", "prompt 5", "prompt 6"]  # the torn one is asked again, nothing twice
    assert [r["answer"] for r in recs[:4]] == [f"PROMPT {i}" for i in range(4)]
    assert [r["id"] for r in read_records(shard)] == [f"q{i}" for i in range(7)]


def test_different_configuration_is_refused(tmp_path, items):
    run(FakeLVLM(), items[:2], tmp_path, CONFIG, progress=False)
    with pytest.raises(ValueError, match="different configuration.*model: 'fake' there, 'other' now"):
        run(FakeLVLM(), items[:2], tmp_path, {"task": "test", "model": "other"}, progress=False)
    prepare_output(tmp_path, CONFIG)  # the same configuration is accepted


def test_merge_reports_missing_answers(tmp_path, items):
    run(FakeLVLM(), items[:2], tmp_path, CONFIG, progress=False)
    with pytest.raises(RuntimeError, match="5 of 7 items have no answer"):
        merge(tmp_path, items)


def test_mitigation_passes_resolved_lazily_and_applied(tmp_path, items, monkeypatch):
    import attnzoo.mitigation as mitigation

    with pytest.raises(ValueError, match="unknown mitigation pass 'fancy'"):
        run(FakeLVLM(), items, tmp_path / "a", CONFIG, mitigation=["fancy"], progress=False)

    class Tagger:
        def __init__(self, name="tag"):
            self.name = name

        @contextlib.contextmanager
        def apply(self, lvlm):
            lvlm.active_passes.append(self.name)
            yield self
            lvlm.active_passes.remove(self.name)

    monkeypatch.setattr(mitigation, "available", lambda: ["tag", "other"], raising=False)
    monkeypatch.setattr(mitigation, "get", lambda name: Tagger if name == "tag" else Tagger("other"), raising=False)
    lvlm = FakeLVLM()
    recs = run(lvlm, items[:2], tmp_path / "b", CONFIG, mitigation=["tag", "other"], progress=False)
    assert recs[0]["answer"] == "prompt 0 @ 8 tag+other None" and lvlm.active_passes == []
    with pytest.raises(ValueError, match="valid: other, tag"):
        run(lvlm, items[:2], tmp_path / "c", CONFIG, mitigation=["tag", "nope"], progress=False)
    # pass objects (hyper-parameters set by the caller) are used as they are and recorded in the plan's config
    custom = Tagger("custom")
    custom.config = lambda: {"alpha": 0.5}
    recs = run(lvlm, items[:1], tmp_path / "d", CONFIG, mitigation=[custom], progress=False)
    assert recs[0]["answer"].endswith("custom None")
    plan = plan_pope(build_questions({"a.jpg": ["dog", "cat", "cup"], "b.jpg": ["car", "bus", "kite"]}, "random"),
                     tmp_path, split="random", model="m", mitigation=["tag", custom])
    assert plan.config["mitigation"] == [{"name": "tag"}, {"name": "custom", "alpha": 0.5}]
    assert mitigation_label(plan.mitigation) == "tag+custom"


# ------------------------------------------------------------------------------ tiny LLaVA (attnzoo.mllm)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    from attnzoo.mllm import build_tiny_llava

    path = tmp_path_factory.mktemp("tiny_llava")
    build_tiny_llava(path, seed=0)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(folder: Path) -> dict[str, str]:
    return {r["id"]: r["answer"] for r in read_records(folder / "answers.jsonl")}


@pytest.fixture
def one_thread():
    """One intra-op thread, as the torchrun workers (OMP_NUM_THREADS=1): the same CPU kernels, the same floats."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_llava_pope_resume_and_two_process_gloo(tmp_path, coco_root, tiny_llava, monkeypatch, one_thread):
    from attnzoo.cli import main
    from attnzoo.mllm import LVLM

    args = ["--model", str(tiny_llava), "--coco-root", str(coco_root), "--num-images", "3", "--split", "adversarial",
            "--max-new-tokens", "2", "--device", "cpu", "--no-progress"]
    # 1) interrupted run: the model dies on its third generate call; then resume
    real_generate = LVLM.generate
    calls = {"n": 0}

    def dying_generate(self, images, prompts, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real_generate(self, images, prompts, **kw)

    single = tmp_path / "single"
    monkeypatch.setattr(LVLM, "generate", dying_generate)
    with pytest.raises(KeyboardInterrupt):
        main(["eval", "pope", *args, "--batch-size", "1", "--out", str(single)])
    run_dir = single / "pope_adversarial_none"
    assert len(answered(run_dir)) == 2
    monkeypatch.setattr(LVLM, "generate", real_generate)
    assert main(["eval", "pope", *args, "--batch-size", "1", "--out", str(single)]) == 0
    recs = read_records(run_dir / "answers.jsonl")
    assert len(recs) == 18 and len({r["id"] for r in recs}) == 18
    assert recs[0]["prompt"].endswith("\nAnswer the question using a single word or phrase.")
    result = json.loads((single / "pope_results.json").read_text())[0]
    assert result["metrics"]["n"] == 18 and result["split"] == "adversarial"

    # 2) the same run sharded over 2 processes (torchrun, gloo on the CPU) merges to the same answers and metrics
    sharded = tmp_path / "sharded"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "attnzoo.cli", "eval", "pope", *args, "--batch-size", "1", "--out", str(sharded)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shard_dir = sharded / "pope_adversarial_none"
    assert sorted(p.name for p in shard_dir.glob("answers.rank*.jsonl")) == ["answers.rank0.jsonl",
                                                                             "answers.rank1.jsonl"]
    assert {r["rank"] for r in read_records(shard_dir / "answers.jsonl")} == {0, 1}
    assert _answers(shard_dir) == _answers(run_dir)
    merged = json.loads((sharded / "pope_results.json").read_text())[0]
    assert merged["metrics"] == result["metrics"]


def test_tiny_llava_chair_batched(tmp_path, coco_root, tiny_llava):
    from attnzoo.cli import main

    out = tmp_path / "runs"
    assert main(["eval", "chair", "--model", str(tiny_llava), "--coco-root", str(coco_root), "--num-images", "4",
                 "--max-new-tokens", "4", "--batch-size", "3", "--device", "cpu", "--no-progress",
                 "--out", str(out)]) == 0
    recs = read_records(out / "chair_val2014_none" / "answers.jsonl")
    assert [r["batch"] for r in recs] == [3, 3, 3, 1]
    assert recs[0]["prompt"] == "Please describe this image in detail."
    m = json.loads((out / "chair_results.json").read_text())[0]["metrics"]
    assert m["n"] == 4 and 0.0 <= m["chair_s"] <= 1.0
