"""Negative images for concept heads: the user's folder, the library's other concepts, a generic set.

    from myvlm.heads.negatives import collect_negatives
    negatives = collect_negatives("data/negatives")                      # the user's folder
    negatives = collect_negatives(library_concepts={"dog2": dog2_photos})  # other concepts + generic set

The generic set is drawn procedurally (gradients, shapes, stripes, noise, blobs), deterministic
from a seed; nothing is shipped as binary files. It only teaches a head that "not everything is
the concept": real photos of other things (ideally of the same class) are what keep false
positives down. See the README section on negatives for measured numbers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from myvlm.images import ImageError, IMAGE_SUFFIXES, load_image

logger = logging.getLogger(__name__)

GENERIC_SIZE = 224  # side of each generated image, in pixels
GENERIC_TAG = "myvlm_generic_negative"  # image.info key marking a drawn image
MIN_REAL_NEGATIVES = 30  # below this many real negative photos a probe warns about false positives


def _random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


def _gradient(rng: np.random.Generator, size: int) -> Image.Image:
    start, end = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
    t = np.clip((np.cos(angle) * xs + np.sin(angle) * ys + 1) / 2, 0, 1)[..., None]  # (H, W, 1)
    return Image.fromarray(((1 - t) * start + t * end).astype(np.uint8))


def _shapes(rng: np.random.Generator, size: int) -> Image.Image:
    image = _gradient(rng, size) if rng.random() < 0.5 else Image.new("RGB", (size, size), _random_color(rng))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 9))):
        x0, y0 = rng.integers(0, size, size=2)
        w, h = rng.integers(size // 10, size // 2, size=2)
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse(box, fill=_random_color(rng))
        elif kind == 1:
            draw.rectangle(box, fill=_random_color(rng))
        else:
            corners = [tuple(int(v) for v in rng.integers(0, size, size=2)) for _ in range(3)]
            draw.polygon(corners, fill=_random_color(rng))
    return image


def _stripes(rng: np.random.Generator, size: int) -> Image.Image:
    period = rng.uniform(6, size / 3)
    angle = rng.uniform(0, np.pi)
    ys, xs = np.mgrid[0:size, 0:size]
    wave = (np.sin((np.cos(angle) * xs + np.sin(angle) * ys) * 2 * np.pi / period) > 0)[..., None]
    a, b = np.array(_random_color(rng)), np.array(_random_color(rng))
    if rng.random() < 0.5:  # checkerboard instead of stripes
        cell = int(rng.integers(8, size // 4))
        wave = (((xs // cell) + (ys // cell)) % 2 == 0)[..., None]
    return Image.fromarray(np.where(wave, a, b).astype(np.uint8))


def _noise(rng: np.random.Generator, size: int) -> Image.Image:
    coarse = rng.integers(0, 256, size=(int(rng.integers(2, 16)),) * 2 + (3,), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    fine = rng.normal(0, rng.uniform(5, 40), size=(size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + fine, 0, 255).astype(np.uint8))


def _blobs(rng: np.random.Generator, size: int) -> Image.Image:
    image = _shapes(rng, size)
    return image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(2, 12))))


_GENERATORS = (_gradient, _shapes, _stripes, _noise, _blobs)


def generic_negatives(count: int = 40, seed: int = 0, size: int = GENERIC_SIZE) -> list[Image.Image]:
    """``count`` procedurally drawn RGB images, identical for the same ``seed``."""
    rng = np.random.default_rng(seed)
    images = [_GENERATORS[i % len(_GENERATORS)](rng, size).convert("RGB") for i in range(count)]
    for image in images:
        image.info[GENERIC_TAG] = True  # lets a head tell drawn negatives from real photos
    return images


def count_real(images: Sequence[Image.Image]) -> int:
    """How many of ``images`` are not from the generic drawn set."""
    return sum(not image.info.get(GENERIC_TAG) for image in images)


def load_negative_folder(folder: Union[str, Path]) -> list[Image.Image]:
    """Every image in ``folder`` (recursively); an error naming the folder when it has none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"negatives folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ImageError(
            f"the negatives folder {folder} has no images (looked for {', '.join(IMAGE_SUFFIXES)}); "
            "add photos of other things (same class as the concept is best) or omit it to use the defaults"
        )
    return [load_image(path) for path in paths]


def collect_negatives(
    folder: Union[str, Path, None] = None,
    library_concepts: Optional[Mapping[str, Sequence[Image.Image]]] = None,
    exclude: Sequence[str] = (),
    generic: int = 40,
    seed: int = 0,
) -> list[Image.Image]:
    """The negatives a head trains on.

    With ``folder``: its images (plus ``generic`` drawn images). Without: the positives of the
    library's other concepts (``library_concepts`` minus ``exclude``) plus the generic set.
    ``generic=0`` turns the drawn images off.
    """
    negatives: list[Image.Image] = []
    if folder is not None:
        negatives.extend(load_negative_folder(folder))
    else:
        for name, images in sorted((library_concepts or {}).items()):
            if name not in exclude:
                negatives.extend(images)
    negatives.extend(generic_negatives(generic, seed=seed))
    if not negatives:
        raise ValueError(
            "no negatives: pass a folder of negative photos, keep other concepts in the library, or set generic > 0"
        )
    logger.info("collected %d negatives (%d generic)", len(negatives), generic)
    return negatives
