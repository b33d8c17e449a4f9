"""The notebook entry point: ``personalize`` a frozen VLM from a few photos.

    import myvlm
    concept = myvlm.personalize("photos/my_dog", name="my_dog", class_word="dog",
                                backbone="Salesforce/blip2-opt-2.7b", negatives="photos/not_my_dog")
    concept.save("concepts/my_dog")
    vlm = myvlm.MyVLM(concept_backbone, [concept]); vlm.caption(["beach.jpg"])

It fits the concept head (when to inject) and then trains the concept embedding (what to
inject). Without captions, the frozen VLM's own caption of each photo, with the class word
replaced by the identifier, becomes the target.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from PIL import Image

from myvlm.backbones import Backbone, load_backbone
from myvlm.concept import KINDS, Concept, ConceptError, check_name
from myvlm.config import BackboneConfig, TrainConfig
from myvlm.data import TrainingExample, check_identifier, class_word_to_identifier, display_identifier, make_examples
from myvlm.heads import ConceptHead, build_head
from myvlm.images import ImageError, ImageLike, list_images, load_image
from myvlm.injection import ConceptBank, Route
from myvlm.training import TrainResult, train_concepts
from myvlm.vqa import add_questions, vqa_pairs_for

logger = logging.getLogger(__name__)

DEFAULT_HEADS = {"object": "clip_probe", "person": "face"}
TASKS = ("caption", "vqa")


def _load_sources(images: Union[ImageLike, Sequence[ImageLike]], what: str) -> tuple[list[Image.Image], list[str]]:
    if isinstance(images, (str, Path)):
        path = Path(images)
        if not path.exists():
            raise ImageError(f"{what} folder {path} does not exist")
        images = list_images(path) if path.is_dir() else [path]
    images = list(images)
    if not images:
        raise ImageError(f"no {what} were given")
    label = what.rstrip("s")
    sources = [str(s) if not isinstance(s, Image.Image) else f"{label} #{i}" for i, s in enumerate(images)]
    return [load_image(s) for s in images], sources


def _common_folder(images: Any, sources: Sequence[str]) -> Optional[Path]:
    """The folder the photos came from (where vqa.json lives), or None for in-memory or scattered photos."""
    if isinstance(images, (str, Path)) and Path(images).is_dir():
        return Path(images)
    parents = {Path(s).parent for s in sources if Path(s).is_file()}
    return parents.pop() if len(parents) == 1 and all(Path(s).is_file() for s in sources) else None


def vlm_targets(
    backbone: Backbone, images: Sequence[Image.Image], sources: Sequence[str], class_word: str, identifier: str
) -> list[list[str]]:
    """The frozen VLM's captions with the class word replaced by the identifier (the paper's fallback)."""
    logger.info("no captions given: the targets are the frozen VLM's own captions with %r -> %r",
                class_word, identifier)
    targets = []
    for caption, source in zip(backbone.generate(images), sources):
        target = class_word_to_identifier(caption, class_word, identifier)
        if target is None:
            target = f"{identifier}, {caption}" if caption else identifier
            logger.warning("%s: the VLM's caption %r does not say %r; using %r as the target",
                           source, caption, class_word, target)
        logger.info("%s: target %r", source, target)
        targets.append([target])
    return targets


def fit_head(
    head: Union[ConceptHead, str, None], kind: str, positives: Sequence[Image.Image],
    negatives: Union[ImageLike, Sequence[ImageLike], None], head_kwargs: Optional[dict[str, Any]] = None,
    refit: bool = True,
) -> ConceptHead:
    """Build (by registry name) and fit the head that decides when the concept is active."""
    if head is None or isinstance(head, str):
        head = build_head(head or DEFAULT_HEADS[kind], **(head_kwargs or {}))
    if not refit:
        return head
    negative_images = _load_sources(negatives, "negatives")[0] if negatives is not None else []
    if not negative_images and getattr(head, "needs_negatives", False):
        from myvlm.heads import default_negatives

        negative_images = default_negatives()
        logger.info("no negatives given: using %d generic negative images", len(negative_images))
    head.fit(positives, negative_images)
    return head


def personalize(
    images: Union[ImageLike, Sequence[ImageLike]],
    name: str,
    identifier: str = "sks",
    captions: Optional[Sequence[Sequence[str]]] = None,
    class_word: Optional[str] = None,
    kind: str = "object",
    backbone: Union[Backbone, BackboneConfig, str] = "Salesforce/blip2-opt-2.7b",
    negatives: Union[ImageLike, Sequence[ImageLike], None] = None,
    head: Union[ConceptHead, str, None] = None,
    head_kwargs: Optional[dict[str, Any]] = None,
    fit_head_on_images: bool = True,
    train: Union[TrainConfig, dict[str, Any], None] = None,
    output_dir: Union[str, Path, None] = None,
    overwrite: bool = False,
    progress: bool = True,
    task: str = "caption",
    questions: Optional[Sequence[Sequence[tuple[str, str]]]] = None,
    mirrored_captions: Optional[Sequence[Sequence[str]]] = None,
) -> Concept:
    """Personalize ``backbone`` to a concept from a few photos; returns the trained Concept.

    ``captions``: one list of target captions per photo, naming the concept by ``name`` or
    ``identifier``; without them ``class_word`` is required. ``head``: a fitted/unfitted head, a
    registry name, or None for the default of ``kind`` (pass ``fit_head_on_images=False`` to reuse a
    fitted head as it is). ``output_dir``: the concept folder is written there (atomically) and the
    training checkpoints next to it. ``task="vqa"`` mixes question-answer pairs into training: ``questions``
    (one list of (question, answer) per photo), else the folder's ``vqa.json``, else pairs generated by
    the frozen model from ``class_word`` (``myvlm.vqa``, saved as the folder's ``vqa.json``). A ``train``
    dict (or None) starts from the backbone's defaults for the task (LLaVA: its regularizer weight).
    ``mirrored_captions``: per photo, captions of its mirror image, for captions that say left or right (a flip
    in the augmentation trains on them instead; empty lists where the captions hold either way).
    """
    check_name(name)
    if kind not in KINDS:
        raise ConceptError(f"kind must be one of {KINDS}, got {kind!r}")
    if captions is None and not class_word:
        raise ValueError("give captions (one list per photo) or a class_word (e.g. 'dog') to caption the photos with")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if output_dir is not None and Path(output_dir).exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; pass overwrite=True to replace it")
    config = train if isinstance(train, TrainConfig) else TrainConfig.from_dict(train or {})  # fail early
    photos, sources = _load_sources(images, "images")
    if not isinstance(backbone, Backbone):
        backbone = load_backbone(backbone)
    if not isinstance(train, TrainConfig):
        config = TrainConfig.from_dict({**backbone.training_defaults(task), **(train or {})})
    check_identifier(backbone.tokenizer, identifier)
    if captions is None:
        captions = vlm_targets(backbone, photos, sources, class_word, identifier)
    examples = make_examples(photos, captions, name, identifier, kind, sources, mirrored=mirrored_captions)
    prompt = backbone.caption_prompt([display_identifier(identifier, kind)])
    for example in examples:
        example.prompt = prompt
    if task == "vqa":
        folder = _common_folder(images, sources)
        pairs = questions if questions is not None else vqa_pairs_for(
            backbone, folder, photos, sources, class_word, identifier, kind)
        add_questions(examples, backbone, pairs)
    fitted = fit_head(head, kind, photos, negatives, head_kwargs, refit=fit_head_on_images)

    look = route = None
    if config.init in ("look", "anchor") or config.route > 0:
        from myvlm.look import head_boxes, look_vector

        look = look_vector(backbone, photos, head_boxes(fitted, photos))[None]  # (1, D)
    if config.route > 0:
        route = Route(look[0], config.route, config.route_temperature)
    bank = ConceptBank([name], backbone.concept_dim, values=look if config.init == "look" else None,
                       init_std=config.init_std, seed=config.seed, anchors=look if config.init == "anchor" else None,
                       routes=[route] if route is not None else None)
    run_dir = Path(output_dir).with_name(f".{Path(output_dir).name}.run") if output_dir else None
    result = train_concepts(backbone, bank, examples, config, output_dir=run_dir, progress=progress)
    concept = Concept(
        name=name, identifier=identifier, kind=kind, embedding=bank.token_values().detach()[0].cpu(),
        backbone=backbone.describe(), head=fitted, class_word=class_word, route=route,
        training={"config": asdict(config), "task": task, **result.summary(), "images": sources},
    )
    if output_dir is not None:
        concept.save(output_dir, overwrite=overwrite)
    return concept


__all__ = ["personalize", "fit_head", "vlm_targets", "TrainResult", "TrainingExample"]
