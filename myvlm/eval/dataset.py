"""An evaluation data folder: concepts, their class words, splits, negatives and ground truth.

    data = load_eval_data("data_root")               # data_root/<concept>/ images (+ captions.json ...)
    split = data.split("my_dog", split=0, n_train=4)  # 4 random training photos, the rest held out
    data.negatives("my_dog")                         # [(image, "negative" | "hard_negative"), ...]

Layout (every file but the images is optional, except the class words):

    data_root/classes.json            {"my_dog": "dog", "my_mug": "mug"}  (concept -> class word)
    data_root/<concept>/01.jpg ...
    data_root/<concept>/captions.json {"01.jpg": ["my_dog is lying on the beach"]}  targets for text similarity
    data_root/<concept>/mirrored_captions.json {"01.jpg": ["..."]}  targets of the photo flipped, as in training
    data_root/<concept>/context.json  {"01.jpg": ["beach", "sand"]}  ground-truth context (context accuracy)
    data_root/<concept>/questions.json {"*": [{"question": "What color is my_dog?", "answers": ["brown"]}]}

Hard negatives are the photos of other concepts with the same class word. ``questions.json`` holds
questions with short accepted answers (``"*"`` applies to every photo); the ``vqa.json`` training
pairs answered by the frozen model are not ground truth and are not read here.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from PIL import Image

from myvlm.data import MIRRORED_FILE, read_captions_json, read_json_mapping, read_mirrored_captions
from myvlm.images import IMAGE_SUFFIXES, list_images, load_image

logger = logging.getLogger(__name__)

CLASSES_FILE, CONTEXT_FILE, QUESTIONS_FILE = "classes.json", "context.json", "questions.json"
ROLES = ("positive", "negative", "hard_negative")


@dataclass(frozen=True)
class Question:
    question: str  # names the concept by its folder name or the identifier
    answers: tuple[str, ...]  # accepted short answers; one appearing in the model's answer counts as correct


@dataclass
class EvalImage:
    concept: str  # the concept folder it belongs to
    path: Path  # the image file
    captions: list[str] = field(default_factory=list)  # target captions (captions.json), naming the concept
    context: list[str] = field(default_factory=list)  # ground-truth context words (context.json)
    questions: list[Question] = field(default_factory=list)  # questions with accepted answers (questions.json)
    mirrored: list[str] = field(default_factory=list)  # captions of the image mirrored (mirrored_captions.json)

    @property
    def key(self) -> str:
        """'concept/file.jpg': the image's name in records and reports."""
        return f"{self.concept}/{self.path.name}"


@dataclass
class EvalConcept:
    name: str  # folder name
    class_word: str  # what the frozen model calls it ("dog")
    images: list[EvalImage]  # sorted by file name


@dataclass
class Split:
    train: list[EvalImage]  # the N photos a method learns from
    test: list[EvalImage]  # held-out positives


class EvalDataset:
    """The concepts of ``root`` with images loaded on demand (and kept)."""

    def __init__(self, root: Path, concepts: Mapping[str, EvalConcept]):
        self.root = root
        self.concepts = dict(concepts)
        self._images = lru_cache(maxsize=None)(lambda path: load_image(path))

    def image(self, item: EvalImage) -> Image.Image:
        return self._images(item.path)

    def images(self, items: Sequence[EvalImage]) -> list[Image.Image]:
        return [self.image(item) for item in items]

    def split(self, concept: str, split: int, n_train: int, seed: int = 0, n_holdout: Optional[int] = None) -> Split:
        """A seeded permutation of the concept's photos: the first ``n_train`` train, all from ``n_holdout`` on test.

        ``n_holdout`` (default ``n_train``) keeps the test photos identical across runs that train on fewer.
        """
        n_holdout = n_train if n_holdout is None else n_holdout
        if n_train > n_holdout:
            raise ValueError(f"n_train={n_train} is more than n_holdout={n_holdout}")
        images = self.concepts[concept].images
        if len(images) <= n_holdout:
            raise ValueError(
                f"concept {concept!r} has {len(images)} photos: too few to train on {n_holdout} and test on the rest; "
                f"lower --n-train or add photos"
            )
        order = random.Random(f"{seed}/{concept}/{split}").sample(images, len(images))
        return Split(train=order[:n_train], test=sorted(order[n_holdout:], key=lambda i: i.key))

    def negatives(
        self, concept: str, max_negatives: Optional[int] = None, seed: int = 0
    ) -> list[tuple[EvalImage, str]]:
        """Photos of every other concept, with role "hard_negative" when the class word is the same."""
        own = self.concepts[concept].class_word.lower()
        pool = [(image, "hard_negative" if other.class_word.lower() == own else "negative")
                for name, other in sorted(self.concepts.items()) if name != concept for image in other.images]
        if max_negatives is not None and len(pool) > max_negatives:
            pool = random.Random(f"{seed}/{concept}/negatives").sample(pool, max_negatives)
        return sorted(pool, key=lambda pair: pair[0].key)


