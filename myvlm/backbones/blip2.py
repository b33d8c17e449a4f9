"""BLIP-2 (OPT and Flan-T5 language models) as a myvlm backbone.

    backbone = load_backbone(BackboneConfig("Salesforce/blip2-opt-2.7b"))

Injection point ``qformer_input``: the concept token is appended to the vision-encoder
output that the Q-Former cross-attends to, through a forward pre-hook on
``model.qformer`` that extends ``encoder_hidden_states`` and ``encoder_attention_mask``.
The Q-Former is loaded with eager attention so its cross-attention probabilities can be
read (by forward hooks on each ``crossattention.attention`` module) for the regularizer.

Routed concepts (``myvlm.injection.Route``): the pre-hook first runs the Q-Former once without the
concept tokens (no gradients) to read each query's cross-attention on where the concept is, then a
pre-hook on each cross-attention adds the routing bias to the concept columns of its attention mask.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

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
    supports_routing = True

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
        routing: dict[str, Any] = {"probing": False, "probs": [], "biases": None}

        def append_concepts(module: torch.nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
            states = kwargs.get("encoder_hidden_states")
            if routing["probing"] or states is None:
                return None
            extra = injector.concept_tokens(states)
            if extra is None:
                return None
            tokens, slot_mask = extra  # (B, K, D), (B, K)
            routing["biases"] = self._route_biases(module, args, kwargs, injector.route_weights(states), routing)
            mask = kwargs.get("encoder_attention_mask")
            if mask is None:
                mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
            kwargs["encoder_hidden_states"] = torch.cat([states, tokens], dim=1)
            kwargs["encoder_attention_mask"] = torch.cat([mask, slot_mask.to(mask.dtype)], dim=1)
            return args, kwargs

        def forget_biases(module: torch.nn.Module, args: tuple, output: Any) -> None:
            routing["biases"] = None

        def record_probs(module: torch.nn.Module, args: tuple, output: Any) -> None:
            probs = output[1]  # (B, H, Q, N + K) with eager attention
            if routing["probing"]:
                routing["probs"].append(probs)
                return
            if probs is None or injector.batch_size is None:
                return
            slots = injector.concept_tokens_count
            injector.record_attention(probs[..., -slots:])

        def route_bias(layer: int) -> Callable[..., Optional[tuple]]:
            def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
                biases = routing["biases"]
                if routing["probing"] or biases is None:
                    return None
                queries = kwargs["hidden_states"].shape[1]
                kwargs["encoder_attention_mask"] = with_concept_bias(
                    kwargs.get("encoder_attention_mask"), biases[layer], kwargs["encoder_hidden_states"], queries)
                return args, kwargs
            return hook

        handles = [self.model.qformer.register_forward_pre_hook(append_concepts, with_kwargs=True),
                   self.model.qformer.register_forward_hook(forget_biases)]
        layers = [layer for layer in self.model.qformer.encoder.layer if getattr(layer, "has_cross_attention", False)]
        for index, layer in enumerate(layers):
            handles.append(layer.crossattention.attention.register_forward_hook(record_probs))
            handles.append(layer.crossattention.attention.register_forward_pre_hook(route_bias(index),
                                                                                    with_kwargs=True))
        if self.model.config.qformer_config._attn_implementation != "eager":
            logger.warning("the Q-Former does not use eager attention: the attention regularizer is disabled")
        return handles

    @staticmethod
    @torch.no_grad()
    def _route_biases(qformer: torch.nn.Module, args: tuple, kwargs: dict,
                      where: Optional[tuple[torch.Tensor, torch.Tensor]],
                      routing: dict) -> Optional[list[torch.Tensor]]:
        """Per cross-attention layer, (B, Q, K) biases of the concept slots' logits: strength * log(m / max m),
        ``m`` each query's attention (mean over heads) on where each concept is (``where``: weights (B, K, N) over
        the image tokens and strengths (B, K)), read from one pass of the Q-Former without the concept tokens."""
        if where is None:
            return None
        weights, strength = where
        routing["probing"], routing["probs"] = True, []
        try:
            qformer(*args, **kwargs)
        finally:
            routing["probing"] = False
        if not routing["probs"] or any(p is None for p in routing["probs"]):
            raise RuntimeError("query routing reads the Q-Former's cross-attention: load it with eager attention")
        biases = []
        for probs in routing["probs"]:  # (B, H, Q, N)
            mass = probs.float().mean(dim=1) @ weights.transpose(1, 2)  # (B, Q, K)
            share = mass / mass.amax(dim=1, keepdim=True).clamp(min=torch.finfo(mass.dtype).tiny)
            biases.append(strength[:, None, :] * torch.log(share.clamp(min=1e-6)))
        routing["probs"] = []
        return biases

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


def with_concept_bias(mask: Optional[torch.Tensor], bias: torch.Tensor, states: torch.Tensor,
                      queries: int) -> torch.Tensor:
    """A cross-attention mask (None, or (B, 1, 1 | Q, N + K) additive or boolean) as an additive (B, 1, Q, N + K)
    mask whose last K columns (the concept slots) carry ``bias`` (B, Q, K) as well."""
    batch, width = states.shape[:2]
    dtype = states.dtype if states.is_floating_point() else torch.float32
    if mask is None:
        mask = torch.zeros(batch, 1, queries, width, dtype=dtype, device=states.device)
    elif mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=states.device).masked_fill(~mask, torch.finfo(dtype).min)
    mask = mask.to(dtype).expand(batch, 1, queries, width).clone()
    slots = bias.shape[-1]
    mask[:, 0, :, -slots:] = mask[:, 0, :, -slots:] + bias.to(dtype)
    return mask
