"""Train and evaluate the tiny LLaVA of the offline hallucination testbed (scenes: :mod:`attnzoo.eval.scenes`).

The model is :func:`attnzoo.mllm.tiny.build_tiny_llava` (CLIP-style vision tower, 2-layer MLP projector,
LLaMA decoder, all small) with a byte-level BPE tokenizer trained on the scene vocabulary
(:func:`tokenizer_corpus`). It learns two tasks, in the exact prompt formats the evaluation uses
(:data:`attnzoo.eval.tasks.TASKS`, LLaVA-1.5 chat template):

- captioning: ``Please describe this image in detail.`` -> the scene's template caption;
- yes/no questions: ``Is there a {object} in the image?`` + LLaVA's short-answer suffix -> ``Yes`` (an object
  of the scene) or ``No`` (an object drawn uniformly from the absent categories), half each.

Before that, a first stage trains the vision tower and projector alone for multi-label recognition with
:class:`WordAlignedHead`, which puts each object's image tokens near the LM's embedding of its name (see
:class:`TrainConfig`); without it the LM never learned to use the image for yes/no answers (docs/testbed.md).

The loss is the cross-entropy of the answer tokens (and the closing ``</s>``) only. Training scenes carry the
strong co-occurrence prior (``cooccurrence=0.9``), so absent companions are rarely asked about in training:
that is the shortcut POPE-adversarial probes on an evaluation split with held-out statistics.

Training is resumable: every ``checkpoint_every`` steps ``<out>/checkpoint/`` receives the model and processor
(``save_pretrained``) and ``trainer_state.pt`` (step, stage, head, optimizer, scheduler, torch RNG, losses). The
batch of step ``s`` is drawn from a generator seeded by ``(seed, s)``, so a resumed run repeats the loss sequence of
an uninterrupted one exactly. The finished model is written to ``<out>/model/`` (``attnzoo.mllm.load(...)``).

:func:`evaluate_testbed` runs POPE (3 splits) and CHAIR per pass combination on a scene split (``attnzoo demo``);
the shipped weights load as ``attnzoo.mllm.load("attnzoo/testbed-llava")``.
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
    both ``hidden_size`` wide. Two stages, each AdamW with linear warm-up over ``warmup`` steps then cosine to 0:

    1. ``vision_steps`` steps (batch ``vision_batch_size``, lr ``vision_lr``): the vision tower alone learns
       multi-label object recognition (binary cross-entropy of a linear head on the max over the image-token
       features LLaVA reads, layer ``vision_feature_layer``); the head is dropped afterwards.
    2. ``steps`` steps (batch ``batch_size``, lr ``lr``, the tower at ``lr * tower_lr_scale``): the whole LLaVA on
       captions (``caption_fraction`` of the examples) and yes/no questions, loss on the answer tokens.

    Both stages flip images horizontally at random and shift them by up to ``max_shift`` pixels (edge pixels
    repeated); the captions and object lists do not depend on positions.
    """

    steps: int = 4000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    seed: int = 0
    num_images: int = 16000
    cooccurrence: float = TRAIN_COOCCURRENCE
    image_size: int = 64
    patch_size: int = 16
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_layers: int = 4
    vocab_size: int = 512
    caption_fraction: float = 0.25
    checkpoint_every: int = 100
    vision_steps: int = 1200
    vision_batch_size: int = 64
    vision_lr: float = 3e-3
    tower_lr_scale: float = 0.1
    max_shift: int = 8

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

    def pixel_values(self, image_processor: Any, chunk: int = 500) -> Any:
        """Every image through ``image_processor`` (the model's preprocessing): float32 ``(N, 3, H, W)``."""
        import torch

        return torch.cat([image_processor(self.images[i:i + chunk], return_tensors="pt")["pixel_values"]
                          for i in range(0, len(self), chunk)])

    def targets(self) -> Any:
        """Multi-label object presence: float32 ``(N, len(self.names))``, 1 where the category is in the scene."""
        import torch

        y = torch.zeros(len(self), len(self.names))
        for k, objs in enumerate(self.objects):
            y[k, [self.names.index(o) for o in objs]] = 1.0
        return y


