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
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    logger.info("wrote a tiny random BLIP-2 (%s) to %s", language_model, folder)
    return folder
