"""Train the tiny LLaVA of the offline hallucination testbed on the synthetic scenes (:mod:`attnzoo.eval.scenes`).

The model is :func:`attnzoo.mllm.tiny.build_tiny_llava` (CLIP-style vision tower, 2-layer MLP projector,
LLaMA decoder, all small) with a byte-level BPE tokenizer trained on the scene vocabulary
(:func:`tokenizer_corpus`). It learns two tasks, in the exact prompt formats the evaluation uses
(:data:`attnzoo.eval.tasks.TASKS`, LLaVA-1.5 chat template):

- captioning: ``Please describe this image in detail.`` -> the scene's template caption;
- yes/no questions: ``Is there a {object} in the image?`` + LLaVA's short-answer suffix -> ``Yes`` (an object
  of the scene) or ``No`` (an object drawn uniformly from the absent categories), half each.

The loss is the cross-entropy of the answer tokens (and the closing ``</s>``) only. Training scenes carry the
strong co-occurrence prior (``cooccurrence=0.9``), so absent companions are rarely asked about in training:
that is the shortcut POPE-adversarial probes on an evaluation split with held-out statistics.

Training is resumable: every ``checkpoint_every`` steps ``<out>/checkpoint/`` receives the model and processor
(``save_pretrained``) and ``trainer_state.pt`` (step, optimizer, scheduler, torch RNG, losses). The batch of
step ``s`` is drawn from a generator seeded by ``(seed, s)``, so a resumed run repeats the loss sequence of an
uninterrupted one exactly. The finished model is written to ``<out>/model/`` (``attnzoo.mllm.load(...)``).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from attnzoo._logging import get_logger

from .pope import ANSWER_SUFFIX, question_text
from .scenes import CAPTION_TEMPLATES, CATEGORIES, TRAIN_COOCCURRENCE, caption_for, generate_scenes

logger = get_logger("eval.testbed")

CAPTION_PROMPT = "Please describe this image in detail."
STATE_FILE = "trainer_state.pt"


@dataclass
class TrainConfig:
    """Everything that decides the trained weights (stored in ``<out>/train_config.json``; a resume must match).

    Shapes: images ``image_size`` px, ``(image_size // patch_size) ** 2`` image tokens; vision tower and LLaMA
    both ``hidden_size`` wide. Optimiser: AdamW, linear warm-up over ``warmup`` steps then cosine to 0.
    """

    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    seed: int = 0
    num_images: int = 4000
    cooccurrence: float = TRAIN_COOCCURRENCE
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_layers: int = 4
    vocab_size: int = 512
    caption_fraction: float = 0.25
    checkpoint_every: int = 100

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of ``asdict``; unknown keys raise ``ValueError``."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def tokenizer_corpus() -> list[str]:
    """Sentences the testbed tokenizer is trained on: every POPE question, caption prompt, answers, and
    captions of every object pair in both caption templates (so every scene word is one or two tokens)."""
    names = list(CATEGORIES)
    corpus = [question_text(n) + ANSWER_SUFFIX for n in names]
    # answers follow "ASSISTANT:" after a space, as in training and generation
    corpus += [CAPTION_PROMPT, "USER: ASSISTANT: Yes", "USER: ASSISTANT: No"]
    for t in CAPTION_TEMPLATES:
        corpus += ["ASSISTANT: " + caption_for([a, b], t) for a in names for b in names if a != b]
    return corpus


def build_testbed_model(config: TrainConfig) -> tuple[Any, Any]:
    """The untrained tiny LLaVA and its processor for ``config`` (seeded by ``config.seed``), float32."""
    from attnzoo.mllm.tiny import build_tiny_llava

    return build_tiny_llava(
        seed=config.seed, image_size=config.image_size, patch_size=config.patch_size,
        hidden_size=config.hidden_size, num_layers=config.num_layers, num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads, vision_layers=config.vision_layers, corpus=tokenizer_corpus(),
        vocab_size=config.vocab_size,
    )


class SceneData:
    """The training scenes in memory: RGB images and per-image object names / captions (from the COCO files)."""

    def __init__(self, root: str | Path, split: str) -> None:
        from PIL import Image

        from .coco import CocoDataset

        coco = CocoDataset(root, split, captions=True)
        self.ids = coco.image_ids()
        self.objects = [coco.objects(i) for i in self.ids]
        self.captions = [coco.reference_captions(i)[0] for i in self.ids]
        self.images = [Image.open(coco.image_path(i)).convert("RGB") for i in self.ids]
        self.names = sorted(coco.category_names.values())

    def __len__(self) -> int:
        return len(self.ids)

    def sample(self, rng: random.Random, batch_size: int, caption_fraction: float) -> list[tuple[Any, str, str]]:
        """``batch_size`` training examples ``(image, user prompt, answer)`` drawn with ``rng``."""
        out = []
        for _ in range(batch_size):
            k = rng.randrange(len(self))
            if rng.random() < caption_fraction:
                out.append((self.images[k], CAPTION_PROMPT, self.captions[k]))
                continue
            present = self.objects[k]
            if rng.random() < 0.5:
                obj, answer = rng.choice(present), "Yes"
            else:
                obj, answer = rng.choice([n for n in self.names if n not in present]), "No"
            out.append((self.images[k], question_text(obj) + ANSWER_SUFFIX, answer))
        return out


def encode_batch(lvlm: Any, examples: list[tuple[Any, str, str]]) -> dict[str, Any]:
    """Processor inputs (right-padded) with ``labels``: the answer tokens and ``</s>``, -100 elsewhere.

    The text of each example is the chat-templated prompt (as :meth:`LVLM.render` writes it for generation)
    followed by ``" " + answer + "</s>"``; raises ``RuntimeError`` if the answer does not tokenize the same
    inside the sequence as alone (the prompt/answer boundary would then be wrong).
    """
    processor = lvlm.processor
    tok = processor.tokenizer
    texts, answer_ids = [], []
    for _, prompt, answer in examples:
        suffix = " " + answer + tok.eos_token
        texts.append(lvlm.render(prompt) + suffix)
        answer_ids.append(tok(suffix, add_special_tokens=False)["input_ids"])
    tok.padding_side = "right"
    try:
        inputs = processor(images=[e[0] for e in examples], text=texts, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = "left"
    labels = inputs["input_ids"].clone().fill_(-100)
    lengths = inputs["attention_mask"].sum(1).tolist()
    for b, (ids, n) in enumerate(zip(answer_ids, lengths)):
        seq = inputs["input_ids"][b, n - len(ids):n].tolist()
        if seq != ids:
            raise RuntimeError(f"answer tokens {ids} not found at the end of sample {b} ({seq}); the tokenizer "
                               "merges across the prompt/answer boundary")
        labels[b, n - len(ids):n] = inputs["input_ids"][b, n - len(ids):n]
    inputs["labels"] = labels
    return inputs


def _lr_lambda(config: TrainConfig):
    def fn(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return fn


def _save_checkpoint(out: Path, model: Any, processor: Any, state: dict[str, Any]) -> None:
    """Write ``out/checkpoint`` through a temporary folder so a kill mid-write leaves the previous one intact."""
    import torch

    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    torch.save(state, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _latest_checkpoint(out: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):  # .old only survives a kill between the two renames
        if (out / name / STATE_FILE).is_file():
            return out / name
    return None


def train(out: str | Path, config: TrainConfig | None = None, *, resume: bool = False,
          data_root: str | Path | None = None, progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume training) the testbed model in ``out``.

    Args:
        out: run folder: ``train_config.json``, ``checkpoint/``, ``train_log.jsonl`` (step, loss, lr per step),
            ``model/`` when finished. Training scenes are generated in ``out/scenes`` unless ``data_root``
            (a folder from :func:`attnzoo.eval.scenes.generate_scenes` with a ``train`` split) is given.
        config: hyper-parameters; on resume None means the stored ones, and a different one raises ``ValueError``.
        resume: continue from ``out/checkpoint`` (model, optimizer, scheduler, RNG, step); without it a folder
            holding a checkpoint is refused.
        stop_after: stop (after checkpointing) once this global step is reached, as an interruption would;
            for tests and time-boxed runs.

    Returns:
        ``{"step", "losses" (every step's mean answer-token loss so far), "model_dir" (None if unfinished)}``.
    """
    import torch
    from tqdm.auto import tqdm

    from attnzoo.mllm import wrap

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "train_config.json"
    ckpt = _latest_checkpoint(out)
    if ckpt is not None and not resume:
        raise ValueError(f"{out} already holds a training checkpoint; pass resume=True (--resume) to continue it or "
                         "choose an empty --out folder")
    if config_path.is_file():
        stored = TrainConfig.from_dict(json.loads(config_path.read_text()))
        if config is None:
            config = stored
        elif resume and ckpt is not None and config != stored:
            diff = {k: (v, getattr(config, k)) for k, v in asdict(stored).items() if getattr(config, k) != v}
            raise ValueError(f"{out} was trained with other settings {diff} (stored, asked); resume with the same "
                             "settings or use another --out folder")
    config = config or TrainConfig()
    config_path.write_text(json.dumps(asdict(config), indent=2))

    if data_root is None:
        data_root = out / "scenes"
        if not (Path(data_root) / "annotations" / "instances_train.json").is_file():
            generate_scenes(data_root, "train", config.num_images, seed=config.seed,
                            cooccurrence=config.cooccurrence, image_size=config.image_size, progress=progress)
    data = SceneData(data_root, "train")

    torch.manual_seed(config.seed)
    model, processor = build_testbed_model(config)
    step, losses = 0, []
    if ckpt is not None:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    model.train()
    lvlm = wrap(model, processor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    if ckpt is not None:
        state = torch.load(ckpt / STATE_FILE, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        step, losses = state["step"], list(state["losses"])
        logger.info("resuming %s at step %d", ckpt, step)
    log_path = out / "train_log.jsonl"
    # drop log lines of steps after the checkpoint: they are about to be redone
    kept = [ln for ln in (log_path.read_text().splitlines() if log_path.is_file() else [])
            if ln.strip() and json.loads(ln)["step"] <= step]
    log_path.write_text("".join(ln + "\n" for ln in kept))

    last = config.steps if stop_after is None else min(config.steps, stop_after)
    bar = tqdm(total=config.steps, initial=step, desc="testbed train", disable=not progress)
    with log_path.open("a") as log:
        while step < last:
            examples = data.sample(random.Random(f"{config.seed}-{step}"), config.batch_size, config.caption_fraction)
            inputs = encode_batch(lvlm, examples)
            loss = model(**inputs).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(loss.item())
            log.write(json.dumps({"step": step, "loss": losses[-1], "lr": scheduler.get_last_lr()[0]}) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if step % config.checkpoint_every == 0 or step == last:
                _save_checkpoint(out, model, processor, {
                    "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(), "losses": losses})
    bar.close()
    model_dir = None
    if step >= config.steps:
        model.eval()
        model_dir = out / "model"
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
        logger.info("finished %d steps; model in %s", step, model_dir)
    return {"step": step, "losses": losses, "model_dir": model_dir}
