"""Personalized VQA training data: template questions about the concept, answered by the frozen VLM.

    pairs = generate_vqa_data(backbone, "data/my_dog", class_word="dog", identifier="sks", kind="object")
    # data/my_dog/vqa.json: {"1.jpg": [{"question": "What color is sks?", "answer": "sks is brown."}, ...]}

As in the paper, each template question is asked about the class ("What color is the dog?"), the
frozen model answers it, and the class word is then replaced by the identifier in both question
and answer. The file sits next to ``captions.json`` so it can be read and edited before training;
``personalize(..., task="vqa")`` reads it (and writes it first when it is missing) and mixes the
pairs with the captions, one task sampled per photo per step.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

from PIL import Image

from myvlm.data import TrainingExample, display_identifier, read_json_mapping
from myvlm.images import list_images, load_image

if TYPE_CHECKING:
    from myvlm.backbones.base import Backbone

logger = logging.getLogger(__name__)

VQA_FILE = "vqa.json"

# The question sets of the MyVLM paper / reference code; "{}" is the concept ("the dog" / "sks").
QUESTIONS = {
    "object": [
        "What color is {}?",
        "Where is {} in the image?",
        "Where is {} positioned in the image?",
        "Does {} appear to be the main subject of the image?",
        "What objects is {} interacting with in the image?",
        "How would you describe the texture of {} in the image?",
        "What types of materials is {} made of?",
        "Is {} large or small in the image?",
        "Is {} close to the camera or far away?",
    ],
    "person": [
        "What is {} wearing in the image?",
        "What color shirt is {} wearing?",
        "What is {} doing in the image?",
        "Where is {} in the image?",
        "Can you describe what {} is wearing?",
        "From left to right, where is {} positioned in the image?",
        "What kind of hair does {} have?",
        "What is the expression on {}'s face?",
        "Is there anything unique about {}'s appearance?",
    ],
}

QAPairs = list[tuple[str, str]]


def class_phrase(class_word: str) -> str:
    """How a question names the class: 'dog' -> 'the dog' (kept as given when it has an article)."""
    words = class_word.strip().split()
    return class_word.strip() if words and words[0].lower() in ("a", "an", "the") else f"the {class_word.strip()}"


def replace_class_word(text: str, class_word: str, identifier: str) -> str:
    """Every mention of the class ('The dog', 'a dog', 'dog') becomes the identifier."""
    bare = re.sub(r"^(?:a|an|the)\s+", "", class_word.strip(), flags=re.IGNORECASE)
    with_article = re.compile(rf"\b(?:a|an|the)\s+{re.escape(bare)}\b", re.IGNORECASE)
    text = with_article.sub(identifier, text)
    return re.sub(rf"(?<!\w){re.escape(bare)}(?!\w)", identifier, text, flags=re.IGNORECASE)


def generate_vqa_data(
    backbone: "Backbone",
    images: Union[str, Path, Sequence[Union[str, Path]]],
    class_word: str,
    identifier: str = "sks",
    kind: str = "object",
    out_path: Union[str, Path, None] = None,
    questions: Optional[Sequence[str]] = None,
    overwrite: bool = False,
    **generate_kwargs,
) -> dict[str, list[dict[str, str]]]:
    """Ask the frozen backbone every template question about each image; write and return the pairs.

    ``images``: a folder (the file goes to ``folder/vqa.json``) or image paths (give ``out_path``).
    Images already in an existing file are kept as they are (edits survive) unless ``overwrite``.
    """
    if kind not in QUESTIONS:
        raise ValueError(f"kind must be one of {sorted(QUESTIONS)}, got {kind!r}")
    paths = list_images(images) if isinstance(images, (str, Path)) and Path(images).is_dir() else [
        Path(p) for p in ([images] if isinstance(images, (str, Path)) else images)]
    if out_path is None:
        if not (isinstance(images, (str, Path)) and Path(images).is_dir()):
            raise ValueError("give out_path (e.g. data/my_dog/vqa.json) when images are not one folder")
        out_path = Path(images) / VQA_FILE
    out_path = Path(out_path)
    table = {} if overwrite or not out_path.is_file() else _read_table(out_path)
    todo = [p for p in paths if p.name not in table]
    if todo:
        answers = ask_templates(backbone, [load_image(p) for p in todo], class_word, identifier, kind,
                                questions, **generate_kwargs)
        for path, pairs in zip(todo, answers):
            table[path.name] = [{"question": q, "answer": a} for q, a in pairs]
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
        logger.info("wrote %d question-answer pairs for %d images to %s", sum(len(v) for v in table.values()),
                    len(table), out_path)
    return table


def ask_templates(
    backbone: "Backbone", images: Sequence[Image.Image], class_word: str, identifier: str, kind: str = "object",
    questions: Optional[Sequence[str]] = None, **generate_kwargs,
) -> list[QAPairs]:
    """Per image, (question, answer) pairs naming the identifier, answered by the frozen backbone."""
    templates = list(questions) if questions is not None else QUESTIONS[kind]
    shown = display_identifier(identifier, kind)
    per_image: list[QAPairs] = [[] for _ in images]
    for template in templates:
        asked = template.format(class_phrase(class_word))
        answers = backbone.generate(images, [backbone.question_prompt(asked)] * len(images), **generate_kwargs)
        for pairs, answer in zip(per_image, answers):
            pairs.append((template.format(shown), replace_class_word(answer, class_word, shown)))
    return per_image


def _read_table(path: Path) -> dict[str, list[dict[str, str]]]:
    table = read_json_mapping(path, "image file names to lists of {question, answer} (fix it, or delete it to "
                                    "generate it again)")
    for name, pairs in table.items():
        if not isinstance(pairs, list) or not all(isinstance(p, Mapping) and {"question", "answer"} <= set(p)
                                                  for p in pairs):
            raise ValueError(f"{path}: the entry of {name!r} must be a list of {{\"question\": ..., \"answer\": ...}}")
    return dict(table)


def read_vqa_file(path: Union[str, Path], names: Sequence[str]) -> list[QAPairs]:
    """The (question, answer) pairs of each image file name in ``names`` (an image without any is an error)."""
    path = Path(path)
    table = _read_table(path)
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"{path} has no questions for {missing}; add them or delete the file to regenerate it")
    return [[(p["question"], p["answer"]) for p in table[n]] for n in names]


def add_questions(
    examples: Sequence[TrainingExample], backbone: "Backbone", pairs: Sequence[QAPairs]
) -> None:
    """Give each example its question-answer pairs, with the questions put as ``backbone`` takes them."""
    if len(pairs) != len(examples):
        raise ValueError(f"got {len(pairs)} question lists for {len(examples)} images; give one list per image")
    for example, image_pairs in zip(examples, pairs):
        example.questions = [(backbone.question_prompt(q), a) for q, a in image_pairs]


def vqa_pairs_for(
    backbone: "Backbone", folder: Optional[Path], photos: Sequence[Image.Image], sources: Sequence[str],
    class_word: Optional[str], identifier: str, kind: str,
) -> list[QAPairs]:
    """The pairs for personalize(task="vqa"): ``folder/vqa.json`` when there, else generated (and saved there)."""
    names = [Path(s).name for s in sources]
    if folder is not None and (folder / VQA_FILE).is_file():
        logger.info("VQA pairs from %s", folder / VQA_FILE)
        return read_vqa_file(folder / VQA_FILE, names)
    if not class_word:
        raise ValueError("VQA training needs question-answer pairs: give questions=..., a vqa.json next to the "
                         "photos, or a class_word (e.g. 'dog') to generate them with the frozen model")
    if folder is not None:
        generate_vqa_data(backbone, folder, class_word, identifier, kind)
        return read_vqa_file(folder / VQA_FILE, names)
    logger.info("photos are not one folder: the generated VQA pairs are not saved")
    return ask_templates(backbone, photos, class_word, identifier, kind)


__all__ = ["QUESTIONS", "VQA_FILE", "add_questions", "ask_templates", "generate_vqa_data", "read_vqa_file",
           "replace_class_word", "vqa_pairs_for"]
