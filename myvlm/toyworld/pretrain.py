"""Pretraining the toy world's tiny models on the CPU: data, the three stages, the caption metrics.

    python scripts/pretrain_toyworld.py            # writes myvlm/toyworld/checkpoints (about 25 min, 2 threads)

Stage 1 (vision): the BLIP-2 ViT learns the world with a dense objective: every patch predicts what
covers it (category, solid colour or pattern, pattern colours, name, size) and the class token the
background. Shapes need context across patches, so the tower must learn them (the prototype's
captioning-only ViT learned colours, not shapes). Stage 2 (language): the ViT is frozen, as in
BLIP-2; queries, Q-Former, projection and OPT learn to caption. Stage 3: a tiny open_clip learns
(image, full description) pairs with the CLIP loss, for the concept heads.
Every stage is seeded and runs single-process, so a rerun gives the same weights.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from myvlm.toyworld.concepts import CONCEPTS
from myvlm.toyworld.models import PixelNormaliser, clip_text_ids
from myvlm.toyworld.scenes import (
    BACKGROUNDS, CATEGORIES, COLOURS, DETAILS, NAMES, PATTERN_COLOURS, PATTERNS, RELATIONS, SIZE, SIZES, Appearance,
    Scene,
    caption, render, sample_scene,
)

logger = logging.getLogger(__name__)

LOOKS = list(COLOURS) + list(PATTERNS)  # what a caption says about an unnamed object
FIELDS = {  # dense label -> number of classes (0 = background / not applicable)
    "category": len(CATEGORIES) + 1, "look": len(LOOKS) + 1, "fill": len(PATTERN_COLOURS) + 1,
    "second": len(PATTERN_COLOURS) + 1, "name": len(NAMES) + 1, "size": len(SIZES) + 1,
    "slot": 4,  # the object's place in the caption (1st, 2nd, 3rd): layout order, needs the whole image
}
SCENE_FIELDS = {"background": len(BACKGROUNDS), "relation": 3, "count": 3}  # predicted from the class token
CONCEPT_KEYS = frozenset(c.appearance.key() for c in CONCEPTS)


@dataclass
class WorldData:
    pixels: np.ndarray  # (N, H, W, 3) uint8
    captions: list[str]  # ground-truth captions
    dense: np.ndarray  # (N, G*G, len(FIELDS)) int64 patch labels
    background: np.ndarray  # (N, 3) background, relation (0 none, 1 above, 2 left of), object count - 1
    scenes: list[Scene]


def _object_labels(obj, slot: int) -> list[int]:
    a = obj.appearance
    colours = list(PATTERN_COLOURS)
    look = LOOKS.index(a.pattern or a.fill) + 1
    return [CATEGORIES.index(a.category) + 1, look, colours.index(a.fill) + 1 if a.pattern else 0,
            colours.index(a.second) + 1 if a.pattern else 0, NAMES.index(obj.name) + 1 if obj.name else 0,
            list(SIZES).index(obj.size) + 1, slot + 1]


def _dense(masks: list[np.ndarray], scene: Scene, patch: int) -> np.ndarray:
    grid = SIZE // patch
    labels = np.zeros((grid * grid, len(FIELDS)), np.int64)
    if not masks:
        return labels
    cover = np.stack([m.reshape(grid, patch, grid, patch).mean(axis=(1, 3)).reshape(-1) for m in masks])  # (O, G*G)
    best = cover.argmax(axis=0)
    for p in np.nonzero(cover.max(axis=0) > 0.3)[0]:
        labels[p] = _object_labels(scene.objects[best[p]], int(best[p]))
    return labels


def add_details(scene: Scene, rng: np.random.Generator, p: float) -> Scene:
    """Give patterned objects a random rim / centre dot (CLIP data only), never a concept's exact look."""
    for obj in scene.objects:
        a = obj.appearance
        if a.pattern and obj.name is None and rng.random() < p:
            look = Appearance(a.category, a.fill, a.pattern, a.second, DETAILS[int(rng.integers(2))],
                              str(rng.choice(list(PATTERN_COLOURS))))
            if look.key() not in CONCEPT_KEYS:
                obj.appearance = look
    return scene


