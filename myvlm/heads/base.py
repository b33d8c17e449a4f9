"""Concept heads: the toggles of MyVLM.

A head decides *whether* its concept is in an image. It owns its decision: ``fit`` learns
from positives (and negatives), ``score`` returns one number per image, and ``detect``
compares scores to the head's threshold. Nothing downstream inspects a head's type.

    from myvlm.heads import build_head
    head = build_head("clip_probe", feature_extractor=my_extractor)
    head.fit(positive_images, negative_images)
    head.detect(images)  # -> [Detection(score=0.93, threshold=0.5, fired=True), ...]

Heads are saved inside a concept directory: ``head.config()`` (JSON-able) and
``head.state_dict()`` (tensors, stored as safetensors) round-trip through
``load_head(config, tensors, **runtime)``. Runtime objects (feature extractors, face
detectors) are not saved; the config names them so they can be rebuilt.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch
from PIL import Image

logger = logging.getLogger(__name__)

_HEADS: dict[str, type["ConceptHead"]] = {}


@dataclass(frozen=True)
class Detection:
    """The decision of one head on one image."""

    score: float  # the head's own score (probability, similarity, distance, ...)
    threshold: float  # the threshold the score was compared to
    fired: bool  # True when the concept is judged present
    # where in the image the head found the concept best, (left, top, right, bottom) as fractions of the image,
    # for heads that judge parts of it (a crop-scoring clip_probe's best crop, a face head's closest or matched
    # face); None = the whole image or not said. A routed concept is looked for inside it (``myvlm.injection.Route``).
    box: Optional[tuple[float, float, float, float]] = None


class ConceptHead(ABC):
    """Base class of every concept head. Subclasses register with ``@register_head``."""

    head_type: ClassVar[str]  # registry key, written into the concept JSON
    higher_is_present: ClassVar[bool] = True  # False for distance-like scores

    def __init__(self, threshold: float):
        self.threshold = float(threshold)

    @abstractmethod
    def fit(self, positives: Sequence[Image.Image], negatives: Sequence[Image.Image] = ()) -> None:
        """Learn the concept from a few positive images (and optional negatives)."""

    @abstractmethod
    def score(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """One float score per image, shape (B,)."""

    def detect(self, images: Sequence[Image.Image]) -> list[Detection]:
        scores = self.score(images)
        fired = scores >= self.threshold if self.higher_is_present else scores <= self.threshold
        return [Detection(float(s), self.threshold, bool(f)) for s, f in zip(scores.tolist(), fired.tolist())]

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-able description (no tensors). Must include everything ``from_state`` needs."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to save (weights, reference embeddings)."""

    @classmethod
    @abstractmethod
    def from_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], **runtime: Any) -> "ConceptHead":
        """Rebuild a fitted head. ``runtime`` carries objects that are not saved (e.g. feature_extractor)."""


def register_head(name: str) -> Callable[[type[ConceptHead]], type[ConceptHead]]:
    """Class decorator: make a head buildable and loadable by ``name``."""

    def wrap(cls: type[ConceptHead]) -> type[ConceptHead]:
        if name in _HEADS and _HEADS[name] is not cls:
            raise ValueError(f"a concept head named {name!r} is already registered ({_HEADS[name].__name__})")
        cls.head_type = name
        _HEADS[name] = cls
        return cls

    return wrap


def head_class(name: str) -> type[ConceptHead]:
    if name not in _HEADS:
        raise KeyError(f"unknown concept head {name!r}; registered heads: {sorted(_HEADS)}")
    return _HEADS[name]


def available_heads() -> list[str]:
    return sorted(_HEADS)


def build_head(name: str, **kwargs: Any) -> ConceptHead:
    """Build an unfitted head by registry name."""
    return head_class(name)(**kwargs)


def load_head(config: dict[str, Any], tensors: dict[str, torch.Tensor], **runtime: Any) -> ConceptHead:
    """Rebuild a fitted head from what a concept directory stores."""
    return head_class(config["type"]).from_state(config, tensors, **runtime)


@register_head("always")
class AlwaysOnHead(ConceptHead):
    """A head that always fires: for training the embedding, or forcing a concept on by hand."""

    def __init__(self, threshold: float = 0.5):
        super().__init__(threshold)

    def fit(self, positives: Sequence[Image.Image], negatives: Sequence[Image.Image] = ()) -> None:
        return None

    def score(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.ones(len(images))

    def config(self) -> dict[str, Any]:
        return {"type": self.head_type, "threshold": self.threshold}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def from_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], **runtime: Any) -> "AlwaysOnHead":
        return cls(threshold=config.get("threshold", 0.5))
