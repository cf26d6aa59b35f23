"""Tiny, randomly initialised LLaVA / LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL models built fully offline.

Each builder returns ``(model, processor)`` with a byte-level BPE tokenizer trained in-process on a small
fixed corpus, the family's image processor and chat template, and random weights drawn from a seeded
generator, so the same arguments give the same bytes. With ``save_dir`` the pair is written with
``save_pretrained`` and loads back through :func:`attnzoo.mllm.load` (or plain ``from_pretrained``).

The models are a few MB and build in about a second on one CPU core: they exist for tests, the offline
testbed and CPU smoke runs of benchmarks, not for meaningful outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .templates import CHAT_TEMPLATES

# Words the tokenizer is trained on: template words plus the 80 COCO category names, so prompts and captions
# about everyday scenes tokenize into short sequences.
_COCO_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign parking "
    "meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase "
    "frisbee skis snowboard sports ball kite baseball bat glove skateboard surfboard tennis racket bottle wine "
    "glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot dog pizza donut cake chair "
    "couch potted plant bed dining table toilet tv laptop mouse remote keyboard cell phone microwave oven toaster "
    "sink refrigerator book clock vase scissors teddy bear hair drier toothbrush"
)
_CORPUS = [
    "Is there a {} in the image? Answer the question using a single word or phrase.",
    "Yes, there is a {} in the image.",
    "No, there is no {} in the image.",
    "Please describe this image in detail. The image shows a {} next to a table.",
    "A photo of a {} on the street, with people walking and a car parked nearby.",
    "There is a {}, isn't there? What color is the {}?",
]


def default_corpus() -> list[str]:
    """The sentences the tiny tokenizers are trained on (template sentences x COCO category names)."""
    names = _COCO_NAMES.split()
    return [t.format(n, n) for n in names for t in _CORPUS]


def build_tokenizer(
    special_tokens: dict[str, str] | None = None,
    extra_tokens: tuple[str, ...] = (),
    vocab_size: int = 400,
    corpus: list[str] | None = None,
    bos_token: str | None = "<s>",
    eos_token: str = "</s>",
    pad_token: str = "<pad>",
    unk_token: str | None = "<unk>",
) -> Any:
    """Train a byte-level BPE tokenizer in-process and wrap it in ``PreTrainedTokenizerFast``.

    Args:
        special_tokens: named multimodal tokens, e.g. ``{"image_token": "<image>"}``; exposed as attributes
            (``tokenizer.image_token``, ``tokenizer.image_token_id``) as the processors expect.
        extra_tokens: further special tokens (chat markers such as ``<|im_start|>``) that must never be split.
        vocab_size: BPE vocabulary size including the 256 byte symbols and the special tokens.
        corpus: training sentences; :func:`default_corpus` when omitted.

    Training is deterministic (a fixed corpus, no sampling), so the vocabulary is the same on every call.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special_tokens = dict(special_tokens or {})
    specials = [t for t in (pad_token, bos_token, eos_token, unk_token) if t is not None]
    specials += [t for t in (*special_tokens.values(), *extra_tokens) if t not in specials]
    tok = Tokenizer(models.BPE(unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or default_corpus(), trainer=trainer)
    if bos_token is not None:
        # LLaMA-style: every encoded prompt starts with BOS.
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, tok.token_to_id(bos_token))],
        )
    kwargs: dict[str, Any] = dict(tokenizer_object=tok, eos_token=eos_token, pad_token=pad_token)
    if bos_token is not None:
        kwargs["bos_token"] = bos_token
    if unk_token is not None:
        kwargs["unk_token"] = unk_token
    if special_tokens:
        kwargs["extra_special_tokens"] = special_tokens
    tokenizer = PreTrainedTokenizerFast(**kwargs)
    if extra_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
    tokenizer.padding_side = "left"
    return tokenizer


