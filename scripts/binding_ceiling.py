"""Where can one concept token put the identifier? The toy world's binding ceiling, measured.

    python scripts/binding_ceiling.py --backbone myvlm/toyworld/checkpoints/blip2
    python scripts/binding_ceiling.py --backbone myvlm/toyworld/checkpoints/llava --task vqa --pool test

Personalization can only be as good as the best token the frozen backbone knows how to read. The toy
backbones were pretrained with such tokens (``NamingPrior``: a name vector plus the look of the object it
names), and their learned name vectors are kept beside the checkpoint (``name_vectors.safetensors``). For
each concept, on its unseen photos with the concept token forced on, this measures how often the caption of a
photo with several objects names the concept in its own place ("place"), the context accuracy (everything
but the concept, as ``bench_toyworld.py`` scores it) and how often the identifier is said, for the tokens:

- ``here+name``: the identifier's name vector + the concept's look in *this* photo (mean token at the
  injection point over the concept's ground-truth box): the prior's own token, what the backbone binds best;
- ``here``: that look alone (the LLaVA is told the identifier by its prompt; the BLIP-2 only by the token);
- ``train+name``: the name vector + the mean look over the 4 training photos (what a token learned from
  them could carry);
- ``look``: the look ``init="look"`` starts from (the mean token over the crops the head learned from the 4
  training photos), alone;
- ``name``: the name vector alone;
- ``trained``: the vector ``personalize`` learns (the toy-world settings, ``TOY_TRAIN``, with the head; ``--task
  vqa`` trains it on questions too, as the LLaVA benchmark does), used with its query routing where it has one
  (the other tokens are not routed).

Each token is the sum of the normalised parts, normalised and scaled like any concept token. The base row
is the frozen model's context accuracy without a token.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from myvlm import BackboneConfig, load_backbone
from myvlm.data import contains_identifier
from myvlm.injection import ConceptBank, ConceptInjector, Route
from myvlm.look import Box, head_boxes, look_vector, look_vectors
from myvlm.toyworld.bench import TRAIN_PHOTOS, BenchConfig, concept_slot, context_facts, personalize_concept
from myvlm.toyworld.concepts import BY_NAME, CONCEPTS, concept_photos
from myvlm.toyworld.models import load_name_vectors
from myvlm.toyworld.scenes import mask_box, render

TOKENS = ("here+name", "here", "train+name", "look", "name", "trained")


def concept_box(scene) -> Box:
    """The concept's ground-truth box in a rendered scene, as fractions of the image."""
    _, masks = render(scene, with_masks=True)
    return mask_box(masks[next(k for k, obj in enumerate(scene.objects) if obj.concept is not None)])


def captions(backbone, values: Optional[torch.Tensor], images: list, identifier: str,
             route: Optional[Route] = None) -> list[str]:
    """Captions with ``values[i]`` as image i's concept token (None: the frozen model), routed by ``route``."""
    prompts = [backbone.caption_prompt([identifier] if values is not None else [])] * len(images)
    prompts = None if prompts[0] is None else prompts
    if values is None:
        return backbone.generate(images, prompts) if prompts else backbone.generate(images)
    bank = ConceptBank([f"photo{i}" for i in range(len(images))], values.shape[1], values=values,
                       routes=[route] * len(images) if route is not None else None)
    with ConceptInjector(backbone, bank) as injector, injector.activate([[i] for i in range(len(images))]):
        return backbone.generate(images, prompts) if prompts else backbone.generate(images)


def score(texts: list[str], photos: list, identifier: str, named: bool = True) -> tuple[float, float, float]:
    """(place, context, said) of ``texts`` on ``photos`` [(image, scene)], scored as ``bench.measure`` scores
    them; ``named=False`` for the frozen model's captions (the concept described, not named)."""
    slots = [concept_slot(t, scene, identifier) for t, (_, scene) in zip(texts, photos)]
    slots = [s for s in slots if s is not None]
    facts = [f for t, (_, scene) in zip(texts, photos) for f in context_facts(t, scene, named)]
    said = [contains_identifier(t, identifier) for t in texts]
    return (float(np.mean(slots)) if slots else float("nan")), float(np.mean(facts)), float(np.mean(said))


def tokens_for(backbone, concept, names: dict[str, torch.Tensor], photos: list, pool: str,
               task: str = "caption") -> tuple[dict[str, torch.Tensor], Optional[Route]]:
    """Each kind of token, (n, D) for the n ``photos``, and the trained token's route."""
    n = len(photos)
    name = F.normalize(names[concept.identifier].float(), dim=0)
    here = F.normalize(look_vectors(backbone, [im for im, _ in photos], [concept_box(s) for _, s in photos]), dim=1)
    photos_train = concept_photos(concept, "train", TRAIN_PHOTOS)
    train, train_boxes = [im for im, _ in photos_train], [concept_box(s) for _, s in photos_train]
    trained_look = F.normalize(look_vector(backbone, train, train_boxes), dim=0)
    personalized = personalize_concept(backbone, concept, 0, BenchConfig(eval_pool=pool, task=task))
    start = F.normalize(look_vector(backbone, train, head_boxes(personalized.head, train)), dim=0)
    trained = personalized.embedding.float()
    return {"here+name": here + name, "here": here, "train+name": (trained_look + name).expand(n, -1),
            "look": start.expand(n, -1), "name": name.expand(n, -1),
            "trained": F.normalize(trained, dim=0).expand(n, -1)}, personalized.route


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", required=True, help="a toy-world BLIP-2 or LLaVA checkpoint folder")
    parser.add_argument("--pool", default="val", choices=["val", "test"])
    parser.add_argument("--concepts", nargs="*", help="concept names (default: all)")
    parser.add_argument("--positives", type=int, default=20, help="unseen photos of each concept")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--task", default="caption", choices=["caption", "vqa"],
                        help="what the trained token learns from (vqa: captions and questions, as the LLaVA benchmark)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    names = load_name_vectors(args.backbone)
    backbone = load_backbone(BackboneConfig(args.backbone, device="cpu", dtype="float32"))
    concepts = [BY_NAME[n] for n in args.concepts] if args.concepts else list(CONCEPTS)
    rows: dict[str, list[tuple[float, float, float]]] = {}
    started = time.perf_counter()
    print(f"{'concept':<8} " + " ".join(f"{k:>22}" for k in ("base", *TOKENS)) + "   (place / context / said)")
    for concept in concepts:
        photos = concept_photos(concept, args.pool, args.positives)
        images = [im for im, _ in photos]
        results = {"base": score(captions(backbone, None, images, concept.identifier), photos, concept.identifier,
                                 named=False)}
        tokens, route = tokens_for(backbone, concept, names, photos, args.pool, args.task)
        for kind, values in tokens.items():
            results[kind] = score(captions(backbone, values.contiguous(), images, concept.identifier,
                                           route if kind == "trained" else None), photos, concept.identifier)
        for kind, result in results.items():
            rows.setdefault(kind, []).append(result)
        print(f"{concept.name:<8} " + " ".join(f"{r[0]:>6.2f} /{r[1]:>5.2f} /{r[2]:>5.2f}" for r in results.values()),
              flush=True)
    means = {kind: np.nanmean(np.array(r), axis=0) for kind, r in rows.items()}
    print(f"{'mean':<8} " + " ".join(f"{m[0]:>6.3f} /{m[1]:>5.3f} /{m[2]:>5.3f}" for m in means.values()))
    print(f"{len(concepts)} concepts in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
