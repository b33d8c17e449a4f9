"""The toy world's tiny models: a BLIP-2 (same transformers classes as the real one) and an open_clip.

    from myvlm.toyworld.models import toyworld_blip2, toyworld_clip_spec
    backbone = myvlm.load_backbone(str(toyworld_blip2()))   # the shipped pretrained checkpoint folder
    head = build_head("clip_probe", feature_extractor=toyworld_clip_spec())

The checkpoints are built by ``scripts/pretrain_toyworld.py`` and shipped in
``myvlm/toyworld/checkpoints`` (a few MB): a fresh machine needs no 30-minute pretraining and
every user gets bit-identical weights. The tokenizer is a byte-level BPE trained on the world's
captions, so every word and name of the world is one token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from myvlm.heads.features import OpenClipFeatures, register_extractor
from myvlm.toyworld.scenes import (
    BACKGROUNDS, CATEGORIES, COLOURS, DETAILS, NAMES, PATTERN_COLOURS, PATTERNS, RELATIONS, SIZE, SIZES,
)

logger = logging.getLogger(__name__)

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
BLIP2_DIR = CHECKPOINTS / "blip2"
CLIP_FILE = CHECKPOINTS / "clip.safetensors"
NAME_VECTORS = "name_vectors.safetensors"  # in a BLIP-2 / LLaVA checkpoint folder: the naming prior's name vectors
WORDS = sorted(set(
    list(CATEGORIES) + list(PATTERN_COLOURS) + list(PATTERNS) + list(SIZES) + list(BACKGROUNDS) + list(NAMES)
    + list(DETAILS)
    + " ".join(RELATIONS).split() + "a on and background what is the colour shape how many objects are there "
      "of in this picture one two three yes no question answer sks".split()
))


@dataclass
class Blip2Sizes:
    """Architecture of the tiny BLIP-2 (ViT -> Q-Former -> OPT)."""

    patch_size: int = 16  # ViT patch side in pixels (64 px images -> 4x4 = 16 patches)
    vision_hidden: int = 128  # ViT width
    vision_layers: int = 4  # ViT depth
    qformer_hidden: int = 128  # Q-Former width
    qformer_layers: int = 2  # Q-Former depth (cross-attention in every layer)
    num_query_tokens: int = 16  # learned queries = image tokens the LM sees
    qformer_dropout: float = 0.1  # Q-Former hidden and attention dropout (transformers' default)
    text_hidden: int = 128  # OPT width
    text_layers: int = 3  # OPT depth
    heads: int = 4  # attention heads everywhere


def _corpus(extra: tuple[str, ...] = ()) -> list[str]:
    from myvlm.toyworld.scenes import caption, sample_scene

    rng = np.random.default_rng(0)
    lines = [caption(sample_scene(rng)) for _ in range(3000)]
    return lines + [" ".join(WORDS)] * 20 + list(extra) * 200


def build_tokenizer(vocab_size: int = 420, extra: tuple[str, ...] = ()):
    """Byte-level BPE (OPT-style specials) on the world's captions: every world word is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_corpus(tuple(extra)), trainer=trainer)
    bos = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="</s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


@torch.no_grad()
def depth_scaled_init(vision) -> None:
    """Re-draw a BLIP-2 ViT's attention and MLP weights as CLIP initialises its ViT (transformers'
    ``CLIPPreTrainedModel._init_weights``: scaled by width and depth) instead of all at std 0.02. The vision stage
    learns objects faster from it (1000 steps on 20000 scenes, the heads reading ``object_tokens``, 400 held-out
    scenes: category / look / size 86 / 91 / 88% vs 81 / 89 / 82%)."""
    width, depth = vision.config.hidden_size, vision.config.num_hidden_layers
    inner = width ** -0.5 * (2 * depth) ** -0.5
    for layer in vision.encoder.layers:
        layer.self_attn.qkv.weight.normal_(std=inner)
        layer.self_attn.projection.weight.normal_(std=width ** -0.5)
        layer.mlp.fc1.weight.normal_(std=(2 * width) ** -0.5)
        layer.mlp.fc2.weight.normal_(std=inner)


