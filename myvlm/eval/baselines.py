"""Baselines beside MyVLM, as the paper and its successors compare them.

    ReplaceBaseline()                  # the frozen caption with the class word replaced by the identifier
    LoraBaseline(rank=8, lr=1e-4)      # a LoRA fine-tune of the language model on the same N photos (RAP's
                                       # LLaVA-LoRA), same steps, batch and augmentation as the concept embedding

Neither has a concept head: replacement renames every photo of the class, and the LoRA model
is always on, so their false-positive rates show what the head buys. The LoRA adapter is
attached with peft for one (concept, split) and unloaded afterwards, which restores the frozen
backbone's modules and weights exactly (tests/test_eval_protocol.py checks bit-identity).
"""

from __future__ import annotations

import logging
import random
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from PIL import Image

from myvlm.api import vlm_targets
from myvlm.backbones.base import Backbone
from myvlm.config import TrainConfig
from myvlm.data import (
    Augmenter,
    TrainingExample,
    class_word_to_identifier,
    display_identifier,
    make_examples,
    sample_tasks,
)
from myvlm.eval.methods import FitContext, Method, Output, Personalized, VanillaOutputs, class_question, safe_name
from myvlm.training import BatchSampler

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"


# ---- class-word replacement ------------------------------------------------------------------

@dataclass
class ReplaceBaseline(Method):
    """No training: the frozen model's output with the class word ('a dog') replaced by the identifier."""

    name: str = "replace"  # column name in the tables

    def fit(self, context: FitContext) -> Personalized:
        shown = display_identifier(context.identifier, context.kind)
        return PersonalizedReplace(context.vanilla, context.class_word, shown)


class PersonalizedReplace(Personalized):
    saved_what = "nothing (the class word)"

    def __init__(self, vanilla: VanillaOutputs, class_word: str, identifier: str):
        self.vanilla, self.class_word, self.identifier = vanilla, class_word, identifier
        self.training = {}

    def _rename(self, text: str) -> str:
        return class_word_to_identifier(text, self.class_word, self.identifier) or text

    def caption(self, images: Sequence[Image.Image]) -> list[Output]:
        prompt = self.vanilla.caption_prompt
        return [Output(self._rename(text), prompt) for text in self.vanilla.captions(images)]

    def ask(self, images: Sequence[Image.Image], question: str) -> list[Output]:
        asked = class_question(question, self.identifier, self.class_word)
        prompt = self.vanilla.backbone.question_prompt(asked)
        return [Output(self._rename(text), prompt) for text in self.vanilla.answers(images, asked)]


# ---- LoRA ------------------------------------------------------------------------------------

def lora_target_modules(backbone: Backbone) -> str:
    """peft's default LoRA targets for the language model's ``model_type``, limited to the language model."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    text_config = getattr(backbone.model.config, "text_config", None) or backbone.model.config
    names = DEFAULTS.get(text_config.model_type)
    if not names:
        raise ValueError(
            f"peft has no default LoRA targets for language model type {text_config.model_type!r}; "
            "pass LoraBaseline(target_modules=[...]) (the attention projections' module names)"
        )
    return rf".*language_model.*\.({'|'.join(re.escape(n) for n in names)})$"


class LoraAdapter:
    """A peft LoRA adapter on ``backbone.model`` (in place) until ``close()``, which unloads it."""

    def __init__(self, backbone: Backbone, rank: int, alpha: int, dropout: float, targets: Any):
        from peft import LoraConfig, get_peft_model

        self.backbone = backbone
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
        with warnings.catch_warnings():  # transformers' deprecation notice, raised inside peft
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            self.peft_model = get_peft_model(backbone.model, config)  # injects LoRA layers into backbone.model
        self.parameters = [p for name, p in backbone.model.named_parameters() if p.requires_grad]
        frozen_leaks = [n for n, p in backbone.model.named_parameters() if p.requires_grad and "lora_" not in n]
        if frozen_leaks or not self.parameters:
            self.close()
            raise RuntimeError(f"LoRA must train only its adapters; trainable: {frozen_leaks[:3] or 'none'}")

    def save(self, folder: Path) -> int:
        """Write adapter_config.json + adapter_model.safetensors; return the adapter file's size in bytes."""
        self.peft_model.save_pretrained(str(folder))
        return (folder / ADAPTER_FILE).stat().st_size

    def close(self) -> None:
        if self.peft_model is not None:
            self.peft_model.unload()  # original modules back, adapter weights dropped (no merge)
            self.peft_model = None
            self.backbone.freeze()


