"""Questions about toy-world scenes with ground-truth answers (LLaVA pretraining and the VQA benchmark).

    from myvlm.toyworld.questions import scene_questions, concept_questions
    scene_questions(scene, rng)            # [("What is the background?", "striped"), ...]
    concept_questions(scene, "tev")        # questions about the personal concept, by its identifier

Named objects (and a personal concept, by its identifier) are asked about by name, as real users
ask about "sks": its shape and whether it is in the picture; the scene by its background and count.
"""

from __future__ import annotations

import numpy as np

from myvlm.toyworld.scenes import NAMES, Scene

COUNTS = ("zero", "one", "two", "three")


def shape_question(name: str) -> str:
    return f"What shape is {name}?"


def presence_question(name: str) -> str:
    return f"Is {name} in the picture?"


def scene_questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """All pretraining questions of a scene: background, count, and per named object shape and presence
    (plus one absent name, answered "no")."""
    pairs = [("What is the background?", scene.background), ("How many objects are there?", COUNTS[len(scene.objects)])]
    present = [o for o in scene.objects if o.name]
    for obj in present:
        pairs += [(shape_question(obj.name), obj.appearance.category), (presence_question(obj.name), "yes")]
    absent = [n for n in NAMES if n not in {o.name for o in present}]
    pairs.append((presence_question(absent[int(rng.integers(len(absent)))]), "no"))
    return pairs


def concept_questions(scene: Scene, identifier: str) -> list[tuple[str, str]]:
    """Questions about the personal concept in ``scene`` (its object carries ``identifier`` as name)."""
    obj = next(o for o in scene.objects if o.name == identifier)
    return [(shape_question(identifier), obj.appearance.category), (presence_question(identifier), "yes")]