def new_blip2(sizes: Blip2Sizes = Blip2Sizes(), seed: int = 0):
    """(model, processor): an untrained tiny BLIP-2-OPT for the toy world."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, BlipImageProcessor, OPTConfig)

    tokenizer = build_tokenizer()
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": SIZE, "width": SIZE}),
                               tokenizer=tokenizer, num_query_tokens=sizes.num_query_tokens)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    s = sizes
    vision = Blip2VisionConfig(hidden_size=s.vision_hidden, intermediate_size=4 * s.vision_hidden,
                               num_hidden_layers=s.vision_layers, num_attention_heads=s.heads, image_size=SIZE,
                               patch_size=s.patch_size, initializer_range=0.02)  # transformers' default, 1e-10,
    # is meant for loading pretrained weights: from scratch it starts every ViT weight at ~0
    qformer = Blip2QFormerConfig(hidden_size=s.qformer_hidden, intermediate_size=4 * s.qformer_hidden,
                                 num_hidden_layers=s.qformer_layers, num_attention_heads=s.heads,
                                 encoder_hidden_size=s.vision_hidden, cross_attention_frequency=1,
                                 vocab_size=len(tokenizer), hidden_dropout_prob=s.qformer_dropout,
                                 attention_probs_dropout_prob=s.qformer_dropout)
    text = OPTConfig(vocab_size=len(tokenizer), hidden_size=s.text_hidden, ffn_dim=4 * s.text_hidden,
                     num_hidden_layers=s.text_layers, num_attention_heads=s.heads, max_position_embeddings=128,
                     word_embed_proj_dim=s.text_hidden, dropout=0.0, attention_dropout=0.0, **ids)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         num_query_tokens=s.num_query_tokens,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():  # transformers zero-initialises the queries
        model.query_tokens.normal_(std=0.02)
    depth_scaled_init(model.vision_model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.max_new_tokens = 24
    return model, processor


# ---- the tiny open_clip for concept heads ----------------------------------------------------

CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": SIZE, "layers": 4, "width": 128, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": len(WORDS) + 2, "width": 64, "heads": 2, "layers": 2},
}


def clip_config(pool: str = "tok") -> dict[str, Any]:
    """CLIP_CONFIG with the image pooling ``pool``: "tok" (class token, the shipped CLIP) or "avg"."""
    if pool not in ("tok", "avg"):
        raise ValueError(f"unknown CLIP pooling {pool!r}; use 'tok' or 'avg'")
    return {**CLIP_CONFIG, "vision_cfg": {**CLIP_CONFIG["vision_cfg"], "pool_type": pool}}


def clip_text_ids(texts: list[str]) -> torch.Tensor:
    """Word-level ids for the CLIP text tower: 0 = pad, last = end (open_clip pools the argmax id)."""
    index = {w: i + 1 for i, w in enumerate(WORDS)}
    end = len(WORDS) + 1
    length = CLIP_CONFIG["text_cfg"]["context_length"]
    rows = []
    for text in texts:
        ids = [index[w] for w in text.replace(",", "").split()][: length - 1] + [end]
        rows.append(ids + [0] * (length - len(ids)))
    return torch.tensor(rows)


@register_extractor("toyworld_clip")
def toyworld_clip(checkpoint: Optional[str] = None, batch_size: int = 64, **runtime: Any) -> OpenClipFeatures:
    """The toy world's pretrained tiny open_clip image encoder (``checkpoint`` None = the shipped one)."""
    from safetensors import safe_open

    path = Path(checkpoint) if checkpoint else CLIP_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no toy-world CLIP checkpoint at {path}; run scripts/pretrain_toyworld.py")
    with safe_open(str(path), "pt") as f:
        pool = (f.metadata() or {}).get("pool_type", "tok")  # written by scripts/pretrain_toyworld.py
        state = {k[len("visual."):]: f.get_tensor(k) for k in f.keys() if k.startswith("visual.")}
    extractor = OpenClipFeatures(model_cfg=clip_config(pool), pretrained=None, batch_size=batch_size, **runtime)
    extractor.model.load_state_dict(state)
    extractor.model.to(extractor.device, extractor.dtype).eval()
    extractor.name = "open_clip:toyworld"
    extractor.describe = lambda: {"type": "toyworld_clip", "checkpoint": checkpoint}  # type: ignore[method-assign]
    return extractor


def toyworld_clip_spec(checkpoint: Optional[str] = None) -> dict[str, Any]:
    """The feature-extractor spec of the toy-world CLIP (``checkpoint`` None = the shipped one)."""
    return {"type": "toyworld_clip", **({"checkpoint": str(checkpoint)} if checkpoint else {})}


