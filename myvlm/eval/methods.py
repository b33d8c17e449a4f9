"""What the protocol evaluates: a method learns a concept from N photos, then captions and answers.

    method = MyVLMMethod(train={"steps": 100})            # head + concept embedding (the paper)
    personalized = method.fit(context)                   # context: backbone, photos, head, ...
    personalized.caption(images)[0].text                 # "sks is lying on the beach"
    personalized.train_seconds, personalized.saved_bytes

A ``Method`` is a small config (``describe()`` is recorded with the results, so a resumed run
can refuse to mix settings); ``fit`` returns a ``Personalized`` that captions and answers until
``close()``. The baselines (``myvlm.eval.baselines``) follow the same interface.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from PIL import Image

from myvlm.api import personalize
from myvlm.backbones.base import Backbone
from myvlm.data import display_identifier, identifier_pattern, name_to_identifier
from myvlm.heads import ConceptHead, Detection, build_head
from myvlm.heads.features import image_digest
from myvlm.model import MyVLM

logger = logging.getLogger(__name__)


@dataclass
class Output:
    text: str  # the caption or answer
    prompt: Optional[str]  # the prompt the model was given (None = plain captioning)
    detections: dict[str, Detection] = field(default_factory=dict)  # concept heads' decisions, by concept


@dataclass
class HeadSpec:
    """How to build a fresh concept head for every (concept, split)."""

    name: str = "clip_probe"  # registry name
    kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {"feature_extractor": shared CachedFeatures}

    def build(self) -> ConceptHead:
        return build_head(self.name, **self.kwargs)

    def describe(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            if hasattr(value, "describe"):
                return value.describe()
            return value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else repr(value)

        return {"name": self.name, "kwargs": {k: plain(v) for k, v in sorted(self.kwargs.items())}}


class VanillaOutputs:
    """The frozen backbone's captions and answers, computed once per (image, prompt)."""

    def __init__(self, backbone: Backbone, batch_size: int = 8):
        self.backbone, self.batch_size = backbone, batch_size
        self._cache: dict[tuple[str, Optional[str]], str] = {}

    @property
    def caption_prompt(self) -> Optional[str]:
        return self.backbone.caption_prompt([])

    def generate(self, images: Sequence[Image.Image], prompt: Optional[str]) -> list[str]:
        keys = [(image_digest(image), prompt) for image in images]
        todo = {key: image for key, image in zip(keys, images) if key not in self._cache}
        pending = list(todo.items())
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start : start + self.batch_size]
            prompts = [prompt] * len(chunk) if prompt else None
            for (key, _), text in zip(chunk, self.backbone.generate([im for _, im in chunk], prompts)):
                self._cache[key] = text
        return [self._cache[key] for key in keys]

    def captions(self, images: Sequence[Image.Image]) -> list[str]:
        return self.generate(images, self.caption_prompt)

    def answers(self, images: Sequence[Image.Image], question: str) -> list[str]:
        return self.generate(images, self.backbone.question_prompt(question))


@dataclass
class FitContext:
    """Everything a method may learn from for one (concept, split)."""

    backbone: Backbone
    concept: str  # concept (folder) name
    class_word: str  # "dog"
    identifier: str  # "sks"
    kind: str  # "object" or "person"
    images: list[Image.Image]  # the N training photos
    sources: list[str]  # their names ("concept/01.jpg")
    captions: Optional[list[list[str]]]  # their target captions; None = the frozen model's, class word -> identifier
    head: HeadSpec  # the concept head to fit (MyVLM)
    head_negatives: Optional[list[Image.Image]]  # negatives for the head; None = the head's default
    vanilla: VanillaOutputs  # the frozen model's outputs
    work_dir: Path  # where artifacts are saved (and measured)
    batch_size: int = 8  # images per generate call
    mirrored_captions: Optional[list[list[str]]] = None  # per photo, captions of its mirror image ([] = its own)

    def question(self, question: str) -> str:
        """The question with the concept named by its identifier, as the personalized model is asked."""
        return name_to_identifier(question, self.concept, self.identifier, self.kind)