def augment(pixel_values: Any, gen: Any, max_shift: int) -> Any:
    """Random horizontal flip (p = 1/2) and shift by up to ``max_shift`` pixels per axis, per image.

    ``pixel_values``: ``(B, 3, H, W)`` float; the shifted-in border repeats the edge pixels. ``gen`` is the
    ``torch.Generator`` the draws come from. Returns a new tensor of the same shape.
    """
    import torch
    import torch.nn.functional as F

    b, _, h, w = pixel_values.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], pixel_values.flip(-1), pixel_values)
    if max_shift <= 0:
        return x
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def image_features(model: Any, pixel_values: Any) -> Any:
    """The vision features LLaVA feeds its projector: layer ``vision_feature_layer`` of the tower, CLS dropped
    (the "default" strategy); ``(B, image tokens, vision hidden)``."""
    layer = model.config.vision_feature_layer
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[layer]
    return hidden[:, 1:]


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


class WordAlignedHead:
    """Stage-1 recognition head that scores image tokens against the language model's word embeddings.

    The logit of category ``c`` is ``exp(log_scale) * max_t <z_t, e_c> + bias_c``, where ``z_t`` are the projected
    image tokens (what the LM reads) and ``e_c`` the mean input embedding of the tokens of `` name_c`` (as the
    question spells it), fixed at the LM's initial embeddings. Trained with the tower and the projector, it puts
    each object's image tokens near the embedding of its name (LLaVA's feature alignment): then "is there a
    {name}" can be answered by comparing the question's word with the image tokens, a comparison a randomly
    initialised LM picks up quickly, whereas features in an unrelated space leave it guessing for thousands of steps.
    """

    def __init__(self, model: Any, tokenizer: Any, names: list[str]) -> None:
        import torch

        emb = model.get_input_embeddings().weight.detach()
        ids = [tokenizer(" " + n, add_special_tokens=False)["input_ids"] for n in names]
        self.words = torch.stack([emb[i].mean(0) for i in ids])  # (C, d)
        self.module = torch.nn.ParameterDict({
            "log_scale": torch.nn.Parameter(torch.zeros(())), "bias": torch.nn.Parameter(torch.zeros(len(names)))})

    def to(self, device: Any) -> WordAlignedHead:
        self.words = self.words.to(device)
        self.module.to(device)
        return self

    def __call__(self, model: Any, pixel_values: Any) -> Any:
        """Logits ``(B, C)`` of every category for a batch of images ``(B, 3, H, W)``."""
        z = model.model.multi_modal_projector(image_features(model, pixel_values))  # (B, T, d)
        scores = (z @ self.words.T).amax(1)  # (B, C): the best-matching image token per category
        return scores * self.module["log_scale"].exp() + self.module["bias"]


def _lr_lambda(warmup: int, steps: int):
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
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


def _optimizer(config: TrainConfig, model: Any, stage: str, head: Any) -> tuple[Any, Any]:
    """AdamW + warm-up/cosine schedule of a stage: "vision" (tower, projector, head) or "llava" (all, tower slower)."""
    import torch

    tower = list(model.model.vision_tower.parameters())
    if stage == "vision":
        projector = list(model.model.multi_modal_projector.parameters())
        groups = [{"params": tower + projector + list(head.module.parameters()), "lr": config.vision_lr}]
        warmup, steps = min(config.warmup, config.vision_steps), config.vision_steps
    else:
        tower_ids = {id(p) for p in tower}
        rest = [p for p in model.parameters() if id(p) not in tower_ids]
        groups = [{"params": rest, "lr": config.lr}, {"params": tower, "lr": config.lr * config.tower_lr_scale}]
        warmup, steps = min(config.warmup, config.steps), config.steps
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup, steps))