def toyworld_blip2() -> Path:
    """The shipped pretrained tiny BLIP-2 folder (loads with ``myvlm.load_backbone``)."""
    if not (BLIP2_DIR / "config.json").is_file():
        raise FileNotFoundError(f"no toy-world BLIP-2 at {BLIP2_DIR}; run scripts/pretrain_toyworld.py")
    return BLIP2_DIR


@dataclass
class PixelNormaliser:
    """The processors' normalisation, vectorised: uint8 (B, H, W, 3) -> float (B, 3, H, W)."""

    mean: tuple = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP mean (BlipImageProcessor default)
    std: tuple = (0.26862954, 0.26130258, 0.27577711)

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(pixels).float().div_(255.0)
        x = (x - torch.tensor(self.mean)) / torch.tensor(self.std)
        return x.permute(0, 3, 1, 2).contiguous()


__all__ = ["Blip2Sizes", "LlavaSizes", "new_blip2", "new_llava", "build_tokenizer", "toyworld_blip2", "toyworld_llava",
           "toyworld_clip", "toyworld_clip_spec",
           "CLIP_CONFIG", "clip_config", "clip_text_ids", "PixelNormaliser"]


# ---- the tiny LLaVA --------------------------------------------------------------------------

LLAVA_DIR = CHECKPOINTS / "llava"
LLAVA_LINES = [  # prompts and answers of the chat format, so that they tokenize into few tokens
    "USER: <image>\nPlease caption this image. ASSISTANT:", "Please caption this image of",
    "What shape is", "What is the background?", "How many objects are there?", "Is", "in the picture?",
    "yes no one two three",
]


@dataclass
class LlavaSizes:
    """Architecture of the tiny LLaVA-1.5 (CLIP ViT -> MLP projector -> Llama)."""

    patch_size: int = 16  # ViT patch side (64 px -> 16 image tokens)
    vision_hidden: int = 128  # ViT width
    vision_layers: int = 4  # ViT depth (the LLM reads the last layer, vision_feature_layer=-1)
    text_hidden: int = 128  # Llama width
    text_layers: int = 3  # Llama depth
    heads: int = 4  # attention heads everywhere


def new_llava(sizes: LlavaSizes = LlavaSizes(), seed: int = 0):
    """(model, processor): an untrained tiny LlavaForConditionalGeneration with the llava-hf processor layout."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from myvlm.tiny import tiny_llava_processor

    tokenizer = build_tokenizer(vocab_size=520, extra=LLAVA_LINES)
    processor = tiny_llava_processor("llava", tokenizer, SIZE, sizes.patch_size)  # adds <image>, chat template
    s = sizes
    vision = CLIPVisionConfig(hidden_size=s.vision_hidden, intermediate_size=4 * s.vision_hidden,
                              num_hidden_layers=s.vision_layers, num_attention_heads=s.heads, image_size=SIZE,
                              patch_size=s.patch_size, projection_dim=s.vision_hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=s.text_hidden, intermediate_size=4 * s.text_hidden,
                       num_hidden_layers=s.text_layers, num_attention_heads=s.heads, num_key_value_heads=s.heads,
                       max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=(SIZE // s.patch_size) ** 2, vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.max_new_tokens = 24
    return model, processor


def toyworld_llava() -> Path:
    """The shipped pretrained tiny LLaVA folder (loads with ``myvlm.load_backbone``)."""
    if not (LLAVA_DIR / "config.json").is_file():
        raise FileNotFoundError(f"no toy-world LLaVA at {LLAVA_DIR}; run scripts/pretrain_toyworld.py --llava")
    return LLAVA_DIR


def save_name_vectors(vectors: dict[str, torch.Tensor], path: Union[str, Path]) -> None:
    """The naming prior's learned name vectors ({name: (D,)}), kept beside a pretrained backbone for diagnostics
    (``scripts/binding_ceiling.py``); personalization never reads them."""
    from safetensors.torch import save_file

    save_file({name: v.detach().float().contiguous() for name, v in vectors.items()}, str(path),
              metadata={"what": "toy-world naming prior name vectors, at the backbone's injection point"})


def load_name_vectors(folder: Union[str, Path]) -> dict[str, torch.Tensor]:
    """``save_name_vectors``' file in a checkpoint folder; a clear error where the folder has none."""
    from safetensors.torch import load_file

    path = Path(folder) / NAME_VECTORS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the name vectors are written by scripts/pretrain_toyworld.py "
                                "(with the naming prior on) beside the checkpoint")
    return load_file(str(path))
