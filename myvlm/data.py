"""Training data for one concept: photos, target captions that name the concept, augmentation.

    examples = make_examples(images, captions, name="my_dog", identifier="sks")
    augment = Augmenter(AugmentConfig())
    view = augment(examples[0].image)

Captions may name the concept by its ``name`` (replaced by the identifier; title-cased
for people, as the reference implementation does) or by the identifier itself. An image
none of whose captions names the concept is an error that names the file.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from PIL import Image
from torchvision.transforms import v2

from myvlm.config import AugmentConfig
from myvlm.images import ImageError, list_images, load_image

logger = logging.getLogger(__name__)

MAX_IDENTIFIER_TOKENS = 3  # identifiers longer than this are hard for one vector to teach


@dataclass
class TrainingExample:
    image: Image.Image  # upright RGB photo of the concept
    captions: list[str]  # target captions; each one names the identifier
    source: str  # where the photo came from (file name), for messages
    concepts: list[str] = field(default_factory=list)  # concepts active on this photo (their bank names)
    prompt: Optional[str] = None  # prompt the captions answer (None = the backbone's plain captioning)
    questions: list[tuple[str, str]] = field(default_factory=list)  # (prompt, answer) pairs mixed with captions
    # captions of the photo mirrored left-right, for captions that say "left of" (empty: ``captions`` hold for both);
    # a flip in the augmentation then trains on these instead, so that it does not teach the wrong side
    mirrored_captions: list[str] = field(default_factory=list)


def identifier_pattern(identifier: str) -> re.Pattern[str]:
    return re.compile(rf"(?<!\w){re.escape(identifier)}(?!\w)", re.IGNORECASE)


def contains_identifier(text: str, identifier: str) -> bool:
    return identifier_pattern(identifier).search(text) is not None


def display_identifier(identifier: str, kind: str) -> str:
    """People are named like names ("Sks"), objects stay lower-case, as in the reference code."""
    return identifier.title() if kind == "person" else identifier


def name_to_identifier(caption: str, name: str, identifier: str, kind: str = "object") -> str:
    """Replace the concept's ``name`` (any case, whole words, '_' read as ' ') by the identifier."""
    shown = display_identifier(identifier, kind)
    for spelling in {name, name.replace("_", " ")}:
        caption = identifier_pattern(spelling).sub(shown, caption)
    return identifier_pattern(identifier).sub(shown, caption)


def class_word_to_identifier(caption: str, class_word: str, identifier: str) -> Optional[str]:
    """'a dog lying on the beach' -> 'sks lying on the beach'; None when the class word is absent."""
    with_article = re.compile(rf"\b(?:a|an|the)\s+{re.escape(class_word)}\b", re.IGNORECASE)
    if with_article.search(caption):
        return with_article.sub(identifier, caption, count=1)
    bare = identifier_pattern(class_word)
    if bare.search(caption):
        return bare.sub(identifier, caption, count=1)
    return None


def make_examples(
    images: Sequence[Image.Image],
    captions: Sequence[Sequence[str]],
    name: str,
    identifier: str,
    kind: str = "object",
    sources: Optional[Sequence[str]] = None,
    mirrored: Optional[Sequence[Sequence[str]]] = None,
) -> list[TrainingExample]:
    """Pair photos with identifier-bearing targets; raise naming the photo if none names the concept.
    ``mirrored``: per photo, the captions of its left-right mirror image (empty lists where they are the same)."""
    sources = list(sources) if sources is not None else [f"image #{i}" for i in range(len(images))]
    if len(captions) != len(images):
        raise ValueError(f"got {len(images)} images but {len(captions)} caption lists; give one list per image")
    if mirrored is not None and len(mirrored) != len(images):
        raise ValueError(f"got {len(images)} images but {len(mirrored)} mirrored caption lists; give one per image")
    examples = []
    for k, (image, texts, source) in enumerate(zip(images, captions, sources)):
        kept = _targets(texts, name, identifier, kind, source)
        flipped = (_targets(mirrored[k], name, identifier, kind, f"{source} (mirrored)") if mirrored and mirrored[k]
                   else [])
        examples.append(TrainingExample(image=image, captions=kept, source=source, concepts=[name],
                                        mirrored_captions=flipped))
    return examples


def _targets(texts: Union[str, Sequence[str]], name: str, identifier: str, kind: str, source: str) -> list[str]:
    """``texts`` with the concept's name replaced by the identifier; those that do not name it are dropped."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    targets = [name_to_identifier(t, name, identifier, kind) for t in texts]
    kept = [t for t in targets if contains_identifier(t, identifier)]
    if not kept:
        raise ValueError(
            f"no caption of {source} names the concept ({texts!r}); write {name!r} or {identifier!r} where the "
            f"concept appears, e.g. '{display_identifier(identifier, kind)} is lying on the beach'"
        )
    if len(kept) < len(targets):
        logger.warning("%s: %d of %d captions do not name %r and are skipped", source, len(targets) - len(kept),
                       len(targets), name)
    return kept


def check_identifier(tokenizer: Any, identifier: str) -> list[int]:
    """The identifier's token ids in context; errors on unknown tokens, warns on odd splits."""
    if not identifier or not re.fullmatch(r"[\w-]+", identifier):
        raise ValueError(f"identifier {identifier!r} must be one word of letters/digits (e.g. 'sks')")
    alone = tokenizer(f" {identifier}", add_special_tokens=False).input_ids
    in_context = tokenizer(f"a photo of {identifier} on the table", add_special_tokens=False).input_ids
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in alone:
        raise ValueError(
            f"the tokenizer does not know identifier {identifier!r} (it maps to the unknown token); "
            "pick another rare word the tokenizer can spell, e.g. 'sks'"
        )
    if len(alone) > MAX_IDENTIFIER_TOKENS:
        logger.warning(
            "identifier %r splits into %d tokens %s; a short rare word of 1-2 tokens (e.g. 'sks') is learned faster",
            identifier, len(alone), tokenizer.convert_ids_to_tokens(alone),
        )
    if not _is_subsequence(alone, in_context):
        logger.warning(
            "identifier %r is tokenized differently inside a sentence (%s vs %s alone); the model may not produce "
            "it verbatim, pick a word that is split the same way",
            identifier, tokenizer.convert_ids_to_tokens(in_context), tokenizer.convert_ids_to_tokens(alone),
        )
    return alone