def train(out: str | Path, config: TrainConfig | None = None, *, resume: bool = False,
          data_root: str | Path | None = None, progress: bool = True, stop_after: int | None = None,
          device: str | None = None) -> dict[str, Any]:
    """Train (or resume training) the testbed model in ``out``: the two stages of :class:`TrainConfig`.

    Args:
        out: run folder: ``train_config.json``, ``checkpoint/``, ``train_log.jsonl`` (global step, stage, loss,
            lr per step), ``model/`` when finished. Training scenes are generated in ``out/scenes`` unless
            ``data_root`` (a folder from :func:`attnzoo.eval.scenes.generate_scenes` with a ``train`` split) is
            given.
        config: hyper-parameters; on resume None means the stored ones, and a different one raises ``ValueError``.
        resume: continue from ``out/checkpoint`` (model, recognition head, optimizer, scheduler, RNG, step); without
            it a folder holding a checkpoint is refused.
        stop_after: stop (after checkpointing) once this global step (vision steps count first) is reached, as an
            interruption would; for tests and time-boxed runs.
        device: where to train ("cpu" by default, "cuda"); checkpoints and the model are saved from there.

    Returns:
        ``{"step" (global), "vision_losses" (recognition loss per vision step), "losses" (mean answer-token loss per
        LLaVA step), "model_dir" (None if unfinished)}``.
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
    head = WordAlignedHead(model, processor.tokenizer, data.names)
    step, losses, vision_losses = 0, [], []
    state = None
    if ckpt is not None:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
        state = torch.load(ckpt / STATE_FILE, weights_only=False)
        head.module.load_state_dict(state["head"])
        step, losses, vision_losses = state["step"], list(state["losses"]), list(state["vision_losses"])
        logger.info("resuming %s at step %d", ckpt, step)
    device = torch.device(device or "cpu")
    model.to(device)
    head.to(device)
    model.train()
    lvlm = wrap(model, processor)
    total = config.vision_steps + config.steps
    log_path = out / "train_log.jsonl"
    # drop log lines of steps after the checkpoint: they are about to be redone
    kept = [ln for ln in (log_path.read_text().splitlines() if log_path.is_file() else [])
            if ln.strip() and json.loads(ln)["step"] <= step]
    log_path.write_text("".join(ln + "\n" for ln in kept))

    last = total if stop_after is None else min(total, stop_after)
    bar = tqdm(total=total, initial=step, desc="testbed train", disable=not progress)
    stage, optimizer, scheduler = None, None, None
    pixels = targets = None
    with log_path.open("a") as log:
        while step < last:
            want = "vision" if step < config.vision_steps else "llava"
            if want != stage:
                stage = want
                optimizer, scheduler = _optimizer(config, model, stage, head)
                if state is not None and state["stage"] == stage:  # resuming inside this stage
                    optimizer.load_state_dict(state["optimizer"])
                    scheduler.load_state_dict(state["scheduler"])
                    torch.set_rng_state(state["torch_rng"])
                if stage == "vision" and pixels is None:
                    pixels = data.pixel_values(processor.image_processor).to(device)
                    targets = data.targets().to(device)
                bar.set_description(f"testbed train ({stage})")
            rng = random.Random(f"{config.seed}-{step}")
            gen = torch.Generator().manual_seed(rng.randrange(2**63))
            if stage == "vision":
                idx = torch.tensor([rng.randrange(len(data)) for _ in range(config.vision_batch_size)], device=device)
                logits = head(model, augment(pixels[idx].cpu(), gen, config.max_shift).to(device))
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets[idx])
                params = [p for g in optimizer.param_groups for p in g["params"]]
            else:
                inputs = encode_batch(lvlm, data.sample(rng, config.batch_size, config.caption_fraction))
                inputs["pixel_values"] = augment(inputs["pixel_values"], gen, config.max_shift)
                loss = model(**inputs.to(device)).loss
                params = list(model.parameters())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            (vision_losses if stage == "vision" else losses).append(loss.item())
            log.write(json.dumps({"step": step, "stage": stage, "loss": loss.item(),
                                  "lr": scheduler.get_last_lr()[0]}) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % config.checkpoint_every == 0 or step == last:
                _save_checkpoint(out, model, processor, {
                    "step": step, "stage": stage, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "losses": losses,
                    "vision_losses": vision_losses, "head": head.module.state_dict()})
    bar.close()
    model_dir = None
    if step >= total:
        model.eval()
        model_dir = out / "model"
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
        logger.info("finished %d steps; model in %s", step, model_dir)
    return {"step": step, "vision_losses": vision_losses, "losses": losses, "model_dir": model_dir}


# ------------------------------------------------------------------------------------------ evaluation

BUNDLED_NAME = "attnzoo/testbed-llava"
TABLE_COLUMNS = ("passes", "benchmark", "accuracy", "F1", "yes-ratio", "yes on absent companions", "CHAIR_s",
                 "CHAIR_i", "time")


def companion_yes_rate(records: list[dict[str, Any]], image_objects: dict[str, Any]) -> tuple[float | None, int]:
    """Share of "yes" answers to POPE questions about an *absent companion* of a present object.

    ``records``: answer records (``image`` path, ``text`` question, ``label``, ``answer``); ``image_objects``:
    file name -> object names. These questions are where the training prior (companions almost always together)
    pushes towards a hallucinated "yes". Returns ``(rate in [0, 1] or None when there is none, number of such
    questions)``.
    """
    from .pope import parse_yes_no
    from .scenes import companion

    asked = []
    for r in records:
        if r["label"] != "no":
            continue
        obj = r["text"].removeprefix("Is there ").removesuffix(" in the image?")
        obj = obj.removeprefix("an ") if obj.startswith("an ") else obj.removeprefix("a ")
        if any(companion(o) == obj for o in image_objects[Path(r["image"]).name]):
            asked.append(parse_yes_no(r["answer"]) == "yes")
    return (sum(asked) / len(asked) if asked else None), len(asked)


def testbed_pass(name: str, lvlm: Any, images: list[Any], seed: int | None = None) -> Any:
    """The registered pass ``name`` with its paper defaults, set up for ``lvlm`` where a pass needs per-model
    settings: VAR gets the model's sink dimensions from :func:`attnzoo.mitigation.var.find_sink_dims` on
    ``images`` (PIL images; the published ones exist only for LLaVA-1.5 and the like). A pass with a random
    part and an unset ``seed`` field (CausalMM's counterfactuals and sampling) gets ``seed``, so a table is
    reproducible run to run."""
    import dataclasses

    from attnzoo.mitigation import get

    if name == "var":
        from attnzoo.mitigation.var import find_sink_dims

        return get("var", sink_dims=find_sink_dims(lvlm, images))
    made = get(name)
    if seed is not None and getattr(made, "seed", 0) is None and dataclasses.is_dataclass(made):
        made = dataclasses.replace(made, seed=seed)
    return made


def evaluate_testbed(lvlm: Any, data_root: str | Path, out: str | Path, *, split: str = "eval",
                     pope_images: int = 100, chair_images: int = 50, passes: list[list[str]] | None = None,
                     batch_size: int = 32, pope_max_new_tokens: int = 4, chair_max_new_tokens: int = 40,
                     seed: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """POPE (random, popular, adversarial) and CHAIR of ``lvlm`` on a scene split, once per pass combination.

    Args:
        lvlm: an :class:`attnzoo.mllm.LVLM` (the bundled ``"attnzoo/testbed-llava"`` or a trained model).
        data_root, split: a folder from :func:`attnzoo.eval.scenes.generate_scenes` (``annotations/``, images).
        out: run folders ``out/<benchmark>_<passes>/`` (answers, results; a rerun resumes them).
        pope_images: images sampled for POPE (each gives 3 yes and 3 no questions per split, so 6 x this many
            questions per split); chair_images: images described for CHAIR.
        passes: pass combinations by registry name, e.g. ``[[], ["var"], ["vhr"]]`` (``[]`` is the baseline);
            default: the baseline and every registered pass alone (:func:`attnzoo.mitigation.available`). Each
            is built by :func:`testbed_pass` (VAR's sink dimensions found on 8 images of the split).
        pope_max_new_tokens, chair_max_new_tokens: generation limits (the model answers "Yes"/"No" and
            one-sentence captions, so short limits lose nothing).

    Returns:
        One row per (pass combination, benchmark) with the :data:`TABLE_COLUMNS` keys, numbers as fractions in
        [0, 1] (``None`` where a column does not apply) and ``time`` in seconds of generation.
    """
    import time

    import torch

    from .chair import Chair, coco_ground_truth
    from .coco import CocoDataset
    from .evaluate import execute, mitigation_label, plan_chair, plan_pope
    from .pope import build_all_splits, read_jsonl
    from .runner import MERGED_FILE, available_passes, prepare_output

    if passes is None:
        passes = [[]] + [[p] for p in available_passes()]
    dataset = CocoDataset(data_root, split, captions=True)
    image_objects = dataset.image_objects()
    questions = build_all_splits(image_objects, num_images=pope_images, seed=seed, image_ids=dataset.file_to_id())
    chair_ids = dataset.sample_image_ids(chair_images, seed)
    truth = coco_ground_truth(Chair(), dataset, chair_ids)
    chair_list = [(i, str(dataset.image_path(i))) for i in chair_ids]
    out = Path(out)
    from PIL import Image

    probe_images = [Image.open(dataset.image_path(i)).convert("RGB") for i in chair_ids[:8]]
    rows: list[dict[str, Any]] = []
    for combo in passes:
        label = mitigation_label(combo)
        names = [testbed_pass(n, lvlm, probe_images, seed=seed) for n in combo]
        plans = [(f"POPE {s}", plan_pope(q, dataset.image_dir, split=s, model=BUNDLED_NAME, mitigation=names,
                                         gen_kwargs={"max_new_tokens": pope_max_new_tokens}))
                 for s, q in questions.items()]
        plans.append(("CHAIR", plan_chair(chair_list, truth, model=BUNDLED_NAME, split=split, mitigation=names,
                                          gen_kwargs={"max_new_tokens": chair_max_new_tokens})))
        for bench, plan in plans:
            folder = out / f"{bench.lower().replace(' ', '_')}_{label}"
            prepare_output(folder, plan.config)
            torch.manual_seed(seed)  # passes that sample (CausalMM) draw from the global generator: same table per seed
            t0 = time.perf_counter()
            result = execute(lvlm, plan, folder, batch_size=batch_size, progress=progress, model_label=BUNDLED_NAME)
            seconds = time.perf_counter() - t0
            m = result["metrics"]
            row: dict[str, Any] = dict.fromkeys(TABLE_COLUMNS)
            row.update(passes=label, benchmark=bench, time=seconds)
            if plan.task == "pope":
                rate, _ = companion_yes_rate(read_jsonl(folder / MERGED_FILE), image_objects)
                row.update({"accuracy": m["accuracy"], "F1": m["f1"], "yes-ratio": m["yes_ratio"],
                            "yes on absent companions": rate})
            else:
                row.update(CHAIR_s=m["chair_s"], CHAIR_i=m["chair_i"])
            rows.append(row)
    return rows


def format_testbed_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`evaluate_testbed` rows: fractions as percentages (1 decimal), time in seconds."""
    def cell(key: str, value: Any) -> str:
        if value is None:
            return "-"
        if key == "time":
            return f"{value:.1f} s"
        if isinstance(value, float):
            return f"{100 * value:.1f}"
        return str(value)

    cells = [[cell(k, r.get(k)) for k in TABLE_COLUMNS] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(TABLE_COLUMNS)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(TABLE_COLUMNS, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)
