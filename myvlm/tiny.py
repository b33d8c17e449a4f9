"""Tiny random checkpoints, built offline from configs, for tests, benchmarks and the demo.

    python -c "from myvlm.tiny import build_tiny_blip2; print(build_tiny_blip2('/tmp/tiny-blip2'))"

They use the same transformers classes and processor files as the real models, so a
tiny checkpoint folder loads through exactly the code path of ``Salesforce/blip2-opt-2.7b``.
The tokenizer is a byte-level BPE trained here on a small caption corpus. The weights
are random: these models show mechanics (shapes, hooks, gradients), not captions.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Union

import torch

logger = logging.getLogger(__name__)

_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "pink"]
_THINGS = ["dog", "cat", "toy", "bowl", "vase", "boot", "clock", "teapot", "circle", "square", "person"]
_PLACES = ["beach", "grass", "table", "floor", "street", "sofa", "snow", "kitchen", "garden", "room"]


def _corpus() -> list[str]:
    lines = []
    for i, thing in enumerate(_THINGS):
        for j, colour in enumerate(_COLOURS):
            place = _PLACES[(i + j) % len(_PLACES)]
            lines.append(f"a {colour} {thing} on the {place}")
            lines.append(f"sks is lying on the {place} next to a {colour} {thing}")
            lines.append(f"Question: what is in the image? Answer: a {thing} in the {place}")
    return lines


def build_tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer (OPT-style special tokens) trained on a toy caption corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    bos = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_tiny_blip2(
    folder: Union[str, Path],
    image_size: int = 32,
    hidden: int = 32,
    num_query_tokens: int = 4,
    language_model: str = "opt",
    seed: int = 1,
    initializer_range: float = 0.2,  # wider than transformers' 0.02 so that image features reach the LM
) -> Path:
    """Write a random tiny BLIP-2 (model + processor) to ``folder`` and return it."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
        T5Config,
    )

    folder = Path(folder)
    tokenizer = build_tiny_tokenizer()
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
        num_query_tokens=num_query_tokens,
    )  # adds the "<image>" token to the tokenizer
    vocab = len(tokenizer)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = Blip2VisionConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=8, initializer_range=initializer_range,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        encoder_hidden_size=hidden, cross_attention_frequency=1, vocab_size=vocab,
        initializer_range=initializer_range,
    )
    if language_model == "opt":
        text = OPTConfig(
            vocab_size=vocab, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, word_embed_proj_dim=hidden, init_std=initializer_range, **ids,
        )
    elif language_model == "t5":
        text = T5Config(
            vocab_size=vocab, d_model=hidden, d_kv=8, d_ff=2 * hidden, num_layers=2, num_heads=4,
            decoder_start_token_id=tokenizer.pad_token_id, initializer_factor=initializer_range / 0.02, **ids,
        )
    else:
        raise ValueError(f"language_model must be 'opt' or 't5', got {language_model!r}")
    config = Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=num_query_tokens, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():  # transformers zero-initialises the queries; random ones let images matter
        model.query_tokens.normal_(std=initializer_range)
    return _save(model, processor, tokenizer, folder, f"BLIP-2 ({language_model})")


# LLaVA-1.5's chat format ("USER: <image>\n{text} ASSISTANT:"), the template llava-hf ships.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def tiny_llava_config(
    variant: str = "llava", tokenizer=None, image_size: int = 32, patch_size: int = 8, vision_hidden: int = 24,
    hidden: int = 32, layers: int = 2, initializer_range: float = 0.2, vocab_size=None,
):
    """A LlavaConfig / LlavaNextConfig of toy size (vision and text widths differ so mix-ups fail loudly)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    tokenizer = tokenizer or build_tiny_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=layers, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden, initializer_range=initializer_range,
    )
    text = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        initializer_range=initializer_range, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    common = dict(vision_config=vision.to_dict(), text_config=text.to_dict(),
                  image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    if variant == "llava":
        return LlavaConfig(image_seq_length=(image_size // patch_size) ** 2, **common)
    if variant == "llava_next":
        pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
        return LlavaNextConfig(image_grid_pinpoints=pinpoints, **common)
    raise ValueError(f"variant must be 'llava' or 'llava_next', got {variant!r}")


def tiny_llava_processor(variant: str, tokenizer, image_size: int = 32, patch_size: int = 8):
    """A tiny LLaVA's processor: CLIP-style image processing, the tiny tokenizer with ``<image>``, a chat template."""
    from transformers import CLIPImageProcessor, LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor

    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    common = dict(tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy="default",
                  chat_template=LLAVA_CHAT_TEMPLATE, num_additional_image_tokens=1)
    crop = {"height": image_size, "width": image_size}
    if variant == "llava":
        images = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=crop)
        return LlavaProcessor(image_processor=images, **common)
    pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
    images = LlavaNextImageProcessor(size={"shortest_edge": image_size}, crop_size=crop, image_grid_pinpoints=pinpoints)
    return LlavaNextProcessor(image_processor=images, **common)


def build_tiny_llava(
    folder: Union[str, Path], variant: str = "llava", seed: int = 1, initializer_range: float = 0.2, **sizes
) -> Path:
    """Write a random tiny LLaVA-1.5 (``variant="llava"``) or LLaVA-NeXT (``"llava_next"``) + processor to ``folder``.

    It loads through ``from_pretrained`` exactly like ``llava-hf/llava-1.5-7b-hf``. ``sizes`` go to
    ``tiny_llava_config`` (image_size, patch_size, vision_hidden, hidden, layers, vocab_size).
    """
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    folder = Path(folder)
    tokenizer = build_tiny_tokenizer()
    processor = tiny_llava_processor(variant, tokenizer, sizes.get("image_size", 32), sizes.get("patch_size", 8))
    config = tiny_llava_config(variant, tokenizer, initializer_range=initializer_range, **sizes)
    torch.manual_seed(seed)
    model_class = LlavaForConditionalGeneration if variant == "llava" else LlavaNextForConditionalGeneration
    model = model_class(config)
    return _save(model, processor, tokenizer, folder, variant)


def _save(model, processor, tokenizer, folder: Path, what: str) -> Path:
    """Write model + processor like a hub checkpoint, with generation stopping at the tokenizer's EOS."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    logger.info("wrote a tiny random %s to %s", what, folder)
    return folder
