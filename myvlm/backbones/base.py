"""The backbone abstraction: one frozen Hugging Face VLM, wrapped, never modified.

    from myvlm.backbones import load_backbone
    backbone = load_backbone(BackboneConfig("Salesforce/blip2-opt-2.7b"))
    backbone.generate(images)                        # vanilla captions
    loss = backbone.sequence_loss(backbone.prepare_batch(images, targets))  # (B,)

A backbone knows where a concept token joins its visual features (``injection``), how
wide that token is (``concept_dim``), and how to register the hooks that do it
(``install_hooks``). The concept injector (``myvlm.injection``) owns the gating state.
Subclasses register themselves with ``@register_backbone`` and are picked by the
checkpoint's ``config.model_type``.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Optional, Sequence

import torch
from PIL import Image
from torch import nn

from myvlm.config import BackboneConfig

if TYPE_CHECKING:
    from myvlm.injection import ConceptInjector

logger = logging.getLogger(__name__)

_BACKBONES: dict[str, type["Backbone"]] = {}
_MODEL_TYPES: dict[str, str] = {}  # transformers config.model_type -> backbone registry key

IGNORE_INDEX = -100  # label value that the loss skips


class BackboneNotFoundError(OSError):
    """A checkpoint could not be loaded (offline, missing folder, wrong id)."""


def register_backbone(name: str, model_types: Sequence[str]) -> Callable[[type["Backbone"]], type["Backbone"]]:
    """Class decorator: make a backbone loadable by ``name`` and by checkpoint ``model_type``."""

    def wrap(cls: type[Backbone]) -> type[Backbone]:
        cls.backbone_type = name
        _BACKBONES[name] = cls
        for model_type in model_types:
            _MODEL_TYPES[model_type] = name
        return cls

    return wrap


def available_backbones() -> list[str]:
    return sorted(_BACKBONES)


def resolve_device_dtype(config: BackboneConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if config.dtype is None:
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        dtype = getattr(torch, config.dtype)
    except AttributeError:
        dtype = None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {config.dtype!r}; use float32, bfloat16 or float16")
    return device, dtype


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def pretrained_call(loader: Callable[..., Any], config: BackboneConfig, what: str, **kwargs: Any) -> Any:
    """Call ``loader.from_pretrained`` and turn "not found" into one clear, actionable error."""
    local_only = config.local_files_only if config.local_files_only is not None else _offline()
    source = config.name_or_path
    looks_local = source.startswith(("/", ".", "~")) or source.count("/") > 1  # hub ids are "org/name"
    if looks_local and not os.path.isdir(os.path.expanduser(source)):
        raise BackboneNotFoundError(f"backbone folder {source!r} does not exist")
    try:
        return loader.from_pretrained(source, revision=config.revision, local_files_only=local_only, **kwargs)
    except OSError as error:
        hint = (
            f"could not load the {what} of {source!r}"
            + (" (offline: HF_HUB_OFFLINE=1 or local_files_only)" if local_only else "")
            + f": {str(error).splitlines()[0] if str(error) else type(error).__name__}.\n"
            f"Download it where the internet is reachable (`hf download {source}`) and copy the Hugging Face "
            f"cache here, or point myvlm at a local folder holding the checkpoint (model.save_pretrained + "
            f"processor.save_pretrained): `--backbone /path/to/{source.split('/')[-1]}` in the shell, "
            f"`backbone=\"/path/to/{source.split('/')[-1]}\"` in Python."
        )
        raise BackboneNotFoundError(hint) from error


class Backbone(ABC):
    """A frozen VLM plus its processor. Subclasses implement the model-specific parts."""

    backbone_type: ClassVar[str]
    injection_points: ClassVar[tuple[str, ...]]  # first one is the default
    default_prompt: ClassVar[Optional[str]] = None  # captioning prompt, for backbones that take one
    attention_forms: ClassVar[tuple[str, ...]] = ("to_concept",)  # regularizer forms it records; first = default
    supports_routing: ClassVar[bool] = False  # learned queries a concept token can be routed to (myvlm.injection.Route)

    def __init__(self, model: nn.Module, processor: Any, config: BackboneConfig):
        self.model = model
        self.processor = processor
        self.config = config
        self.injection = config.injection or self.injection_points[0]
        if self.injection not in self.injection_points:
            raise ValueError(
                f"{self.backbone_type} has no injection point {self.injection!r}; choose one of {self.injection_points}"
            )
        self.freeze()

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def load(cls, config: BackboneConfig) -> "Backbone":
        """Load model + processor from ``config.name_or_path`` (hub id or folder)."""

    def freeze(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def describe(self) -> dict[str, Any]:
        """What a concept file records about the backbone it was trained on."""
        return {
            "type": self.backbone_type,
            "name_or_path": self.config.name_or_path,
            "revision": self.config.revision or getattr(self.model.config, "_commit_hash", None),
            "model_type": self.model.config.model_type,
            "injection": self.injection,
            "concept_dim": self.concept_dim,
        }

    # ---- injection -----------------------------------------------------------------------
    @property
    @abstractmethod
    def concept_dim(self) -> int:
        """Width of one concept token at the current injection point."""

    @abstractmethod
    def install_hooks(self, injector: "ConceptInjector") -> list[torch.utils.hooks.RemovableHandle]:
        """Register the hooks that append concept tokens and record concept attention."""

    def resolve_attention_form(self, form: Optional[str]) -> str:
        """The regularizer form to use: ``form`` if this backbone records it, its default for None."""
        if form is None:
            return self.attention_forms[0]
        if form not in self.attention_forms:
            raise ValueError(
                f"{self.backbone_type} cannot penalise attention of form {form!r}; choose one of {self.attention_forms}"
            )
        return form

    @contextmanager
    def penalize_attention(self, form: Optional[str] = None) -> Iterator[None]:
        """Inside the block the hooks record the attention that ``injector.attention_penalty`` sums.

        Backbones whose hooks always record (BLIP-2) only check ``form``; others switch on what
        recording needs (LLaVA: eager attention in the language model) for the block only.
        """
        self.resolve_attention_form(form)
        yield

    def training_defaults(self, task: str = "caption") -> dict[str, Any]:
        """TrainConfig values this backbone trains with by default for ``task`` ("caption" or "vqa")."""
        return {}

    # ---- data ------------------------------------------------------------------------------
    def question_prompt(self, question: str) -> str:
        """How a question is put to this model (BLIP-2's "Question: ... Answer:" format by default)."""
        return f"Question: {question.strip()} Answer:"

    def caption_prompt(self, identifiers: Sequence[str] = ()) -> Optional[str]:
        """The captioning prompt for an image whose active concepts are called ``identifiers``."""
        return self.default_prompt

    @abstractmethod
    def prepare_batch(
        self, images: Sequence[Image.Image], targets: Sequence[str], prompts: Optional[Sequence[str]] = None
    ) -> dict[str, torch.Tensor]:
        """Model inputs plus ``labels`` (IGNORE_INDEX everywhere but the target text)."""

    @abstractmethod
    def sequence_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample mean token cross-entropy of the targets, shape (B,)."""

    @abstractmethod
    def generate(
        self, images: Sequence[Image.Image], prompts: Optional[Sequence[str]] = None, **generate_kwargs: Any
    ) -> list[str]:
        """Decoded generations (prompt removed), one per image."""


def token_losses(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """Per-sample mean cross-entropy over labelled tokens. logits (B, T, V), labels (B, T) -> (B,)."""
    if shift:  # decoder-only: position t predicts token t+1
        logits, labels = logits[:, :-1], labels[:, 1:]
    losses = nn.functional.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B, T)
    counts = (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return losses.sum(dim=1) / counts


def load_backbone(config: BackboneConfig | str) -> Backbone:
    """Load the backbone named by ``config`` (a BackboneConfig or a hub id / folder)."""
    if isinstance(config, str):
        config = BackboneConfig(name_or_path=config)
    backbone_type = config.type
    if backbone_type is None:
        from transformers import AutoConfig

        model_config = pretrained_call(AutoConfig, config, "configuration")
        backbone_type = _MODEL_TYPES.get(model_config.model_type)
        if backbone_type is None:
            raise ValueError(
                f"{config.name_or_path!r} is a {model_config.model_type!r} model; myvlm supports "
                f"{sorted(_MODEL_TYPES)}"
            )
    if backbone_type not in _BACKBONES:
        raise ValueError(f"unknown backbone type {backbone_type!r}; available: {available_backbones()}")
    return _BACKBONES[backbone_type].load(config)