def _seeded_init(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Re-draw every floating parameter from one seeded generator: normal(0, std) for matrices and
    embeddings, ones for norm weights, zeros for biases, so the weights depend only on ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                p.zero_()
            elif p.ndim == 1 and ("norm" in name or "ln" in name.lower() or leaf == "weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)
            if leaf == "image_newline" or name.endswith("image_newline"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))


def _text_kwargs(tokenizer: Any, hidden: int, layers: int, heads: int, kv_heads: int) -> dict[str, Any]:
    return dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def _finish(model: torch.nn.Module, processor: Any, seed: int, save_dir: str | Path | None) -> tuple[Any, Any]:
    _seeded_init(model, seed)
    model.eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(save_dir)
        processor.save_pretrained(save_dir)
    return model, processor


def build_tiny_llava(
    save_dir: str | Path | None = None,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_layers: int = 2,
    corpus: list[str] | None = None,
    vocab_size: int = 400,
) -> tuple[Any, Any]:
    """A tiny LLaVA-1.5 (``LlavaForConditionalGeneration``: CLIP vision tower, 2-layer MLP projector, LLaMA).

    Args:
        save_dir: if given, ``save_pretrained`` the model and processor there.
        seed: seeds the weights (the tokenizer is deterministic by itself).
        image_size, patch_size: the vision tower sees ``(image_size // patch_size) ** 2`` patches + CLS;
            LLaVA's "default" strategy drops CLS, so each image becomes that many image tokens (16 by default).
        hidden_size, num_layers, num_heads, num_kv_heads: the language model's shape (GQA when kv < heads).
        vision_layers: CLIP encoder depth; LLaVA takes the features of layer -2.
        corpus, vocab_size: tokenizer training data and size (see :func:`build_tokenizer`).

    Returns:
        ``(model, processor)``: model in float32, eval mode; processor with the LLaVA-1.5 chat template.
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = build_tokenizer({"image_token": "<image>"}, corpus=corpus, vocab_size=vocab_size)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATES["llava"],
    )
    vision = CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=vision_layers,
        num_attention_heads=num_heads, image_size=image_size, patch_size=patch_size, projection_dim=hidden_size,
    )
    text = LlamaConfig(**_text_kwargs(tokenizer, hidden_size, num_layers, num_heads, num_kv_heads))
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    config.pad_token_id = tokenizer.pad_token_id
    model = LlavaForConditionalGeneration(config)
    return _finish(model, processor, seed, save_dir)


def build_tiny_llava_next(
    save_dir: str | Path | None = None,
    *,
    seed: int = 0,
    image_size: int = 16,
    patch_size: int = 4,
    grid_pinpoints: tuple[tuple[int, int], ...] = ((16, 32), (32, 16), (32, 32)),
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_layers: int = 2,
    corpus: list[str] | None = None,
    vocab_size: int = 400,
) -> tuple[Any, Any]:
    """A tiny LLaVA-NeXT (``LlavaNextForConditionalGeneration``: any-resolution tiles + image newline tokens).

    Each image is resized onto the best of ``grid_pinpoints`` (pixels), cut into ``image_size`` tiles, and
    becomes a base tile of ``(image_size // patch_size) ** 2`` tokens followed by the unpadded high-resolution
    grid with one newline token closing each row. Other arguments as in :func:`build_tiny_llava`; the chat
    template is LLaVA-NeXT-Mistral's (``[INST] <image>\\n... [/INST]``).
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer = build_tokenizer({"image_token": "<image>"}, extra_tokens=("[INST]", "[/INST]"),
                                corpus=corpus, vocab_size=vocab_size)
    pinpoints = [list(p) for p in grid_pinpoints]
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATES["llava_next"],
    )
    vision = CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=vision_layers,
        num_attention_heads=num_heads, image_size=image_size, patch_size=patch_size, projection_dim=hidden_size,
    )
    text = LlamaConfig(**_text_kwargs(tokenizer, hidden_size, num_layers, num_heads, num_kv_heads))
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id,
        image_grid_pinpoints=pinpoints, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    config.pad_token_id = tokenizer.pad_token_id
    model = LlavaNextForConditionalGeneration(config)
    return _finish(model, processor, seed, save_dir)


QWEN_SPECIAL = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}


def build_tiny_qwen2_vl(
    save_dir: str | Path | None = None,
    *,
    seed: int = 0,
    patch_size: int = 4,
    merge_size: int = 2,
    min_pixels: int = 16 * 16,
    max_pixels: int = 32 * 32,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_layers: int = 2,
    corpus: list[str] | None = None,
    vocab_size: int = 400,
) -> tuple[Any, Any]:
    """A tiny Qwen2-VL (``Qwen2VLForConditionalGeneration``: native-resolution ViT, 2x2 patch merger, M-RoPE).

    Images are resized so their pixel count lies in ``[min_pixels, max_pixels]`` with sides multiple of
    ``patch_size * merge_size``; each image becomes ``(h / patch / merge) * (w / patch / merge)`` tokens between
    ``<|vision_start|>`` and ``<|vision_end|>``. The chat template is Qwen2-VL's (ChatML with a system turn).
    """
    return _build_tiny_qwen("qwen2_vl", save_dir, seed, patch_size, merge_size, min_pixels, max_pixels,
                            hidden_size, num_layers, num_heads, num_kv_heads, vision_layers, corpus, vocab_size)


def build_tiny_qwen2_5_vl(
    save_dir: str | Path | None = None,
    *,
    seed: int = 0,
    patch_size: int = 4,
    merge_size: int = 2,
    min_pixels: int = 16 * 16,
    max_pixels: int = 32 * 32,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_layers: int = 2,
    corpus: list[str] | None = None,
    vocab_size: int = 400,
) -> tuple[Any, Any]:
    """A tiny Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): as :func:`build_tiny_qwen2_vl`, with
    Qwen2.5-VL's windowed vision attention (window of ``2 * patch_size * merge_size`` pixels; the last
    vision layer attends over the full image, as ``fullatt_block_indexes`` does in the real model)."""
    return _build_tiny_qwen("qwen2_5_vl", save_dir, seed, patch_size, merge_size, min_pixels, max_pixels,
                            hidden_size, num_layers, num_heads, num_kv_heads, vision_layers, corpus, vocab_size)


