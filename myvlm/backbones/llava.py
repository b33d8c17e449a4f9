"""LLaVA-1.5 and LLaVA-NeXT (1.6) as myvlm backbones.

    backbone = load_backbone("llava-hf/llava-1.5-7b-hf")             # or "llava-hf/llava-v1.6-vicuna-7b-hf"
    backbone = load_backbone(BackboneConfig("llava-hf/llava-1.5-7b-hf", injection="projector_output"))

Injection points of the multimodal projector: ``projector_input`` (default: the concept vector lives
in the vision-feature space, is norm-matched to the image's vision features and passes through the
projector) and ``projector_output`` (the LLM embedding space, as in the paper, norm-matched to the
projected image tokens).

How a concept token reaches the LLM: for a sample with k active concepts, k *concept slots* are
inserted into its token sequence right after its image placeholders (attended to, never labelled).
A forward hook on ``multi_modal_projector`` builds that forward's concept tokens from the image
features, and a forward pre-hook on the language model writes them into the slots' input
embeddings. Image placeholders and features stay untouched, so transformers' placeholder checks
hold for any number of concepts per sample, and a sample without concepts gets no slot at all.
Slots are added by ``sequence_loss`` and ``generate`` (which see the injector's activation), so
``prepare_batch`` output does not depend on which concepts are active.

The attention regularizer: forward hooks on every decoder layer's ``self_attn`` read the attention
around the concept slots. ``penalize_attention`` switches the LLM's attention for its block only
(training with lambda > 0; generation keeps SDPA): for the default ``from_concept`` form (the
concept token's own attention row, as the reference code) to SDPA that also hands its query and
key states to the hook, which computes just those rows; for ``to_concept`` (attention paid to the
concept by every later token) to eager attention, whose full probabilities the hook reads.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Optional, Sequence

import torch
from PIL import Image
from torch.utils.hooks import RemovableHandle
from transformers import (
    AttentionInterface,
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

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

CAPTION_PROMPT = "Please caption this image."  # LLaVA's plain captioning prompt
CONCEPT_CAPTION_PROMPT = "Please caption this image of {}."  # the reference code's prompt, with the identifier(s)
SDPA_WITH_QUERY_KEY = "myvlm_sdpa_query_key"  # attention implementation registered below


def sdpa_passing_query_key(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: Optional[torch.Tensor], **kwargs: Any) -> tuple[torch.Tensor, tuple]:
    """transformers' SDPA attention, returning (query, key, scaling) in place of the probabilities it never forms."""
    output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return output, (query, key, kwargs.get("scaling"))


AttentionInterface.register(SDPA_WITH_QUERY_KEY, sdpa_passing_query_key)
AttentionMaskInterface.register(SDPA_WITH_QUERY_KEY, sdpa_mask)


@dataclass
class ConceptSlots:
    """Where one forward's concept tokens go; built by ``insert_slots``, filled by the hooks."""

    mask: torch.Tensor  # (B, T) True at concept slots
    positions: torch.Tensor  # (B, K) sequence index of sample b's k-th slot (0 where it has fewer)
    active: torch.Tensor  # (B, K) True where sample b has a k-th concept
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    image_rows: torch.Tensor  # (B,) projector row holding each image's (base) view, for norm matching
    tokens: Optional[torch.Tensor] = None  # (B, K, D_text) concept tokens of this forward


