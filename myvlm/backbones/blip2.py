"""BLIP-2 (OPT and Flan-T5 language models) as a myvlm backbone.

    backbone = load_backbone(BackboneConfig("Salesforce/blip2-opt-2.7b"))

Injection point ``qformer_input``: the concept token is appended to the vision-encoder
output that the Q-Former cross-attends to, through a forward pre-hook on
``model.qformer`` that extends ``encoder_hidden_states`` and ``encoder_attention_mask``.
The Q-Former is loaded with eager attention so its cross-attention probabilities can be
read (by forward hooks on each ``crossattention.attention`` module) for the regularizer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from PIL import Image
from transformers import AutoProcessor, Blip2ForConditionalGeneration

from myvlm.backbones.base import (
    IGNORE_INDEX,
    Backbone,
    pretrained_call,
    register_backbone,
    resolve_device_dtype,
    token_losses,
)
from myvlm.config import BackboneConfig

if TYPE_CHECKING:
    from myvlm.injection import ConceptInjector

logger = logging.getLogger(__name__)


@register_backbone("blip2", model_types=["blip-2"])
class Blip2Backbone(Backbone):
    injection_points = ("qformer_input",)

    @classmethod
    def load(cls, config: BackboneConfig) -> "Blip2Backbone":
        device, dtype = resolve_device_dtype(config)
        processor = pretrained_call(AutoProcessor, config, "processor")
        model = pretrained_call(
            Blip2ForConditionalGeneration,
            config,
            "model",
            dtype=dtype,
            attn_implementation={"qformer_config": "eager"},  # cross-attention probabilities for the regularizer
        )
        logger.info("loaded BLIP-2 %s on %s (%s)", config.name_or_path, device, dtype)
        return cls(model.to(device), processor, config)

    @property
    def concept_dim(self) -> int:
        return self.model.config.vision_config.hidden_size

    @property
    def pixel_dtype(self) -> torch.dtype:
        """The vision tower's dtype (from_pretrained keeps the Q-Former and the queries in fp32 under bf16)."""
        return self.model.vision_model.embeddings.patch_embedding.weight.dtype

    @property
    def decoder_only(self) -> bool:
        return bool(self.model.config.use_decoder_only_language_model)

    # ---- hooks -------------------------------------------------------------------------------
    def install_hooks(self, injector: "ConceptInjector") -> list[torch.utils.hooks.RemovableHandle]:
        def append_concepts(module: torch.nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
            states = kwargs.get("encoder_hidden_states")
            extra = injector.concept_tokens(states) if states is not None else None
            if extra is None:
                return None
            tokens, slot_mask = extra  # (B, K, D), (B, K)
            mask = kwargs.get("encoder_attention_mask")
            if mask is None:
                mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
            kwargs["encoder_hidden_states"] = torch.cat([states, tokens], dim=1)
            kwargs["encoder_attention_mask"] = torch.cat([mask, slot_mask.to(mask.dtype)], dim=1)
            return args, kwargs

        def record_probs(module: torch.nn.Module, args: tuple, output: Any) -> None:
            probs = output[1]  # (B, H, Q, N + K) with eager attention
            if probs is None or injector.batch_size is None:
                return
            slots = injector.concept_tokens_count
            injector.record_attention(probs[..., -slots:])

        handles = [self.model.qformer.register_forward_pre_hook(append_concepts, with_kwargs=True)]
        for layer in self.model.qformer.encoder.layer:
            if getattr(layer, "has_cross_attention", False):
                handles.append(layer.crossattention.attention.register_forward_hook(record_probs))
        if self.model.config.qformer_config._attn_implementation != "eager":
            logger.warning("the Q-Former does not use eager attention: the attention regularizer is disabled")
        return handles

    # ---- data --------------------------------------------------------------------------------
    def _encode(self, images: Sequence[Image.Image], texts: Sequence[str]) -> dict[str, torch.Tensor]:
        inputs = self.processor(images=list(images), text=list(texts), return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.pixel_dtype)
        return inputs

    def prepare_batch(
        self, images: Sequence[Image.Image], targets: Sequence[str], prompts: Optional[Sequence[str]] = None
    ) -> dict[str, torch.Tensor]:
        prompts = list(prompts) if prompts is not None else [""] * len(targets)
        eos = self.tokenizer.eos_token or ""
        if self.decoder_only:  # OPT: prompt + target in one sequence, labels on the target only
            return self._decoder_only_batch(images, targets, prompts, eos)
        inputs = self._encode(images, prompts)  # Flan-T5: the target is the decoder's sequence
        labels = self.tokenizer(list(targets), return_tensors="pt", padding=True).input_ids.to(self.device)
        labels[labels == self.tokenizer.pad_token_id] = IGNORE_INDEX
        inputs["labels"] = labels
        return inputs

    def _decoder_only_batch(
        self, images: Sequence[Image.Image], targets: Sequence[str], prompts: list[str], eos: str
    ) -> dict[str, torch.Tensor]:
        self.tokenizer.padding_side = "right"
        texts = [f"{p}{' ' if p and not p.endswith(' ') else ''}{t}{eos}" for p, t in zip(prompts, targets)]
        inputs = self._encode(images, texts)
        prompt_inputs = self._encode(images, prompts)
        prompt_lengths = prompt_inputs["attention_mask"].sum(dim=1)  # image tokens + BOS + prompt
        labels = inputs["input_ids"].clone()
        positions = torch.arange(labels.shape[1], device=labels.device)[None, :]
        labels[positions < prompt_lengths[:, None]] = IGNORE_INDEX
        labels[inputs["attention_mask"] == 0] = IGNORE_INDEX
        inputs["labels"] = labels
        return inputs

    def sequence_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if not self.decoder_only:
            inputs["labels"] = batch["labels"]
        logits = self.model(**inputs).logits  # (B, T, V)
        return token_losses(logits, batch["labels"], shift=self.decoder_only)

    @torch.no_grad()
    def generate(
        self, images: Sequence[Image.Image], prompts: Optional[Sequence[str]] = None, **generate_kwargs: Any
    ) -> list[str]:
        prompts = list(prompts) if prompts is not None else [""] * len(images)
        self.tokenizer.padding_side = "left"  # generation continues from the right end
        inputs = self._encode(images, prompts)
        generate_kwargs.setdefault("max_new_tokens", self.config.max_new_tokens)
        generate_kwargs.setdefault("do_sample", False)
        output = self.model.generate(**inputs, **generate_kwargs)
        if self.decoder_only and output.shape[1] > inputs["input_ids"].shape[1]:
            output = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]