def train_lora(
    backbone: Backbone, adapter: LoraAdapter, examples: Sequence[TrainingExample], config: TrainConfig, lr: float,
    grad_clip: float,
) -> dict[str, Any]:
    """The concept-embedding loop with the LoRA weights as the trainable set: same batches, steps, augmentation."""
    optimizer = torch.optim.AdamW(adapter.parameters, lr=lr, weight_decay=config.weight_decay)
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    sampler = BatchSampler(len(examples), config.batch_size, rng)
    augment = Augmenter(config.augment)
    losses = []
    for step in range(config.steps):
        indices = sampler.next()
        images, mirrored = zip(*(augment.apply(examples[i].image) for i in indices))
        _, targets = sample_tasks(examples, indices, rng, mirrored)  # captions only: the examples have no questions
        batch = backbone.prepare_batch(list(images), targets)
        loss = backbone.sequence_loss(batch).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"LoRA loss became {loss.item()} at step {step}; lower the LoRA learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters, grad_clip)
        optimizer.step()
        losses.append(loss.item())
    tail = losses[-10:] or [float("nan")]
    return {"steps": config.steps, "first_loss": losses[0] if losses else float("nan"),
            "final_loss": sum(tail) / len(tail), "trainable_parameters": sum(p.numel() for p in adapter.parameters)}


@dataclass
class LoraBaseline(Method):
    """LoRA on the language model's attention projections, trained on the N photos' identifier captions."""

    name: str = "lora"  # column name in the tables
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides (steps, batch_size, augment, seed)
    rank: int = 8  # LoRA rank r
    alpha: int = 16  # LoRA alpha (scale alpha / r)
    dropout: float = 0.0  # LoRA dropout
    lr: float = 1e-4  # AdamW learning rate of the adapter weights
    grad_clip: float = 1.0  # max global grad norm of the adapter weights
    target_modules: Optional[list[str]] = None  # None = peft's defaults for the language model's type

    def fit(self, context: FitContext) -> Personalized:
        backbone = context.backbone
        config = TrainConfig.from_dict({**backbone.training_defaults("caption"), **self.train})
        captions = context.captions or vlm_targets(backbone, context.images, context.sources, context.class_word,
                                                   context.identifier)
        examples = make_examples(context.images, captions, context.concept, context.identifier, context.kind,
                                 context.sources, mirrored=context.mirrored_captions)
        targets = self.target_modules or lora_target_modules(backbone)
        started = time.perf_counter()
        adapter = LoraAdapter(backbone, self.rank, self.alpha, self.dropout, targets)
        try:
            summary = train_lora(backbone, adapter, examples, config, self.lr, self.grad_clip)
            seconds = time.perf_counter() - started
            size = adapter.save(context.work_dir / safe_name(f"{self.name}-{context.concept}"))
        except BaseException:
            adapter.close()
            raise
        backbone.model.eval()
        return PersonalizedLora(adapter, context.vanilla, seconds, size, context.batch_size,
                                {**summary, "config": config.to_dict()})


class PersonalizedLora(Personalized):
    saved_what = f"LoRA adapter ({ADAPTER_FILE})"

    def __init__(self, adapter: LoraAdapter, vanilla: VanillaOutputs, seconds: float, size: int, batch_size: int,
                 training: dict[str, Any]):
        self.adapter, self.vanilla, self.batch_size = adapter, vanilla, batch_size
        self.train_seconds, self.saved_bytes, self.training = seconds, size, training

    def _generate(self, images: Sequence[Image.Image], prompt: Optional[str]) -> list[Output]:
        if self.adapter.peft_model is None:
            raise RuntimeError("this LoRA adapter was closed")
        texts: list[str] = []
        for start in range(0, len(images), self.batch_size):
            chunk = list(images[start : start + self.batch_size])
            texts += self.adapter.backbone.generate(chunk, [prompt] * len(chunk) if prompt else None)
        return [Output(text, prompt) for text in texts]

    def caption(self, images: Sequence[Image.Image]) -> list[Output]:
        return self._generate(images, self.vanilla.caption_prompt)

    def ask(self, images: Sequence[Image.Image], question: str) -> list[Output]:
        return self._generate(images, self.adapter.backbone.question_prompt(question))

    def close(self) -> None:
        self.adapter.close()