def insert_slots(
    inputs: dict[str, torch.Tensor], counts: Sequence[int], image_token_id: int, filler_id: int, pad_id: int,
    left_padding: bool,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Insert ``counts[b]`` filler tokens after sample b's last image placeholder and re-pad.

    Returns the new inputs (input_ids, attention_mask and labels changed; labels IGNORE_INDEX at
    slots) and the (B, T) slot mask.
    """
    rows: dict[str, list[torch.Tensor]] = {"input_ids": [], "labels": [], "slots": []}
    for b, count in enumerate(counts):
        keep = inputs["attention_mask"][b].bool()
        ids = inputs["input_ids"][b][keep]
        placeholders = (ids == image_token_id).nonzero()
        if len(placeholders) == 0:
            raise ValueError(f"sample {b} has no image placeholder (token {image_token_id}); its prompt lost the image")
        at = int(placeholders[-1]) + 1
        rows["input_ids"].append(torch.cat([ids[:at], ids.new_full((count,), filler_id), ids[at:]]))
        slots = torch.zeros(len(ids) + count, dtype=torch.bool, device=ids.device)
        slots[at : at + count] = True
        rows["slots"].append(slots)
        if "labels" in inputs:
            labels = inputs["labels"][b][keep]
            rows["labels"].append(torch.cat([labels[:at], labels.new_full((count,), IGNORE_INDEX), labels[at:]]))
    length = max(len(r) for r in rows["input_ids"])

    def pad(row: torch.Tensor, value: Any) -> torch.Tensor:
        filler = row.new_full((length - len(row),), value)
        return torch.cat([filler, row] if left_padding else [row, filler])

    out = dict(inputs)
    out["input_ids"] = torch.stack([pad(r, pad_id) for r in rows["input_ids"]])
    out["attention_mask"] = torch.stack([pad(torch.ones_like(r), 0) for r in rows["input_ids"]])
    if "labels" in inputs:
        out["labels"] = torch.stack([pad(r, IGNORE_INDEX) for r in rows["labels"]])
    return out, torch.stack([pad(r, False) for r in rows["slots"]])


def concept_attention(probs: torch.Tensor, slots: ConceptSlots, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's attention around the concept slots as ((B, H, Q, K), query mask (B, Q)).

    ``to_concept``: what each later real token pays to each slot (the paper's form; Q = queries).
    ``from_concept``: each slot's own attention row over the real tokens (the reference code; Q = keys).
    """
    batch, heads, length, _ = probs.shape
    positions = slots.positions.to(probs.device)  # (B, K)
    real = slots.attention_mask.to(probs.device).bool()  # (B, T)
    if form == "to_concept":
        onto = probs.gather(3, positions[:, None, None, :].expand(batch, heads, length, positions.shape[1]))
        last = (positions * slots.active.to(probs.device)).max(dim=1).values  # (B,) last slot
        after = torch.arange(length, device=probs.device)[None, :] > last[:, None]
        return onto, real & after
    rows = probs.gather(2, positions[:, None, :, None].expand(batch, heads, positions.shape[1], length))
    return rows.transpose(2, 3), real  # (B, H, T, K)


def concept_rows(query: torch.Tensor, key: torch.Tensor, scaling: Optional[float], slots: ConceptSlots
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``from_concept`` attention from query (B, H, T, d) and key (B, H_kv, T, d) states, concept rows only:
    softmax(q_slot k^T * scaling) over the real tokens up to the slot, as eager attention computes it."""
    batch, heads, length, width = query.shape
    positions = slots.positions.to(query.device)  # (B, K)
    rows = query.gather(2, positions[:, None, :, None].expand(batch, heads, positions.shape[1], width))
    keys = key.repeat_interleave(heads // key.shape[1], dim=1)  # grouped-query attention shares key heads
    scores = torch.matmul(rows, keys.transpose(2, 3)) * (scaling if scaling is not None else width**-0.5)
    real = slots.attention_mask.to(query.device).bool()  # (B, T)
    visible = real[:, None, :] & (torch.arange(length, device=query.device)[None, None, :] <= positions[..., None])
    scores = scores.masked_fill(~visible[:, None], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # (B, H, K, T)
    return probs.transpose(2, 3), real


@register_backbone("llava", model_types=["llava"])
class LlavaBackbone(Backbone):
    injection_points = ("projector_input", "projector_output")
    attention_forms = ("from_concept", "to_concept")
    default_prompt = CAPTION_PROMPT
    model_class: ClassVar[type] = LlavaForConditionalGeneration

    def __init__(self, model: torch.nn.Module, processor: Any, config: BackboneConfig):
        super().__init__(model, processor, config)
        if not getattr(processor, "chat_template", None):
            raise ValueError(
                f"the processor of {config.name_or_path!r} has no chat template; set processor.chat_template "
                "(e.g. LLaVA-1.5's 'USER: <image>\\n{prompt} ASSISTANT:' Jinja template) and save it with the model"
            )
        self._injectors: OrderedDict[int, "ConceptInjector"] = OrderedDict()  # the attached one, by its handle
        self._slots: Optional[ConceptSlots] = None  # set while a forward with concept slots runs
        self._penalty_form: Optional[str] = None  # set inside penalize_attention

    @classmethod
    def load(cls, config: BackboneConfig) -> "LlavaBackbone":
        device, dtype = resolve_device_dtype(config)
        processor = pretrained_call(AutoProcessor, config, "processor")
        model = pretrained_call(cls.model_class, config, "model", dtype=dtype)
        logger.info("loaded %s %s on %s (%s)", cls.backbone_type, config.name_or_path, device, dtype)
        return cls(model.to(device), processor, config)

    @property
    def concept_dim(self) -> int:
        config = self.model.config
        if self.injection == "projector_output":
            return config.text_config.hidden_size
        layers = config.vision_feature_layer  # the projector takes one hidden state, or several concatenated
        return config.vision_config.hidden_size * (1 if isinstance(layers, int) else len(layers))

    def training_defaults(self, task: str = "caption") -> dict[str, Any]:
        return {"reg_lambda": 10.0 if task == "vqa" else 0.0075}  # the reference code's LLaVA configs

    # ---- modules -----------------------------------------------------------------------------
    @property
    def projector(self) -> torch.nn.Module:
        return self.model.get_submodule("model.multi_modal_projector")

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.get_submodule("model.language_model")

    def _attention_modules(self) -> list[torch.nn.Module]:
        layers = getattr(self.language_model, "layers", None)
        if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
            raise ValueError(f"{type(self.language_model).__name__} has no layers[i].self_attn to read attention from")
        return [layer.self_attn for layer in layers]

    # ---- hooks -------------------------------------------------------------------------------
    def install_hooks(self, injector: "ConceptInjector") -> list[RemovableHandle]:
        if self._injectors:
            raise RuntimeError("another ConceptInjector is attached to this backbone; detach it first")
        registration = RemovableHandle(self._injectors)  # removing it forgets the injector
        self._injectors[registration.id] = injector
        handles = [
            registration,
            self.projector.register_forward_hook(self._build_tokens_hook(injector), with_kwargs=True),
            self.language_model.register_forward_pre_hook(self._fill_slots, with_kwargs=True),
        ]
        handles += [m.register_forward_hook(self._record_hook(injector)) for m in self._attention_modules()]
        return handles

    def _build_tokens_hook(self, injector: "ConceptInjector"):
        def build_tokens(module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            slots = self._slots
            if slots is None or slots.tokens is not None:
                return
            features = output if self.injection == "projector_output" else (args[0] if args else
                                                                           kwargs["image_features"])
            extra = injector.concept_tokens(features[slots.image_rows.to(features.device)])  # (B, N, D) views
            if extra is None:
                return
            tokens = extra[0]  # (B, K, D), norm-matched to each image's tokens at this point
            if self.injection == "projector_input":
                tokens = module.forward(tokens)  # the projector's own layers (its hooks do not run again)
            slots.tokens = tokens

        return build_tokens

    def _fill_slots(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
        slots, embeds = self._slots, kwargs.get("inputs_embeds")
        if (slots is None or slots.tokens is None or embeds is None or embeds.shape[0] != slots.mask.shape[0]
                or embeds.shape[1] < slots.mask.shape[1]):
            return None  # no concept, or a decoding step after the prompt (its slots are in the cache)
        tokens = slots.tokens[slots.active.to(slots.tokens.device)]  # (n_slots, D), in slot order
        mask = slots.mask.to(embeds.device)  # the prompt's; a forward without the cache holds the answer so far too
        mask = torch.nn.functional.pad(mask, (0, embeds.shape[1] - mask.shape[1]))[..., None]
        kwargs["inputs_embeds"] = embeds.masked_scatter(mask, tokens.to(embeds.device, embeds.dtype))
        return args, kwargs

    def _record_hook(self, injector: "ConceptInjector"):
        def record(module: torch.nn.Module, args: tuple, output: Any) -> None:
            slots, form = self._slots, self._penalty_form
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if slots is None or form is None or weights is None:
                return
            if isinstance(weights, tuple):  # (query, key, scaling) from SDPA_WITH_QUERY_KEY
                if weights[0].shape[2] == slots.mask.shape[1]:
                    injector.record_attention(*concept_rows(*weights, slots))
            elif weights.shape[-2] == slots.mask.shape[1]:  # eager probabilities (B, H, T, T)
                injector.record_attention(*concept_attention(weights, slots, form))

        return record

    @contextmanager
    def penalize_attention(self, form: Optional[str] = None) -> Iterator[None]:
        form = self.resolve_attention_form(form)
        previous = self.model.config.text_config._attn_implementation
        # the concept rows come from the query/key states; whole columns need eager's full probabilities
        recording = SDPA_WITH_QUERY_KEY if form == "from_concept" else "eager"
        self.model.set_attn_implementation({"text_config": recording})
        self._penalty_form = form
        try:
            yield
        finally:
            self._penalty_form = None
            self.model.set_attn_implementation({"text_config": previous})

    # ---- concept slots -----------------------------------------------------------------------
    @property
    def injector(self) -> Optional["ConceptInjector"]:
        return next(iter(self._injectors.values()), None)

    def _image_rows(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) the projector-input row of each image's view (LLaVA-1.5: one row per image)."""
        return torch.arange(inputs["input_ids"].shape[0])

    def with_concept_slots(
        self, inputs: dict[str, torch.Tensor], left_padding: bool = False
    ) -> tuple[dict[str, torch.Tensor], Optional[ConceptSlots]]:
        """``inputs`` with one slot per active concept of each sample (unchanged when none is active)."""
        injector = self.injector
        active = injector.active_mask if injector is not None else None
        if active is None:
            return inputs, None
        if active.shape[0] != inputs["input_ids"].shape[0]:
            raise ValueError(f"concepts were activated for {active.shape[0]} samples but the batch has "
                             f"{inputs['input_ids'].shape[0]}")
        tokenizer, config = self.tokenizer, self.model.config
        filler = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        inputs, mask = insert_slots(inputs, active.sum(dim=1).tolist(), config.image_token_id, filler, filler,
                                    left_padding)
        positions = torch.zeros(active.shape, dtype=torch.long, device=mask.device)
        positions[active.to(mask.device)] = mask.nonzero()[:, 1]  # row-major: sample b's slots in order
        slots = ConceptSlots(mask, positions, active, inputs["attention_mask"], self._image_rows(inputs))
        return inputs, slots

    @contextmanager
    def _slots_in_use(self, slots: Optional[ConceptSlots]) -> Iterator[None]:
        self._slots = slots
        try:
            yield
        finally:
            self._slots = None

    # ---- data --------------------------------------------------------------------------------
    def question_prompt(self, question: str) -> str:
        return question.strip()  # the chat template turns it into a user turn

    def caption_prompt(self, identifiers: Sequence[str] = ()) -> Optional[str]:
        if not identifiers:
            return CAPTION_PROMPT
        names = list(identifiers)
        joined = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
        return CONCEPT_CAPTION_PROMPT.format(joined)

    def chat(self, prompt: Optional[str]) -> str:
        """The processor's chat template around one image and ``prompt``, ending where the answer starts."""
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt or
                                                                         self.default_prompt}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def _encode(self, images: Sequence[Image.Image], texts: Sequence[str], padding_side: str) -> dict[str, Any]:
        self.tokenizer.padding_side = padding_side
        inputs = self.processor(images=list(images), text=list(texts), return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    def prepare_batch(
        self, images: Sequence[Image.Image], targets: Sequence[str], prompts: Optional[Sequence[str]] = None
    ) -> dict[str, torch.Tensor]:
        chats = [self.chat(p) for p in (prompts if prompts is not None else [None] * len(targets))]
        eos = self.tokenizer.eos_token or ""
        inputs = self._encode(images, [f"{c} {t.strip()}{eos}" for c, t in zip(chats, targets)], "right")
        ids = inputs["input_ids"]
        # the prompt's length: the chat alone, with its one <image> expanded as in the full text
        expanded = (ids == self.model.config.image_token_id).sum(dim=1) - 1
        chat_lengths = torch.tensor([len(self.tokenizer(c).input_ids) for c in chats], device=ids.device)
        labels = ids.clone()
        positions = torch.arange(ids.shape[1], device=ids.device)[None, :]
        labels[positions < (chat_lengths + expanded)[:, None]] = IGNORE_INDEX
        labels[inputs["attention_mask"] == 0] = IGNORE_INDEX
        inputs["labels"] = labels
        return inputs

    def sequence_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs, slots = self.with_concept_slots(batch)
        labels = inputs["labels"]
        inputs = {k: v for k, v in inputs.items() if k != "labels"}  # the loss is per sample, computed here
        labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()
        start = int(labelled[0]) if len(labelled) else labels.shape[1] - 1
        keep = labels.shape[1] - max(start - 1, 0)  # logits from the position that predicts the first target
        with self._slots_in_use(slots):
            logits = self.model(**inputs, logits_to_keep=keep).logits  # (B, keep, V)
        return token_losses(logits, labels[:, -keep:], shift=True)

    @torch.no_grad()
    def generate(
        self, images: Sequence[Image.Image], prompts: Optional[Sequence[str]] = None, **generate_kwargs: Any
    ) -> list[str]:
        chats = [self.chat(p) for p in (prompts if prompts is not None else [None] * len(images))]
        inputs, slots = self.with_concept_slots(self._encode(images, chats, "left"), left_padding=True)
        generate_kwargs.setdefault("max_new_tokens", self.config.max_new_tokens)
        generate_kwargs.setdefault("do_sample", False)
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        with self._slots_in_use(slots):
            output = self.model.generate(**inputs, **generate_kwargs)
        output = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]


@register_backbone("llava_next", model_types=["llava_next"])
class LlavaNextBackbone(LlavaBackbone):
    """LLaVA-NeXT: any-resolution images become a base view plus grid patches, all through the projector."""

    model_class = LlavaNextForConditionalGeneration

    def _image_rows(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) the projector row of each image's base (whole-image) view: images are concatenated patch lists."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.model.config
        counts = [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                  for size in inputs["image_sizes"].tolist()]
        return torch.tensor([0] + counts[:-1]).cumsum(dim=0)