class Personalized(ABC):
    """A method fitted to one concept: captions and answers, plus what fitting cost."""

    train_seconds: float = 0.0  # wall time of fitting (head + training)
    saved_bytes: int = 0  # size of what must be stored to reuse the personalization
    saved_what: str = ""  # what those bytes are
    training: dict[str, Any]  # losses, steps, resolved config (recorded once per run)

    @abstractmethod
    def caption(self, images: Sequence[Image.Image]) -> list[Output]:
        """One caption per image."""

    @abstractmethod
    def ask(self, images: Sequence[Image.Image], question: str) -> list[Output]:
        """One answer per image; ``question`` names the concept by its identifier."""

    def close(self) -> None:
        """Release what fitting attached to the backbone."""


class Method(ABC):
    """A personalization method under evaluation."""

    name: str
    n_train: Optional[int] = None  # training photos; None = the protocol's

    def describe(self) -> dict[str, Any]:
        out = {"class": type(self).__name__}
        if dataclasses.is_dataclass(self):
            out.update(dataclasses.asdict(self))
        return out

    @abstractmethod
    def fit(self, context: FitContext) -> Personalized:
        """Learn the concept of ``context``."""


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def with_injection(backbone: Backbone, injection: Optional[str]) -> Backbone:
    """The same frozen weights seen through another injection point (no copy, no reload)."""
    if injection is None or injection == backbone.injection:
        return backbone
    if injection not in backbone.injection_points:
        raise ValueError(f"{backbone.backbone_type} has no injection point {injection!r}: {backbone.injection_points}")
    return type(backbone)(backbone.model, backbone.processor, dataclasses.replace(backbone.config, injection=injection))


@dataclass
class MyVLMMethod(Method):
    """MyVLM: a concept head decides when, a learned concept embedding says what."""

    name: str = "myvlm"  # column name in the tables
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides over the backbone's defaults
    n_train: Optional[int] = None  # training photos; None = the protocol's (ablation: 1, 2)
    injection: Optional[str] = None  # injection point; None = the backbone's (ablation: LLaVA projector in/out)
    task: str = "caption"  # "caption" or "vqa" (personalize's task)

    def fit(self, context: FitContext) -> Personalized:
        backbone = with_injection(context.backbone, self.injection)
        started = time.perf_counter()
        extra = {"task": self.task} if self.task != "caption" else {}
        concept = personalize(
            context.images, name=context.concept, identifier=context.identifier, captions=context.captions,
            class_word=context.class_word, kind=context.kind, backbone=backbone, negatives=context.head_negatives,
            head=context.head.build(), train=dict(self.train), progress=False,
            mirrored_captions=context.mirrored_captions, **extra,
        )
        seconds = time.perf_counter() - started
        folder = concept.save(context.work_dir / safe_name(f"{self.name}-{context.concept}"), overwrite=True)
        return PersonalizedMyVLM(MyVLM(backbone, [concept]), seconds, folder_bytes(folder), context.batch_size)


class PersonalizedMyVLM(Personalized):
    saved_what = "concept folder (concept.json + embedding + head)"

    def __init__(self, vlm: MyVLM, seconds: float, saved_bytes: int, batch_size: int):
        self.vlm, self.train_seconds, self.saved_bytes, self.batch_size = vlm, seconds, saved_bytes, batch_size
        (self.concept,) = vlm.concepts.values()
        self.training = {k: v for k, v in self.concept.training.items() if k != "images"}

    def caption(self, images: Sequence[Image.Image]) -> list[Output]:
        results = self.vlm.caption(images, batch_size=self.batch_size, progress=False)
        shown = display_identifier(self.concept.identifier, self.concept.kind)
        backbone = self.vlm.backbone
        return [Output(r.text, backbone.caption_prompt([shown] if r.active else []), r.detections) for r in results]

    def ask(self, images: Sequence[Image.Image], question: str) -> list[Output]:
        results = self.vlm.ask(images, question, batch_size=self.batch_size, progress=False)
        prompt = self.vlm.backbone.question_prompt(question)
        return [Output(r.text, prompt, r.detections) for r in results]


def class_question(question: str, identifier: str, class_word: str) -> str:
    """'What color is sks?' -> 'What color is the dog?' (how the frozen model is asked)."""
    from myvlm.vqa import class_phrase

    return identifier_pattern(identifier).sub(class_phrase(class_word), question)