def _build_tiny_qwen(version: str, save_dir: str | Path | None, seed: int, patch_size: int, merge_size: int,
                     min_pixels: int, max_pixels: int, hidden_size: int, num_layers: int, num_heads: int,
                     num_kv_heads: int, vision_layers: int, corpus: list[str] | None,
                     vocab_size: int) -> tuple[Any, Any]:
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tokenizer = build_tokenizer(
        QWEN_SPECIAL, extra_tokens=("<|im_start|>", "<|im_end|>"), corpus=corpus, vocab_size=vocab_size,
        bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
    )
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=patch_size, merge_size=merge_size,
                                            temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(size=size, patch_size=patch_size, merge_size=merge_size,
                                            temporal_patch_size=2)
    prefix = "Qwen2VL" if version == "qwen2_vl" else "Qwen2_5_VL"
    processor = getattr(transformers, f"{prefix}Processor")(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=CHAT_TEMPLATES["qwen2_vl"])
    head_dim = hidden_size // num_heads
    # M-RoPE splits the rotary half-dimension into (temporal, height, width) sections, 1:1.5:1.5 as in Qwen2-VL.
    half = head_dim // 2
    t_sec = half // 4
    h_sec = (half - t_sec) // 2
    mrope_section = [t_sec, h_sec, half - t_sec - h_sec]
    text = dict(
        **_text_kwargs(tokenizer, hidden_size, num_layers, num_heads, num_kv_heads),
        rope_parameters={"rope_type": "default", "mrope_section": mrope_section, "rope_theta": 10000.0},
    )
    if version == "qwen2_vl":
        vision = dict(depth=vision_layers, embed_dim=hidden_size, hidden_size=hidden_size, num_heads=num_heads,
                      patch_size=patch_size, spatial_merge_size=merge_size, temporal_patch_size=2, mlp_ratio=2)
    else:
        vision = dict(depth=vision_layers, hidden_size=hidden_size, out_hidden_size=hidden_size,
                      intermediate_size=2 * hidden_size, num_heads=num_heads, patch_size=patch_size,
                      spatial_merge_size=merge_size, temporal_patch_size=2, window_size=2 * patch_size * merge_size,
                      fullatt_block_indexes=[vision_layers - 1])
    config = getattr(transformers, f"{prefix}Config")(
        text_config=text, vision_config=vision, image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
        vision_start_token_id=tokenizer.convert_tokens_to_ids(QWEN_SPECIAL["vision_start_token"]),
        vision_end_token_id=tokenizer.convert_tokens_to_ids(QWEN_SPECIAL["vision_end_token"]),
    )
    config.pad_token_id = tokenizer.pad_token_id
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config)
    return _finish(model, processor, seed, save_dir)


# Published shapes: CLIP ViT-L/14-336 + Vicuna (LLaMA) 7B / 13B, as in LLaVA-1.5.
LLAVA15_SHAPES: dict[str, dict[str, int]] = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
}


def build_random_llava(
    shape: str = "7b",
    *,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    vocab_size: int | None = 32064,
) -> tuple[Any, Any]:
    """A LLaVA-1.5-shaped model (``shape`` "7b" or "13b") with random weights, for benchmarks: no download.

    Vision tower CLIP ViT-L/14 at 336 px (576 image tokens, features of layer -2), 2-layer GELU projector,
    LLaMA decoder of the published shape; the processor is the tiny builder's (in-process tokenizer, CLIP
    preprocessing at 336 px, LLaVA-1.5 chat template). ``vocab_size`` sets the LM head rows (the real
    32064 by default, so the head costs what it does in the real model; ids the small tokenizer does not
    know decode to nothing). Weights are initialised on ``device`` directly in ``dtype`` (transformers'
    normal(0, 0.02) init) after ``torch.manual_seed(seed)``.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if shape not in LLAVA15_SHAPES:
        raise ValueError(f"unknown LLaVA-1.5 shape {shape!r}; choose one of {sorted(LLAVA15_SHAPES)}")
    _, processor = build_tiny_llava(image_size=336, patch_size=14, num_layers=1, vision_layers=1)
    tok = processor.tokenizer
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    dims = LLAVA15_SHAPES[shape]
    text = LlamaConfig(
        vocab_size=max(vocab_size or 0, len(tok)), num_key_value_heads=dims["num_attention_heads"],
        max_position_embeddings=4096, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id, **dims,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.image_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype, on the device: no fp32 copy of 7B weights
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    model.eval()
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tok, key))
    return model, processor


TINY_BUILDERS = {
    "llava": build_tiny_llava,
    "llava_next": build_tiny_llava_next,
    "qwen2_vl": build_tiny_qwen2_vl,
    "qwen2_5_vl": build_tiny_qwen2_5_vl,
}


def build_tiny(family: str, save_dir: str | Path | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """Dispatch to the tiny builder of ``family`` ("llava", "llava_next", "qwen2_vl" or "qwen2_5_vl")."""
    if family not in TINY_BUILDERS:
        raise ValueError(f"no tiny builder for family {family!r}; choose one of {sorted(TINY_BUILDERS)}")
    return TINY_BUILDERS[family](save_dir, **kwargs)
