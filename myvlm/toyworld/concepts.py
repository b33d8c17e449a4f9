"""Personal concepts of the toy world: unique objects the base vocabulary does not name.

    from myvlm.toyworld.concepts import CONCEPTS, concept_photos, hard_negative_photos
    concept = CONCEPTS[0]          # e.g. a checkered circle with a black rim, identifier "tev"
    photos = concept_photos(concept, "train", 4)   # [(PIL image, Scene), ...]

Each concept is one (category, pattern, two colours, detail) combination that no named object
and no pretraining scene has (pretraining objects never carry a detail). Its photos vary pose,
scale, lighting, background and the other objects, as photos of one object would. Its
identifier is a name the language model learned in pretraining for *another* object of the same
category (a name prior grounded in what is seen; ``NamingPrior`` also gave every name to other
objects through an extra token); scenes with that other object are kept out of every split. Hard
negatives share the category and differ in pattern or colours (or detail).
Every image is a pure function of (concept, split, index).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

from myvlm.toyworld.scenes import (
    CATEGORIES,
    DETAILS,
    NAME_OF,
    NAMED,
    PATTERN_COLOURS,
    PATTERNS,
    PHOTO_VARIATION,
    Appearance,
    Scene,
    caption,
    mirrored_caption,
    render,
    sample_scene,
)

SPLITS = ("train", "val", "head_negatives", "test")  # photo pools: personalization, choosing settings, head fitting,
# evaluation; disjoint, each a pure function of its name
N_CONCEPTS = 12  # 3 per category


@dataclass(frozen=True)
class PersonalConcept:
    name: str  # the concept's name in myvlm ("toy_00")
    appearance: Appearance  # what makes it unique
    identifier: str  # the word captions use for it (a pretraining name, see module docstring)

    @property
    def class_word(self) -> str:
        return self.appearance.category

    def describe(self) -> str:
        a = self.appearance
        return f"{a.fill}/{a.second} {a.pattern} {a.category} with a {a.detail_colour} {a.detail}"


def _concepts(seed: int = 0) -> tuple[PersonalConcept, ...]:
    rng = np.random.default_rng(seed + 11)
    colours = list(PATTERN_COLOURS)
    out: list[PersonalConcept] = []
    per = N_CONCEPTS // len(CATEGORIES)
    for category in CATEGORIES:
        names = [n for n, a in NAMED.items() if a.category == category]
        for k in range(per):
            while True:
                a, b, c = (str(x) for x in rng.choice(colours, size=3, replace=False))
                look = Appearance(category, a, PATTERNS[int(rng.integers(len(PATTERNS)))], b,
                                  DETAILS[len(out) % len(DETAILS)], c)
                plain = Appearance(category, a, look.pattern, b)
                if plain.key() not in NAME_OF and all(look.key() != o.appearance.key() for o in out):
                    break
            out.append(PersonalConcept(f"toy_{len(out):02d}", look, names[k]))
    return tuple(out)


CONCEPTS = _concepts()
BY_NAME = {c.name: c for c in CONCEPTS}


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _avoid(concept: PersonalConcept) -> frozenset:
    return frozenset({concept.identifier, concept.appearance.key()})


def _photo(rng: np.random.Generator, concept: PersonalConcept, look: Appearance, role: str,
           name: Optional[str]) -> tuple[Image.Image, Scene]:
    scene = sample_scene(rng, n_objects=int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2])), kinds=["solid", "patterned"],
                         fixed=[(look, name, concept.name if role == "positive" else None)],
                         avoid_names=_avoid(concept), **PHOTO_VARIATION,
                         fixed_sizes=("medium", "large"))
    scene.extra.update(role=role, concept=concept.name)
    return render(scene), scene


def _check_split(split: str) -> None:
    if split not in SPLITS:  # any other name would silently give photos no number was measured on
        raise ValueError(f"unknown photo pool {split!r}; the pools are {list(SPLITS)}")


def concept_photos(concept: PersonalConcept, split: str, n: int, start: int = 0) -> list[tuple[Image.Image, Scene]]:
    """Photos of the concept: (image, scene); the scene names the concept by its identifier."""
    _check_split(split)
    return [_photo(_rng("positive", concept.name, split, i), concept, concept.appearance, "positive",
                   concept.identifier) for i in range(start, start + n)]


def hard_negative_look(concept: PersonalConcept, rng: np.random.Generator) -> Appearance:
    """Same category; same pattern + other colours, same colours + other pattern, or anything else."""
    a = concept.appearance
    colours = list(PATTERN_COLOURS)
    while True:
        mode = int(rng.integers(3))
        fill, second = (str(x) for x in rng.choice(colours, size=2, replace=False))
        pattern = a.pattern if mode == 0 else PATTERNS[int(rng.integers(len(PATTERNS)))]
        if mode == 1:
            fill, second = a.fill, a.second
        detail = DETAILS[int(rng.integers(len(DETAILS)))] if rng.random() < 0.5 else None
        colour = str(rng.choice(colours)) if detail else None
        look = Appearance(a.category, fill, pattern, second, detail, colour)
        plain = Appearance(a.category, fill, pattern, second)
        if look.key() != a.key() and plain.key() not in NAME_OF and (fill, second, pattern) != (a.fill, a.second, a.pattern):
            return look


def hard_negative_photos(concept: PersonalConcept, split: str, n: int) -> list[tuple[Image.Image, Scene]]:
    """Photos of other objects of the concept's class (described, never named)."""
    _check_split(split)
    out = []
    for i in range(n):
        rng = _rng("hard", concept.name, split, i)
        out.append(_photo(rng, concept, hard_negative_look(concept, rng), "hard_negative", None))
    return out


def unrelated_photos(concept: PersonalConcept, split: str, n: int) -> list[tuple[Image.Image, Scene]]:
    """Ordinary scenes (named objects included, except the one whose name is the identifier)."""
    _check_split(split)
    out = []
    for i in range(n):
        scene = sample_scene(_rng("unrelated", concept.name, split, i), avoid_names=_avoid(concept))
        scene.extra.update(role="unrelated", concept=concept.name)
        out.append((render(scene), scene))
    return out


def target_caption(scene: Scene) -> str:
    """The personalization target: the ground-truth caption naming the concept by its identifier."""
    return caption(scene)


def mirrored_targets(photos: list[tuple[Image.Image, Scene]]) -> list[list[str]]:
    """``personalize``'s ``mirrored_captions`` for toy-world photos: the target of each photo mirrored (a
    flip in the augmentation would otherwise teach "zib left of a star" on a photo of a star left of zib)."""
    return [[mirrored_caption(scene)] for _, scene in photos]
