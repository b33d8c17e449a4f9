"""Run every concept head on every image: several concepts can fire in one image.

    from myvlm.heads.detect import detect_concepts, explain
    results = detect_concepts(images, {"anna": anna_head, "ben": ben_head, "rex": rex_probe})
    results[0]            # {"anna": Detection(score=0.41, threshold=0.6, fired=True), "rex": ...}
    active = [name for name, d in results[0].items() if d.fired]
    print(explain(results, names=["beach.jpg"]))   # the CLI's --explain table

Face heads that share a backend are matched jointly, image by image: each detected face goes to
at most one person (the closest under that person's threshold, compared as distance/threshold)
and each person takes at most one face. Two people in one photo are both found; one face never
fires two people. Other heads decide independently.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from PIL import Image

from myvlm.heads.base import ConceptHead, Detection
from myvlm.heads.face import FaceHead
from myvlm.heads.features import ensure_rgb, fraction_box

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaceMatch:
    """The face assigned to a person in one image (or the closest free face when none was)."""

    distance: float  # distance of that face to the person's references; inf when no free face
    threshold: float  # the person's threshold
    face_index: Optional[int]  # index into the image's detected faces; None when there is none
    box: Optional[tuple[float, float, float, float]]  # (left, top, right, bottom) of that face

    @property
    def fired(self) -> bool:
        return self.face_index is not None and self.distance <= self.threshold


def match_faces(image: Image.Image, heads: Mapping[str, FaceHead]) -> dict[str, FaceMatch]:
    """Assign the faces of ``image`` to people; all ``heads`` must share one backend."""
    backends = {id(head.backend) for head in heads.values()}
    if len(backends) > 1:
        raise ValueError("match_faces needs face heads that share one backend; group them by head.backend first")
    if not heads:
        return {}
    names = list(heads)
    per_person = [heads[name].face_distances(image) for name in names]
    faces = per_person[0][0]
    if not faces:
        return {name: FaceMatch(math.inf, heads[name].threshold, None, None) for name in names}
    distances = torch.stack([d for _, d in per_person])  # (P, F)
    thresholds = torch.tensor([heads[name].threshold for name in names]).unsqueeze(1)  # (P, 1)
    assigned: dict[int, int] = {}  # person -> face
    taken: set[int] = set()
    for flat in torch.argsort((distances / thresholds).flatten()).tolist():
        person, face = divmod(flat, len(faces))
        if person in assigned or face in taken or distances[person, face] > thresholds[person, 0]:
            continue
        assigned[person] = face
        taken.add(face)
    matches = {}
    for person, name in enumerate(names):
        face = assigned.get(person)
        if face is None:  # report the closest face no one else took, so score and decision agree
            free = [f for f in range(len(faces)) if f not in taken]
            face = min(free, key=lambda f: float(distances[person, f])) if free else None
        distance = float(distances[person, face]) if face is not None else math.inf
        box = faces[face].box if face is not None else None
        matches[name] = FaceMatch(distance, heads[name].threshold, face, box)
    return matches


def detect_concepts(images: Sequence[Image.Image], heads: Mapping[str, ConceptHead]) -> list[dict[str, Detection]]:
    """Every head's ``Detection`` on every image, by concept name, in the order of ``heads``."""
    images = ensure_rgb(images)
    results: list[dict[str, Detection]] = [{} for _ in images]
    face_groups: dict[int, dict[str, FaceHead]] = {}
    for name, head in heads.items():
        if isinstance(head, FaceHead):
            face_groups.setdefault(id(head.backend), {})[name] = head
        else:
            for row, detection in zip(results, head.detect(images)):
                row[name] = detection
    for group in face_groups.values():
        for row, image in zip(results, images):
            for name, match in match_faces(image, group).items():
                box = fraction_box(match.box, image.size) if match.box is not None else None
                row[name] = Detection(match.distance, match.threshold, match.fired, box)
    ordered = [{name: row[name] for name in heads} for row in results]
    for index, row in enumerate(ordered):
        logger.debug("image %d: %s", index, {n: (round(d.score, 4), d.threshold, d.fired) for n, d in row.items()})
    return ordered


def active_concepts(results: Sequence[Mapping[str, Detection]]) -> list[list[str]]:
    """The names that fired, per image."""
    return [[name for name, detection in row.items() if detection.fired] for row in results]


def explain(
    results: Sequence[Mapping[str, Detection]],
    names: Optional[Sequence[str]] = None,
    heads: Optional[Mapping[str, ConceptHead]] = None,
) -> str:
    """A plain-text table of every concept's score and threshold per image (for ``--explain``)."""
    lines = []
    for index, row in enumerate(results):
        lines.append(names[index] if names is not None else f"image {index}")
        for concept, detection in row.items():
            head = heads.get(concept) if heads is not None else None
            relation = "vs" if head is None else (">=" if head.higher_is_present else "<=")
            verdict = "FIRED" if detection.fired else "-"
            score, threshold = detection.score, detection.threshold
            lines.append(f"  {concept:<24} score {score:8.4f} {relation} {threshold:<8.4g} {verdict}")
    return "\n".join(lines)
