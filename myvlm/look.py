"""Starting a concept vector from how the concept looks to the VLM (``TrainConfig.init = "look"``).

    vector = look_vector(backbone, photos, boxes)   # (D,) at the backbone's injection point

The vector is the mean image token at the injection point (BLIP-2: the vision encoder's output the
Q-Former reads; LLaVA: the projector input or output) over the part of each photo that shows the
concept: the box the concept head found it in (``head_boxes``: a crop-scoring ``clip_probe`` names the
crop it learned from each photo, a face head the person's face), the whole photo otherwise. A token that
looks like the object is what lets the model tell *which* object it names; a random start has to find that
look in a few steps (measured on the toy world, ``myvlm.toyworld``: README, "Context, diagnosed").

Boxes are fractions ``(left, top, right, bottom)`` of the photo. ``seen_box`` maps them to what the
backbone's processor passes on: the same box where it resizes the whole photo (BLIP-2's), the part inside
the crop where it resizes the shortest edge and crops the centre (CLIP's, LLaVA-1.5's: a wide photo loses
its sides); LLaVA-NeXT's base view is the whole photo squashed to a square, so its boxes are kept too.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from PIL import Image

from myvlm.injection import Box, ConceptBank, ConceptInjector, box_mask

if TYPE_CHECKING:
    from myvlm.backbones.base import Backbone

logger = logging.getLogger(__name__)

WHOLE: Box = (0.0, 0.0, 1.0, 1.0)


class _ImageTokens(ConceptInjector):
    """An injector that records the image tokens at the injection point (and appends its one token)."""

    def __init__(self, backbone: "Backbone"):
        super().__init__(backbone, ConceptBank(["look"], backbone.concept_dim))
        self.tokens: list[torch.Tensor] = []

    def concept_tokens(self, image_tokens: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        self.tokens.append(image_tokens.detach().float())
        return super().concept_tokens(image_tokens)


@torch.no_grad()
def image_tokens(backbone: "Backbone", images: Sequence[Image.Image]) -> torch.Tensor:
    """(B, T, D): the tokens a concept token joins, for each image (one forward, through the backbone's hooks)."""
    recorder = _ImageTokens(backbone)
    with recorder, recorder.activate([["look"]] * len(images)):
        backbone.generate(list(images), max_new_tokens=1)
    if len(recorder.tokens) != 1:
        raise RuntimeError(f"expected one forward through the injection point, saw {len(recorder.tokens)}")
    return recorder.tokens[0]


def seen_box(processor: Any, box: Box, size: tuple[int, int]) -> Optional[Box]:
    """``box`` (fractions of a photo of ``size`` = (width, height)) as fractions of the image ``processor`` passes
    to the vision encoder; None when the box lies wholly outside it (cropped away)."""
    images = getattr(processor, "image_processor", processor)
    if getattr(images, "image_grid_pinpoints", None):  # LLaVA-NeXT: the tokens a concept joins are its base view,
        return box  # the whole photo resized to a square, nothing cropped (the grid patches come after it)
    resize, crop = getattr(images, "size", None), getattr(images, "crop_size", None)
    shortest = resize.get("shortest_edge") if hasattr(resize, "get") else None
    crop_w, crop_h = (crop.get("width"), crop.get("height")) if hasattr(crop, "get") else (None, None)
    if not getattr(images, "do_center_crop", False) or not (shortest and crop_w and crop_h):
        return box  # the whole photo is resized: fractions are kept
    width, height = size
    scale = shortest / min(width, height)  # resized so that the shortest edge is `shortest` pixels
    left0, top0 = (width * scale - crop_w) / 2, (height * scale - crop_h) / 2  # the crop's corner, resized pixels

    def inside(value: float, extent: float, offset: float, side: float) -> float:
        return min(max((value * extent * scale - offset) / side, 0.0), 1.0)

    left, top, right, bottom = box
    seen = (inside(left, width, left0, crop_w), inside(top, height, top0, crop_h),
            inside(right, width, left0, crop_w), inside(bottom, height, top0, crop_h))
    return seen if seen[2] > seen[0] and seen[3] > seen[1] else None


def look_vectors(backbone: "Backbone", images: Sequence[Image.Image],
                 boxes: Optional[Sequence[Box]] = None) -> torch.Tensor:
    """(B, D): each image's mean token inside its box (fractions of the photo; None: whole images), from one
    forward over all of them."""
    if not images:
        raise ValueError("no images to take the concept's look from")
    boxes = list(boxes) if boxes is not None else [WHOLE] * len(images)
    if len(boxes) != len(images):
        raise ValueError(f"{len(boxes)} boxes for {len(images)} images")
    tokens = image_tokens(backbone, images)  # (B, T, D)
    means = []
    for row, box, image in zip(tokens, boxes, images):
        seen = seen_box(backbone.processor, box, image.size)
        if seen is None:
            logger.warning("the concept's box %s in a %dx%d photo is cropped away by the processor: its look is "
                           "taken from the whole image", box, *image.size)
        mask = box_mask(row.shape[0], seen or WHOLE)
        if mask is None:
            logger.warning("image tokens (%d) are not a square grid: the look is their mean over the whole image",
                           row.shape[0])
        means.append(row.mean(dim=0) if mask is None else row[mask].mean(dim=0))
    return torch.stack(means).cpu()


def look_vector(backbone: "Backbone", images: Sequence[Image.Image],
                boxes: Optional[Sequence[Box]] = None) -> torch.Tensor:
    """(D,): the mean over ``images`` of each image's mean token inside its box (``look_vectors``)."""
    return look_vectors(backbone, images, boxes).mean(dim=0)


def head_boxes(head: Any, images: Sequence[Image.Image]) -> list[Box]:
    """Where the fitted ``head`` found the concept in each of its positive ``images``: the crop a
    crop-scoring ``clip_probe`` learned from each (``fit_report.regions``), else the box its ``detect`` reports
    (a face head: the closest face), else the whole image."""
    from myvlm.heads.features import crop_box, fraction_box

    regions = list(getattr(getattr(head, "fit_report", None), "regions", None) or [])
    if len(regions) != len(images):
        return [detection.box or WHOLE for detection in head.detect(list(images))]
    boxes = []
    for image, view in zip(images, regions):
        if view == "id":
            boxes.append(WHOLE)
            continue
        boxes.append(fraction_box(crop_box(view, *image.size), image.size))
    return boxes


__all__ = ["look_vector", "look_vectors", "head_boxes", "image_tokens", "box_mask", "seen_box"]