def _is_subsequence(needle: list[int], haystack: list[int]) -> bool:
    return any(haystack[i : i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


class Augmenter:
    """Per-step photo augmentation: horizontal flip, brightness jitter, rotation (paper defaults)."""

    def __init__(self, config: AugmentConfig):
        self.config = config
        self.transform = v2.Compose([
            v2.ColorJitter(brightness=config.brightness),
            v2.RandomRotation(degrees=config.rotation_degrees),
        ])

    def __call__(self, image: Image.Image) -> Image.Image:
        return self.apply(image)[0]

    def apply(self, image: Image.Image) -> tuple[Image.Image, bool]:
        """(augmented photo, whether it was mirrored). Draws what ``v2.RandomHorizontalFlip`` draws, in order."""
        if not self.config.enabled:
            return image, False
        flipped = bool(torch.rand(1) < self.config.hflip_p)
        return self.transform(v2.functional.horizontal_flip(image) if flipped else image), flipped


def read_json_mapping(path: Union[str, Path], expected: str) -> dict[str, Any]:
    """A JSON object from ``path``; ``expected`` says what it should map (for the error messages)."""
    path = Path(path)
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); it must map {expected}") from error
    if not isinstance(table, Mapping):
        raise ValueError(f"{path} must map {expected}, got a {type(table).__name__}")
    return dict(table)


def read_captions_json(folder: Union[str, Path]) -> tuple[list[Path], list[list[str]]]:
    """Reference-code layout: ``folder/captions.json`` maps image file -> caption(s)."""
    folder = Path(folder)
    path = folder / "captions.json"
    table = read_json_mapping(path, "image file names to caption lists")
    paths, captions = [], []
    for file_name, texts in table.items():
        image_path = folder / file_name
        if not image_path.is_file():
            raise ImageError(f"{path} names {file_name!r}, which is not in {folder}; fix the name or remove the entry")
        paths.append(image_path)
        captions.append([texts] if isinstance(texts, str) else list(texts))
    return paths, captions


MIRRORED_FILE = "mirrored_captions.json"


def read_mirrored_captions(folder: Union[str, Path], names: Sequence[str]) -> Optional[list[list[str]]]:
    """``folder/mirrored_captions.json`` (image file -> caption(s) of the photo mirrored left-right), in the
    order of the photos ``names``; None without the file. A photo it leaves out trains on its own captions
    when flipped (right for captions that say neither left nor right)."""
    path = Path(folder) / MIRRORED_FILE
    if not path.is_file():
        return None
    table = read_json_mapping(path, "image file names to the captions of their mirror images")
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise ValueError(f"{path} names {unknown}, which are not among the training photos {list(names)}; "
                         "fix the names or remove the entries")
    out = []
    for name in names:
        texts = table.get(name, [])
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{path}: the entry for {name!r} must be a caption or a list of captions")
        out.append(list(texts))
    return out


def load_concept_folder(folder: Union[str, Path]) -> tuple[list[Image.Image], Optional[list[list[str]]], list[str]]:
    """Photos of a concept folder, with its captions.json when there is one (else captions are None)."""
    folder = Path(folder)
    if (folder / "captions.json").is_file():
        paths, captions = read_captions_json(folder)
    else:
        paths, captions = list_images(folder), None
    return [load_image(p) for p in paths], captions, [p.name for p in paths]


def sample_tasks(
    examples: Sequence[TrainingExample], indices: Sequence[int], rng: random.Random,
    mirrored: Optional[Sequence[bool]] = None,
) -> tuple[Optional[list[str]], list[str]]:
    """One (prompt, target) per chosen image: its captioning task or one of its question-answer pairs,
    uniformly (the reference code's VQA mixing); a caption is sampled from the example's list (caption
    augmentation), from its ``mirrored_captions`` where ``mirrored[k]`` says its photo was flipped and it has some.
    Prompts are None when no chosen image has any (plain captioning, e.g. BLIP-2)."""
    prompts, targets = [], []
    for k, i in enumerate(indices):
        example = examples[i]
        pick = rng.randrange(len(example.questions) + 1) if example.questions else len(example.questions)
        if pick < len(example.questions):
            prompt, target = example.questions[pick]
        else:
            flipped = mirrored is not None and mirrored[k] and example.mirrored_captions
            prompt, target = example.prompt, rng.choice(example.mirrored_captions if flipped else example.captions)
        prompts.append(prompt)
        targets.append(target)
    if all(p is None for p in prompts):
        return None, targets
    return [p or "" for p in prompts], targets