def make_data(n: int, seed: int, patch: int = 8, details: float = 0.0) -> WorldData:
    """``n`` rendered scenes with captions and dense labels (about 3 ms per scene)."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    captions, dense, backgrounds, scenes = [], [], [], []
    for i in range(n):
        scene = sample_scene(rng)
        if details:
            add_details(scene, rng, details)
        image, masks = render(scene, with_masks=True)
        pixels[i] = np.asarray(image)
        captions.append(caption(scene))
        dense.append(_dense(masks, scene, patch))
        relation = 0 if scene.relation is None else 1 + RELATIONS.index(scene.relation)
        backgrounds.append([BACKGROUNDS.index(scene.background), relation, len(scene.objects) - 1])
        scenes.append(scene)
    return WorldData(pixels, captions, np.stack(dense), np.array(backgrounds), scenes)


def cosine_lr(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@dataclass
class StageConfig:
    steps: int  # optimisation steps
    batch_size: int = 64  # images per step
    lr: float = 1e-3  # peak AdamW learning rate (warmup + cosine)
    weight_decay: float = 0.05  # AdamW weight decay
    seed: int = 0  # batch order and initialisation


def run_stage(params: list, loss_fn: Callable[[np.ndarray], torch.Tensor], n: int,
              cfg: StageConfig, name: str, log_every: int = 100) -> list[float]:
    """A generic loop: ``loss_fn(indices)`` -> scalar loss, AdamW + warmup/cosine, seeded batch order.
    ``params``: parameters, or param groups with an ``lr_scale``."""
    groups = params if params and isinstance(params[0], dict) else [{"params": list(params)}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    rng = np.random.default_rng(cfg.seed)
    order, cursor, losses, started = rng.permutation(n), 0, [], time.perf_counter()
    for step in range(cfg.steps):
        if cursor + cfg.batch_size > n:
            order, cursor = rng.permutation(n), 0
        indices = order[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.lr) * group.get("lr_scale", 1.0)
        loss = loss_fn(indices)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            logger.info("%s step %d/%d loss %.4f (%.0f s)", name, step + 1, cfg.steps,
                        float(np.mean(losses[-log_every:])), time.perf_counter() - started)
    return losses


# ---- stage 1: the vision tower ----------------------------------------------------------------


class DenseHeads(nn.Module):
    """Linear read-outs of the ViT: per patch token every FIELD, from the class token the SCENE_FIELDS."""

    def __init__(self, width: int):
        super().__init__()
        self.fields = nn.ModuleDict({k: nn.Linear(width, n) for k, n in FIELDS.items()})
        self.scene = nn.ModuleDict({k: nn.Linear(width, n) for k, n in SCENE_FIELDS.items()})

    def loss(self, tokens: torch.Tensor, dense: torch.Tensor, scene: torch.Tensor) -> torch.Tensor:
        cls, patches = tokens[:, 0], tokens[:, 1:]  # (B, D), (B, G*G, D)
        total = sum(F.cross_entropy(head(cls), scene[:, j]) for j, head in enumerate(self.scene.values()))
        for j, (key, head) in enumerate(self.fields.items()):
            total = total + F.cross_entropy(head(patches).flatten(0, 1), dense[..., j].flatten())
        return total


def train_vision(vision: nn.Module, data: WorldData, cfg: StageConfig) -> tuple[list[float], DenseHeads]:
    """Dense pretraining of a ViT (BLIP-2's ``vision_model`` or LLaVA's CLIP ``vision_tower``)."""
    torch.manual_seed(cfg.seed)
    vision.requires_grad_(True).train()
    heads = DenseHeads(vision.config.hidden_size)
    norm = PixelNormaliser()

    def loss_fn(idx: np.ndarray) -> torch.Tensor:
        tokens = vision(pixel_values=norm(data.pixels[idx])).last_hidden_state  # (B, 1+G*G, D)
        return heads.loss(tokens, torch.from_numpy(data.dense[idx]), torch.from_numpy(data.background[idx]))

    losses = run_stage(list(vision.parameters()) + list(heads.parameters()), loss_fn, len(data.captions), cfg,
                       "vision")
    vision.requires_grad_(False).eval()
    return losses, heads


# ---- stage 2: Q-Former + language model -------------------------------------------------------


def caption_batch(tokenizer, num_queries: int, image_token: int, texts: list[str]) -> dict[str, torch.Tensor]:
    """[<image> x Q] </s> caption </s>, labels on caption + EOS (what Blip2Backbone.prepare_batch builds)."""
    tokenizer.padding_side = "right"
    enc = tokenizer([t + tokenizer.eos_token for t in texts], return_tensors="pt", padding=True)
    batch = enc.input_ids.shape[0]
    images = torch.full((batch, num_queries), image_token)
    input_ids = torch.cat([images, enc.input_ids], dim=1)
    attention = torch.cat([torch.ones_like(images), enc.attention_mask], dim=1)
    labels = input_ids.clone()
    labels[:, : num_queries + 1] = -100  # image tokens and BOS
    labels[attention == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class NamingPrior(nn.Module):
    """The name prior: "an extra visual token can give an object a name".

    For a fraction of the scenes one unnamed object is renamed in the target caption by a random name
    X, and one token is appended to the ViT tokens the Q-Former reads (as MyVLM appends its concept
    token): the object's mean patch feature plus a learned vector for X, norm-matched like the concept
    token. The vectors are discarded after pretraining; what stays is a Q-Former and LM for which one
    token can name one object (real VLMs get this from scale: the prototype could not steer a tiny one).
    """

    def __init__(self, width: int, probability: float, seed: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(len(NAMES), width))  # (names, D)
        self.probability = probability  # fraction of scenes with a renamed object
        self.rng = np.random.default_rng(seed + 2)
        self.names: Optional[torch.Tensor] = None  # (B,) name index or -1, for the next forward
        self.patches: Optional[torch.Tensor] = None  # (B, G*G) patches of the renamed object

    def plan(self, scene: Scene, dense: np.ndarray) -> tuple[str, int, Optional[np.ndarray]]:
        """(target caption, name index or -1, patch mask) for one scene."""
        unnamed = [i for i, o in enumerate(scene.objects) if o.name is None]
        if not unnamed or self.rng.random() >= self.probability:
            return caption(scene), -1, None
        index = unnamed[int(self.rng.integers(len(unnamed)))]
        patches = dense[:, list(FIELDS).index("slot")] == index + 1
        if not patches.any():
            return caption(scene), -1, None
        taken = {o.name for o in scene.objects}
        name = str(self.rng.choice([n for n in NAMES if n not in taken]))
        objects = [replace(o, name=name) if i == index else o for i, o in enumerate(scene.objects)]
        return caption(replace(scene, objects=objects)), NAMES.index(name), patches

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
        states = kwargs.get("encoder_hidden_states")  # (B, 1+N, D)
        if self.names is None or states is None or not bool((self.names >= 0).any()):
            return None
        chosen = (self.names >= 0).float()  # (B,)
        weights = self.patches.float() / self.patches.float().sum(1, keepdim=True).clamp(min=1)  # (B, N)
        feature = torch.einsum("bn,bnd->bd", weights, states[:, 1:].detach())
        token = F.normalize(feature + self.table[self.names.clamp(min=0)], dim=-1)
        token = token * states.detach().norm(dim=-1).mean(dim=1, keepdim=True) * chosen[:, None]  # (B, D)
        mask = kwargs.get("encoder_attention_mask")
        mask = torch.ones(states.shape[:2], dtype=torch.long) if mask is None else mask
        kwargs["encoder_hidden_states"] = torch.cat([states, token[:, None]], dim=1)
        kwargs["encoder_attention_mask"] = torch.cat([mask, chosen[:, None].to(mask.dtype)], dim=1)
        return args, kwargs


def train_language(model, processor, data: WorldData, cfg: StageConfig, heads: Optional[DenseHeads] = None,
                   vision_lr_scale: float = 0.0, naming: float = 0.0) -> list[float]:
    """Queries, Q-Former, projection and OPT learn to caption; with ``vision_lr_scale`` > 0 the ViT is tuned
    too (at that fraction of the learning rate), its dense objective (``heads``) kept as an auxiliary loss;
    ``naming`` > 0 adds the NamingPrior to that fraction of the scenes."""
    trainable = [model.query_tokens, *model.qformer.parameters(), *model.language_projection.parameters(),
                 *model.language_model.parameters()]
    prior = NamingPrior(model.config.vision_config.hidden_size, naming, cfg.seed) if naming > 0 else None
    groups = [{"params": trainable + (list(prior.parameters()) if prior else [])}]
    handle = model.qformer.register_forward_pre_hook(prior.hook, with_kwargs=True) if prior else None
    tune_vision = vision_lr_scale > 0 and heads is not None
    if tune_vision:
        groups.append({"params": [*model.vision_model.parameters(), *heads.parameters()], "lr_scale": vision_lr_scale})
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(True)
    model.vision_model.train(tune_vision)
    model.qformer.train()
    model.language_model.train()
    norm = PixelNormaliser()
    image_token = model.config.image_token_index

    def loss_fn(idx: np.ndarray) -> torch.Tensor:
        texts = [data.captions[i] for i in idx]
        if prior is not None:
            plans = [prior.plan(data.scenes[i], data.dense[i]) for i in idx]
            texts = [text for text, _, _ in plans]
            prior.names = torch.tensor([name for _, name, _ in plans])
            empty = np.zeros(data.dense.shape[1], bool)
            prior.patches = torch.from_numpy(np.stack([p if p is not None else empty for _, _, p in plans]))
        batch = caption_batch(processor.tokenizer, model.config.num_query_tokens, image_token, texts)
        pixels = norm(data.pixels[idx])
        out = model(pixel_values=pixels, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
        if tune_vision:
            tokens = out.vision_outputs.last_hidden_state  # (B, 1+G*G, D), the tokens the Q-Former read
            loss = loss + 0.5 * heads.loss(tokens, torch.from_numpy(data.dense[idx]),
                                           torch.from_numpy(data.background[idx]))
        return loss

    try:
        losses = run_stage(groups, loss_fn, len(data.captions), cfg, "language")
    finally:
        if handle is not None:
            handle.remove()
    model.requires_grad_(False).eval()
    return losses


# ---- stage 3: the tiny open_clip ---------------------------------------------------------------


def alt_text(scene: Scene) -> str:
    """A full description (both pattern colours, details, names) for the CLIP text tower."""
    words = []
    for obj in scene.objects:
        a = obj.appearance
        words += [obj.name] if obj.name else []
        words += [obj.size, a.fill] + ([a.second, a.pattern] if a.pattern else []) + [a.category]
        words += [a.detail_colour, a.detail] if a.detail else []
    return " ".join(words + [scene.background])


def object_pairs(n: int, seed: int) -> tuple[WorldData, WorldData]:
    """``n`` pairs of photos sharing one object (any look, details included, never a personal concept's),
    with different pose, scale, lighting, background and other objects: what "the same object" means."""
    from myvlm.toyworld.scenes import random_appearance

    rng = np.random.default_rng(seed)
    views: list[list[Scene]] = [[], []]
    for _ in range(n):
        kind = str(rng.choice(["solid", "patterned", "named"], p=[0.3, 0.5, 0.2]))
        look, name = random_appearance(rng, kind=kind)
        if kind == "patterned" and rng.random() < 0.6:
            detailed = Appearance(look.category, look.fill, look.pattern, look.second, DETAILS[int(rng.integers(2))],
                                  str(rng.choice(list(PATTERN_COLOURS))))
            look = detailed if detailed.key() not in CONCEPT_KEYS else look
        for view in views:
            view.append(sample_scene(rng, n_objects=int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2])),
                                     kinds=["solid", "patterned", "named"], fixed=[(look, name, None)], pose=35.0,
                                     scale_jitter=0.15, lighting=(0.75, 1.25), fixed_sizes=("medium", "large")))
    out = []
    for scenes in views:
        pixels = np.stack([np.asarray(render(s)) for s in scenes])
        out.append(WorldData(pixels, [caption(s) for s in scenes], np.zeros((n, 1, 1), np.int64),
                             np.zeros((n, 3), np.int64), scenes))
    return out[0], out[1]


def train_clip(data: WorldData, cfg: StageConfig, pairs: Optional[tuple[WorldData, WorldData]] = None):
    """CLIP loss on (image, full description); with ``pairs`` also an InfoNCE loss between two photos of
    the same object (instance discrimination: the invariance a personalization head needs)."""
    import open_clip
    from myvlm.toyworld.models import CLIP_CONFIG

    torch.manual_seed(cfg.seed)
    clip = open_clip.CLIP(**CLIP_CONFIG).train()
    texts = clip_text_ids([alt_text(s) for s in data.scenes])  # (N, L)
    norm = PixelNormaliser()
    loss = open_clip.ClipLoss()
    n = len(data.captions) if pairs is None else min(len(data.captions), len(pairs[0].captions))

    def loss_fn(idx: np.ndarray) -> torch.Tensor:
        image = F.normalize(clip.encode_image(norm(data.pixels[idx])), dim=-1)
        text = F.normalize(clip.encode_text(texts[idx]), dim=-1)
        total = loss(image, text, clip.logit_scale.exp())
        if pairs is not None:
            a = F.normalize(clip.encode_image(norm(pairs[0].pixels[idx])), dim=-1)  # (B, E)
            b = F.normalize(clip.encode_image(norm(pairs[1].pixels[idx])), dim=-1)
            total = total + loss(a, b, clip.logit_scale.exp())
        return total

    losses = run_stage(list(clip.parameters()), loss_fn, n, cfg, "clip")
    return clip.eval().requires_grad_(False), losses


# ---- caption metrics ----------------------------------------------------------------------------


def parse_phrase(text: str) -> dict:
    """'a small red circle' -> {size, look, category}; a bare word -> {name}."""
    words = text.split()
    if len(words) == 1:
        return {"name": words[0]}
    words = words[1:] if words[0] == "a" else words
    size = words[0] if words and words[0] in SIZES else "medium"
    rest = words[1:] if words and words[0] in SIZES else words
    return {"size": size, "look": rest[0] if rest else None, "category": rest[-1] if len(rest) > 1 else None}


def caption_scores(predicted: str, truth: str) -> dict[str, list[bool]]:
    """Per-attribute correctness of ``predicted`` against ``truth``: one bool per object for object
    attributes (``name`` for named objects, the others for described ones), one per caption otherwise."""
    from myvlm.toyworld.scenes import parse_caption

    gt, pr = parse_caption(truth), parse_caption(predicted) or {"objects": [], "relation": None, "background": None}
    out: dict[str, list[bool]] = {k: [] for k in ("category", "look", "size", "name")}
    for i, phrase in enumerate(gt["objects"]):
        want = parse_phrase(phrase)
        got = parse_phrase(pr["objects"][i]) if i < len(pr["objects"]) else {}
        for key, value in want.items():
            out[key].append(got.get(key) == value)
    out["count"] = [len(pr["objects"]) == len(gt["objects"])]
    out["relation"] = [pr["relation"] == gt["relation"]] if gt["relation"] else []
    out["background"] = [pr["background"] == gt["background"]]
    out["exact"] = [" ".join(predicted.split()) == truth]
    return out


def summarise(rows: list[dict[str, list[bool]]]) -> dict[str, float]:
    """Mean of every attribute over all rows (NaN where no row has it)."""
    keys = rows[0].keys() if rows else []
    out = {}
    for key in keys:
        values = [v for r in rows for v in r[key]]
        out[key] = round(float(np.mean(values)), 4) if values else float("nan")
    return out


# ---- the tiny LLaVA's language stage --------------------------------------------------------------


def llava_tasks(scene: Scene, rng: np.random.Generator, backbone) -> tuple[Optional[str], str]:
    """(prompt, target) for one LLaVA pretraining sample: a caption (60%; half of those with a named object
    use the reference code's "Please caption this image of <name>." prompt) or one scene question."""
    from myvlm.toyworld.questions import scene_questions

    if rng.random() < 0.6:
        named = [o.name for o in scene.objects if o.name]
        prompt = backbone.caption_prompt([named[int(rng.integers(len(named)))]]) if named and rng.random() < 0.5 else None
        return prompt, caption(scene)
    pairs = scene_questions(scene, rng)
    return pairs[int(rng.integers(len(pairs)))]


def train_llava_language(model, processor, data: WorldData, cfg: StageConfig) -> list[float]:
    """Projector + Llama learn captions and answers through the backbone's own batch builder."""
    from PIL import Image

    from myvlm.backbones.llava import LlavaBackbone
    from myvlm.config import BackboneConfig

    backbone = LlavaBackbone(model, processor, BackboneConfig("toyworld-llava", device="cpu", dtype="float32"))
    trainable = [*model.model.multi_modal_projector.parameters(), *model.model.language_model.parameters(),
                 *model.lm_head.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    rng = np.random.default_rng(cfg.seed + 1)

    def loss_fn(idx: np.ndarray) -> torch.Tensor:
        tasks = [llava_tasks(data.scenes[i], rng, backbone) for i in idx]
        images = [Image.fromarray(data.pixels[i]) for i in idx]
        batch = backbone.prepare_batch(images, [t for _, t in tasks], [p for p, _ in tasks])
        return backbone.sequence_loss(batch).mean()

    losses = run_stage(trainable, loss_fn, len(data.captions), cfg, "llava-language")
    model.requires_grad_(False).eval()
    return losses