def _read_mapping(path: Path) -> dict[str, Any]:
    return read_json_mapping(path, "names to values (a JSON object)")


def _words(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _questions(path: Path, file_name: str) -> list[Question]:
    table = _read_mapping(path)
    out = []
    for entry in [*table.get("*", []), *table.get(file_name, [])]:
        answers = entry.get("answers", entry.get("answer")) if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or "question" not in entry or not answers:
            raise ValueError(f"{path}: each entry must be {{\"question\": ..., \"answers\": [...]}}, got {entry!r}")
        out.append(Question(entry["question"], tuple(_words(answers))))
    return out


def load_eval_concept(folder: Path, class_word: str) -> EvalConcept:
    """One concept folder with whatever ground truth it carries."""
    if (folder / "captions.json").is_file():
        paths, captions = read_captions_json(folder)
    else:
        if (folder / MIRRORED_FILE).is_file():
            raise ValueError(f"{folder / MIRRORED_FILE} needs a captions.json beside it (the captions of the photos "
                             "themselves); add one, or remove it")
        paths = list_images(folder)
        captions = [[] for _ in paths]
    mirrored = read_mirrored_captions(folder, [p.name for p in paths]) or [[] for _ in paths]
    context = _read_mapping(folder / CONTEXT_FILE) if (folder / CONTEXT_FILE).is_file() else {}
    images = []
    for path, texts, flipped in sorted(zip(paths, captions, mirrored), key=lambda row: row[0].name):
        questions = _questions(folder / QUESTIONS_FILE, path.name) if (folder / QUESTIONS_FILE).is_file() else []
        images.append(EvalImage(folder.name, path, list(texts), _words(context.get(path.name, [])), questions,
                                mirrored=flipped))
    return EvalConcept(folder.name, class_word, images)


def load_eval_data(root: Union[str, Path], class_words: Optional[Mapping[str, str]] = None) -> EvalDataset:
    """Every concept folder of ``root``; class words from the argument or ``root/classes.json``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"evaluation data folder {root} does not exist")
    folders = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")
               and any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir())}
    if class_words is None:
        if not (root / CLASSES_FILE).is_file():
            raise FileNotFoundError(
                f"{root / CLASSES_FILE} is missing: write it, mapping each concept folder to its class word, "
                f"e.g. {json.dumps({name: 'dog' for name in list(folders)[:2]})}"
            )
        class_words = _read_mapping(root / CLASSES_FILE)
    missing = sorted(set(folders) - set(class_words))
    if missing:
        raise ValueError(f"no class word for {missing}; add them to {root / CLASSES_FILE} (concept -> class word)")
    loaded = {name: load_eval_concept(folder, class_words[name]) for name, folder in folders.items()}
    logger.info("evaluation data %s: %d concepts, %d photos", root, len(loaded),
                sum(len(c.images) for c in loaded.values()))
    return EvalDataset(root, loaded)
