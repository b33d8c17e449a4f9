"""A frozen VLM with a set of concepts: captions and answers that name what the heads recognise.

    vlm = MyVLM(backbone, [load_concept("concepts/my_dog")])
    results = vlm.caption(["beach.jpg", "park.jpg"])
    results[0].text          # "sks is lying on the beach"
    results[0].detections    # {"my_dog": Detection(score=0.97, threshold=0.5, fired=True)}

For every image, each concept's head decides whether the concept is present; the active
concepts of each image are injected for that image only, so one batch mixes images with
and without concepts. Images with no active concept get exactly the vanilla output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from myvlm.backbones.base import Backbone
from myvlm.concept import Concept, ConceptError
from myvlm.data import display_identifier
from myvlm.heads import Detection, detect_concepts
from myvlm.images import ImageLike, load_image
from myvlm.injection import Box, ConceptBank, ConceptInjector
from myvlm.look import seen_box

logger = logging.getLogger(__name__)


@dataclass
class CaptionResult:
    text: str  # the generated caption or answer
    active: list[str]  # concepts injected for this image
    detections: dict[str, Detection] = field(default_factory=dict)  # every head's decision, by concept name
    source: str = ""  # file name when the image came from a path

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.source, "text": self.text, "active": self.active,
            "detections": {n: {"score": d.score, "threshold": d.threshold, "fired": d.fired,
                               **({"box": list(d.box)} if d.box is not None else {})}
                           for n, d in self.detections.items()},
        }


def _source_name(source: ImageLike) -> str:
    return "" if isinstance(source, Image.Image) else str(source)


class MyVLM:
    """A backbone plus concepts. Concepts are checked against the backbone when added."""

    def __init__(self, backbone: Backbone, concepts: Sequence[Concept] = (), strict_backbone: bool = True):
        self.backbone = backbone
        self.strict_backbone = strict_backbone
        self.concepts: dict[str, Concept] = {}
        for concept in concepts:
            self.add(concept)

    def add(self, concept: Concept) -> None:
        concept.check_compatible(self.backbone, strict_name=self.strict_backbone)
        if concept.name in self.concepts:
            raise ConceptError(f"a concept named {concept.name!r} is already loaded")
        self.concepts[concept.name] = concept

    def remove(self, name: str) -> None:
        self.concepts.pop(name)

    def _bank(self) -> ConceptBank:
        names = list(self.concepts)
        values = (torch.stack([self.concepts[n].embedding for n in names]) if names
                  else torch.zeros(0, self.backbone.concept_dim))
        routes = [self.concepts[n].route for n in names]
        bank = ConceptBank(names, self.backbone.concept_dim, values=values,
                           routes=routes if any(routes) else None).to(self.backbone.device)
        bank.requires_grad_(False)
        return bank

    def detect(self, images: Sequence[Any], only: Optional[Sequence[str]] = None) -> list[dict[str, Detection]]:
        """Every head's decision for every image (concepts without a head are never detected)."""
        names = [n for n in (only if only is not None else self.concepts) if self.concepts[n].head is not None]
        return detect_concepts(images, {name: self.concepts[name].head for name in names})

    def _boxes(self, images: list[Image.Image], active: list[list[str]],
               detections: list[dict[str, Detection]]) -> list[list[Optional[Box]]]:
        """Where each active concept's head found it in each image (``Detection.box``), as fractions of what the
        backbone's processor passes to the model; None where no head said (a forced concept whose head did not
        run) or the box was cropped away."""
        return [[seen_box(self.backbone.processor, row[n].box, image.size) if n in row and row[n].box else None
                 for n in names] for image, names, row in zip(images, active, detections)]

    def _run(
        self, images: Sequence[ImageLike], prompt_for: Callable[[list[str]], Optional[str]],
        concepts: Optional[Sequence[str]], force: Optional[Sequence[str]], batch_size: int, progress: bool,
        **generate_kwargs: Any,
    ) -> list[CaptionResult]:
        """``prompt_for(active concept names)`` gives each image's prompt (None = the backbone's plain one)."""
        unknown = set(concepts or ()) | set(force or ())
        unknown -= set(self.concepts)
        if unknown:
            raise ConceptError(f"unknown concept(s) {sorted(unknown)}; loaded: {sorted(self.concepts)}")
        bank, results = self._bank(), []
        starts = range(0, len(images), batch_size)
        with ConceptInjector(self.backbone, bank) as injector:
            for start in tqdm(starts, desc="captioning", disable=not progress or len(starts) < 2):
                sources = images[start : start + batch_size]
                loaded = [load_image(s) for s in sources]
                detections = self.detect(loaded, only=concepts)
                active = [sorted({n for n, d in row.items() if d.fired} | set(force or ())) for row in detections]
                batch_prompts = [prompt_for(names) for names in active]
                batch_prompts = None if all(p is None for p in batch_prompts) else [p or "" for p in batch_prompts]
                with injector.activate(active, self._boxes(loaded, active, detections)):
                    texts = self.backbone.generate(loaded, batch_prompts, **generate_kwargs)
                for text, names, row, src in zip(texts, active, detections, sources):
                    results.append(CaptionResult(text, names, row, _source_name(src)))
        return results

    def caption(
        self, images: Sequence[ImageLike], concepts: Optional[Sequence[str]] = None,
        force: Optional[Sequence[str]] = None, prompt: Optional[str] = None, batch_size: int = 8,
        progress: bool = True, **generate_kwargs: Any,
    ) -> list[CaptionResult]:
        """Caption images; ``concepts`` limits which heads run, ``force`` activates concepts without heads (a forced
        concept whose head runs is still located where the head found it best, ``Detection.box``)."""
        images = list(images)
        if prompt is not None:
            prompt_for = lambda names: prompt or None  # noqa: E731
        else:  # the backbone's captioning prompt, naming the image's active concepts where it takes them
            prompt_for = lambda names: self.backbone.caption_prompt(  # noqa: E731
                [display_identifier(self.concepts[n].identifier, self.concepts[n].kind) for n in names])
        return self._run(images, prompt_for, concepts, force, batch_size, progress, **generate_kwargs)

    def ask(
        self, images: Sequence[ImageLike], question: str, concepts: Optional[Sequence[str]] = None,
        force: Optional[Sequence[str]] = None, batch_size: int = 8, progress: bool = True, **generate_kwargs: Any,
    ) -> list[CaptionResult]:
        """Answer ``question`` about each image, with the concepts its heads recognise."""
        images = list(images)
        prompt = self.backbone.question_prompt(question)
        return self._run(images, lambda names: prompt, concepts, force, batch_size, progress, **generate_kwargs)
