"""Pretraining the toy world's tiny models on the CPU: data, the stages, the caption metrics.

    python scripts/pretrain_toyworld.py --llava    # writes myvlm/toyworld/checkpoints (one thread per model)

Stage 1 (vision): the ViT (16-px patches) learns objects: the mean of an object's patch tokens
predicts its category, look, size and name (``ObjectHeads``). Stage 2 (language): queries, Q-Former,
projection and OPT learn to caption, with the ``NamingPrior`` on part of the scenes and the query slots
(the first queries each name one of the caption's objects: ``slot_labels``); the ViT is tuned too, with its
object objective kept (frozen, the captions lost background and relation: 82% / 67%). The tiny LLaVA gets
its own vision stage and a language stage of captions and questions with the same prior, its ViT tuned there
too (the script's default; frozen, its captions were 83% / 82% right on category / look, tuned 89.5% / 85%). Last, a tiny
open_clip learns (image, full description) pairs, an inventory of the objects and instance pairs, for the
concept heads.
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

from myvlm.injection import ConceptBank, ConceptInjector, box_mask
from myvlm.toyworld.concepts import CONCEPTS
from myvlm.toyworld.models import PixelNormaliser, clip_text_ids
from myvlm.toyworld.scenes import (
    CATEGORIES, COLOURS, DETAILS, NAMES, PATTERN_COLOURS, PATTERNS, PHOTO_VARIATION, SIZE, SIZES, Appearance,
    Scene,
    NAME_OF, caption, mask_box, random_appearance, render, sample_scene,
)

logger = logging.getLogger(__name__)

LOOKS = list(COLOURS) + list(PATTERNS)  # what a caption says about an object
# Per-object labels -> number of classes. Measured (1000 steps, 12k scenes): adding a pattern's two colours
# or scene labels (background, relation, count from the class token) did not speed up shapes (43-44% vs
# 43%), and random flips slowed them (40.5%); the captions teach the scene labels anyway.
OBJECT_FIELDS = {"category": len(CATEGORIES), "look": len(LOOKS), "size": len(SIZES), "name": len(NAMES) + 1}
NAME_FIELD = list(OBJECT_FIELDS).index("name")  # 0: not a named object, else NAMES index + 1
MAX_OBJECTS = 3
VISION_AUX_WEIGHT = 0.5  # the ViT's object objective beside the captions, when a language stage tunes it
CONCEPT_KEYS = frozenset(c.appearance.key() for c in CONCEPTS)


@dataclass
class WorldData:
    """Rendered scenes with everything the stages need. ``cover[i, k, p]``: how much of patch ``p`` object
    ``k`` covers. ``other_*``: for scenes with ``other_object[i] >= 0``, a second photo of that object (another
    scene, pose, scale and lighting) and its cover there: what the naming prior shows the Q-Former."""

    pixels: np.ndarray  # (N, H, W, 3) uint8
    captions: list[str]  # ground-truth captions
    cover: np.ndarray  # (N, MAX_OBJECTS, G*G) float32
    objects: np.ndarray  # (N, MAX_OBJECTS, len(OBJECT_FIELDS)) int64, -1 where absent / not applicable
    scenes: list[Scene]
    other_pixels: Optional[np.ndarray] = None  # (N, H, W, 3) uint8
    other_cover: Optional[np.ndarray] = None  # (N, G*G) float32
    other_object: Optional[np.ndarray] = None  # (N,) int64, index into scenes[i].objects, or -1
    boxes: Optional[np.ndarray] = None  # (N, MAX_OBJECTS, 4) float32: each object's box (left, top, right, bottom)
    other_box: Optional[np.ndarray] = None  # (N, 4) float32: the object's box in its second photo


def _object_labels(obj) -> list[int]:
    a = obj.appearance
    name = NAMES.index(obj.name) + 1 if obj.name else 0  # 0: not a named object
    return [CATEGORIES.index(a.category), LOOKS.index(a.pattern or a.fill), list(SIZES).index(obj.size), name]


def patch_cover(mask: np.ndarray, patch: int) -> np.ndarray:
    """(SIZE, SIZE) soft mask -> (G*G,) fraction of each patch it covers (row-major, as the ViT's tokens)."""
    grid = SIZE // patch
    return mask.reshape(grid, patch, grid, patch).mean(axis=(1, 3)).reshape(-1)


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


def another_photo(obj, rng: np.random.Generator) -> tuple[Scene, int]:
    """A new scene holding ``obj``'s appearance (new pose, scale, place, lighting, company); (scene, its index)."""
    scene = sample_scene(rng, n_objects=int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2])),
                         fixed=[(obj.appearance, None, "other")], pose=30.0, scale_jitter=0.15,
                         lighting=(0.75, 1.25))
    return scene, next(k for k, o in enumerate(scene.objects) if o.concept == "other")


def look_alike_scene(rng: np.random.Generator) -> Scene:
    """A scene of 2-3 objects, one of them patterned (concept ``"look-alike"``) beside another of its category
    and pattern or colours: the caption words them alike ("a striped circle"), only the colours or the
    pattern tell them apart -- the confusion a personal concept's token must resolve among its look-alikes.
    Not ``look_alike``: that one may also change the detail (details stay out of these scenes) and avoids only
    the concepts' looks, where these scenes, as ``random_appearance``, must never show a named look unnamed."""
    look, _ = random_appearance(rng, kind="patterned")
    while True:
        if rng.random() < 0.5:
            fill, second = (str(x) for x in rng.choice(list(PATTERN_COLOURS), size=2, replace=False))
            other = replace(look, fill=fill, second=second)
        else:
            other = replace(look, pattern=PATTERNS[int(rng.integers(len(PATTERNS)))])
        if other.key() != look.key() and other.key() not in NAME_OF:
            break
    return sample_scene(rng, n_objects=int(rng.choice([2, 3], p=[0.6, 0.4])),
                        fixed=[(look, None, "look-alike"), (other, None, None)])


def make_data(n: int, seed: int, patch: int = 16, details: float = 0.0, others: float = 0.0,
              variation: float = 0.0, look_alikes: float = 0.0) -> WorldData:
    """``n`` rendered scenes with captions and labels (about 3 ms per scene, 6 with a second photo);
    a fraction ``others`` of them gets a second photo of one of its objects (the naming prior's), a fraction
    ``variation`` is drawn with the pose, scale and lighting ranges of photos (``PHOTO_VARIATION``), a fraction
    ``look_alikes`` is a ``look_alike_scene`` whose second photo (if any) is of the patterned object."""
    rng = np.random.default_rng(seed)
    cells = (SIZE // patch) ** 2
    pixels = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    cover = np.zeros((n, MAX_OBJECTS, cells), np.float32)
    objects = np.full((n, MAX_OBJECTS, len(OBJECT_FIELDS)), -1, np.int64)
    other_pixels = np.zeros((n, SIZE, SIZE, 3), np.uint8) if others else None
    other_cover = np.zeros((n, cells), np.float32) if others else None
    other_object = np.full(n, -1, np.int64)
    boxes = np.zeros((n, MAX_OBJECTS, 4), np.float32)
    other_box = np.zeros((n, 4), np.float32) if others else None
    captions, scenes = [], []
    for i in range(n):
        photo = variation > 0 and rng.random() < variation  # no draw at 0: the default data stay as they were
        alike = look_alikes > 0 and rng.random() < look_alikes
        scene = look_alike_scene(rng) if alike else sample_scene(rng, **(PHOTO_VARIATION if photo else {}))
        if details:
            add_details(scene, rng, details)
        image, masks = render(scene, with_masks=True)
        pixels[i] = np.asarray(image)
        for k, (obj, mask) in enumerate(zip(scene.objects, masks)):
            cover[i, k] = patch_cover(mask, patch)
            boxes[i, k] = mask_box(mask)
            objects[i, k] = _object_labels(obj)
        if others and rng.random() < others:
            tags = [o.concept for o in scene.objects]
            k = tags.index("look-alike") if alike else int(rng.integers(len(scene.objects)))
            other, index = another_photo(scene.objects[k], rng)
            image, masks = render(other, with_masks=True)
            other_pixels[i], other_cover[i], other_object[i] = np.asarray(image), patch_cover(masks[index], patch), k
            other_box[i] = mask_box(masks[index])
        captions.append(caption(scene))
        scenes.append(scene)
    return WorldData(pixels, captions, cover, objects, scenes, other_pixels, other_cover, other_object, boxes, other_box)


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
              cfg: StageConfig, name: str, log_every: int = 100,
              evaluate: Optional[Callable[[], str]] = None, finish: Optional[Callable[[], str]] = None) -> list[float]:
    """A generic loop: ``loss_fn(indices)`` -> scalar loss, AdamW + warmup/cosine, seeded batch order.
    ``params``: parameters, or param groups with an ``lr_scale``. ``evaluate()`` is logged every 5 logs;
    ``finish()`` once after the last step (a measurement of the trained stage)."""
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
            extra = evaluate() if evaluate and ((step + 1) % (5 * log_every) == 0 or step + 1 == cfg.steps) else ""
            logger.info("%s step %d/%d loss %.4f (%.0f s) %s", name, step + 1, cfg.steps,
                        float(np.mean(losses[-log_every:])), time.perf_counter() - started, extra)
    if finish is not None:
        logger.info("%s at the end:%s", name, finish())
    return losses


# ---- stage 1: the vision tower ----------------------------------------------------------------


def pool(patches: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
    """Cover-weighted mean of patch tokens: (B, N, D), (B, K, N) -> (B, K, D); zero rows for empty covers."""
    weights = cover / cover.sum(-1, keepdim=True).clamp(min=1e-6)
    return torch.einsum("bkn,bnd->bkd", weights, patches)


class ObjectHeads(nn.Module):
    """Linear read-outs of the ViT: every field (default OBJECT_FIELDS) from the mean of the object's patch tokens.

    Object-level, measured against the alternatives: with a patch-level objective (every patch names what
    covers it) shapes stayed at chance (35%) after 750 steps, as most patches see an edge or plain fill;
    pooled over the object, 16-px patches reach 72% after 1000 of 2000 steps, 8-px ones 51% at 3x the cost.
    """

    def __init__(self, width: int, fields: Optional[dict[str, int]] = None):
        super().__init__()
        fields = OBJECT_FIELDS if fields is None else fields  # label name -> number of classes
        self.objects = nn.ModuleDict({k: nn.Linear(width, n) for k, n in fields.items()})

    def logits(self, patches: torch.Tensor, cover: torch.Tensor) -> dict[str, torch.Tensor]:
        """``patches``: (B, N, D) patch tokens (no class token); ``cover``: (B, K, N)."""
        return self.read(pool(patches, cover))

    def read(self, states: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every field's logits from one state per object: (B, K, D) -> {field: (B, K, classes)}."""
        return {k: head(states) for k, head in self.objects.items()}

    def loss(self, patches: torch.Tensor, cover: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
        """``objects``: (B, K, fields) labels, -1 where absent / not applicable."""
        return self.read_loss(pool(patches, cover), objects)

    def read_loss(self, states: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
        """``loss`` from one state per object (B, K, D), e.g. already pooled."""
        total = states.new_zeros(())
        for j, logits in enumerate(self.read(states).values()):
            labels = objects[..., j]
            if bool((labels >= 0).any()):
                total = total + F.cross_entropy(logits[labels >= 0], labels[labels >= 0])
        return total

    @torch.no_grad()
    def accuracy(self, patches: torch.Tensor, cover: torch.Tensor, objects: torch.Tensor) -> dict[str, float]:
        out = {}
        for j, (k, logits) in enumerate(self.logits(patches, cover).items()):
            labels = objects[..., j]
            out[k] = round((logits.argmax(-1)[labels >= 0] == labels[labels >= 0]).float().mean().item(), 3)
        return out


def _tensors(data: WorldData, idx) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(data.cover[idx]), torch.from_numpy(data.objects[idx])


def vision_encoder(vision: nn.Module) -> nn.Module:
    """The transformer encoder of a BLIP-2 ``vision_model`` or a LLaVA ``vision_tower`` (CLIPVisionModel)."""
    return vision.encoder if hasattr(vision, "encoder") else vision.vision_model.encoder


def object_tokens(vision: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 1+G*G, D): the encoder's output, which the object heads read -- before the tower's final LayerNorm.
    The BLIP-2's ``post_layernorm`` normalises every token of its ``last_hidden_state``, and heads reading through
    it learn objects far slower (1000 vision steps on 20000 scenes, 400 held-out ones: category / look / size 68 /
    88 / 70% through it, 86 / 91 / 88% before it, as the LLaVA's CLIP tower, which has no final norm on its
    tokens, reaches: 86 / 91 / 87%). The Q-Former still reads the normalised tokens."""
    return vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]


def train_vision(vision: nn.Module, data: WorldData, cfg: StageConfig,
                 held_out: Optional[WorldData] = None) -> tuple[list[float], ObjectHeads]:
    """Object-level pretraining of a ViT (BLIP-2's ``vision_model`` or LLaVA's ``vision_tower``); ``held_out``
    is scored during training (logged)."""
    torch.manual_seed(cfg.seed)
    vision.requires_grad_(True).train()
    heads = ObjectHeads(vision.config.hidden_size)
    norm = PixelNormaliser()

    def loss_fn(idx: np.ndarray) -> torch.Tensor:
        tokens = object_tokens(vision, norm(data.pixels[idx]))  # (B, 1+G*G, D)
        return heads.loss(tokens[:, 1:], *_tensors(data, idx))

    def evaluate() -> str:
        if held_out is None:
            return ""
        return str(vision_accuracy(vision, heads, held_out))

    losses = run_stage(list(vision.parameters()) + list(heads.parameters()), loss_fn, len(data.captions), cfg,
                       "vision", evaluate=evaluate)
    vision.requires_grad_(False).eval()
    return losses, heads


@torch.no_grad()
def vision_accuracy(vision: nn.Module, heads: ObjectHeads, data: WorldData) -> dict[str, float]:
    was_training = vision.training
    vision.eval()
    tokens = object_tokens(vision, PixelNormaliser()(data.pixels))
    vision.train(was_training)
    return heads.accuracy(tokens[:, 1:], *_tensors(data, slice(None)))


# ---- stage 2: Q-Former + language model -------------------------------------------------------


class TunedVision:
    """A vision tower tuned in a language stage: its parameters (and the object heads') form an optimizer
    group at ``lr_scale`` times the stage's learning rate, and its object objective stays on as an auxiliary
    loss, read from the tokens of the stage's own forward (a forward hook: the last call before ``loss``).
    ``remove()`` takes the hook off."""

    def __init__(self, vision: nn.Module, heads: ObjectHeads, lr_scale: float):
        self.vision, self.heads, self.lr_scale = vision, heads, lr_scale
        self.tokens: Optional[torch.Tensor] = None
        vision.requires_grad_(True).train()
        heads.requires_grad_(True)
        self.handle = vision_encoder(vision).register_forward_hook(self._record)

    def _record(self, module: nn.Module, args: tuple, output) -> None:
        self.tokens = output.last_hidden_state  # (B, 1+G*G, D), class token first, as object_tokens reads them

    def group(self) -> dict:
        return {"params": [*self.vision.parameters(), *self.heads.parameters()], "lr_scale": self.lr_scale}

    def loss(self, data: WorldData, idx: np.ndarray) -> torch.Tensor:
        """The weighted object objective on the last forward's patch tokens."""
        if self.tokens is None:
            raise RuntimeError("the vision tower has not run since the last loss")
        tokens, self.tokens = self.tokens, None
        return VISION_AUX_WEIGHT * self.heads.loss(tokens[:, 1:], *_tensors(data, idx))

    def remove(self) -> None:
        self.handle.remove()


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
    """The name prior: "something I was shown elsewhere, with its name, names that thing here".

    For a fraction of the scenes one unnamed object is called by a random name X in the target caption,
    and one token is appended to the ViT tokens the Q-Former reads (where MyVLM appends its concept
    token): the object's mean patch feature plus a learned vector for X, norm-matched like the concept
    token. Half of the time the feature comes from *another photo of it* (other scene, pose, scale,
    lighting; ``WorldData.other_*``): it carries no position, so the Q-Former must bind the token to the
    object by appearance, which is what a concept token learned from several photos can do. The name
    vectors are discarded after pretraining; what stays is a Q-Former and LM for which one token can
    name one object (the real models' scale gives them this; the prototype's tiny one could not be
    steered). Measured: without named objects in the scenes and with the other photo only, X was never
    learned (captions naming an object stayed log(24) nats worse than the others for 2500 steps); with
    the scenes' named objects and half of the looks from the photo itself, the gap closed (0.05 nats).
    """

    def __init__(self, width: int, probability: float, seed: int, same_photo: float = 0.5,
                 name_noise: float = 0.0, look_pool: str = "cover", box_margin: float = 0.0):
        super().__init__()
        if look_pool not in ("cover", "box"):
            raise ValueError(f"look_pool must be 'cover' or 'box', not {look_pool!r}")
        self.table = nn.Parameter(torch.randn(len(NAMES), width))  # (names, D)
        self.probability = probability  # fraction of the scenes with a second photo that get a name
        self.same_photo = same_photo  # fraction of those whose look comes from the scene itself (easier to bind)
        self.rng = np.random.default_rng(seed + 2)
        self.names: Optional[torch.Tensor] = None  # (B,) name index or -1, for the next forward
        self.features: Optional[torch.Tensor] = None  # (B, D) the renamed object's look (this or another photo)
        self.from_other: Optional[torch.Tensor] = None  # (B,) bool: that look comes from another photo
        # in training, each token's name vector gets a fresh random direction of this norm (relative to the
        # unit name vector): the name must be read from the name part, and nothing else in it may steer where
        self.name_noise = name_noise
        self.noise = torch.Generator().manual_seed(seed + 3)
        # how the look is pooled: "cover", the patches weighted by how much of each the object covers; "box", the
        # plain mean over the patches whose centres lie in the object's box, as myvlm.look pools a concept's look
        # at personalization (from a head's crop or a face box), each side of the box moved out by a random
        # fraction of the image up to ``box_margin`` (a head's crop is coarser than the object)
        self.look_pool = look_pool
        self.box_margin = box_margin

    def plan(self, data: WorldData, i: int) -> tuple[Scene, int]:
        """(scene ``i`` as the targets describe it, name index or -1): with a name, one object carries it."""
        scene, index = data.scenes[i], int(data.other_object[i]) if data.other_object is not None else -1
        if index < 0 or scene.objects[index].name or self.rng.random() >= self.probability:
            return scene, -1
        taken = {o.name for o in scene.objects}
        name = str(self.rng.choice([n for n in NAMES if n not in taken]))
        objects = [replace(o, name=name) if k == index else o for k, o in enumerate(scene.objects)]
        return replace(scene, objects=objects), NAMES.index(name)

    @torch.no_grad()
    def prepare(self, patch_features: Callable[[torch.Tensor], torch.Tensor], data: WorldData, idx: np.ndarray,
                names: list[int]) -> None:
        """Look up the second photos of this batch's renamed objects; ``patch_features(pixels)`` -> (B, N, D)
        are the patch tokens at the injection point (BLIP-2: the ViT output; LLaVA: the projector input)."""
        self.names = torch.tensor(names)
        chosen = [int(i) for i, n in zip(idx, names) if n >= 0]
        self.features = None
        self.from_other = torch.zeros(len(idx), dtype=torch.bool)
        if chosen:
            same = self.rng.random(len(chosen)) < self.same_photo
            pixels = np.where(same[:, None, None, None], data.pixels[chosen], data.other_pixels[chosen])
            if self.look_pool == "box":
                own = data.boxes[chosen, data.other_object[chosen]]  # (n, 4) the object's box in the scene itself
                cover = self._box_weights(np.where(same[:, None], own, data.other_box[chosen]), data.cover.shape[-1])
            else:
                own = data.cover[chosen, data.other_object[chosen]]  # (n, G*G) its cover in the scene itself
                cover = np.where(same[:, None], own, data.other_cover[chosen])
            tokens = patch_features(PixelNormaliser()(pixels))
            pooled = pool(tokens, torch.from_numpy(cover)[:, None])[:, 0]
            self.features = torch.zeros(len(idx), tokens.shape[-1])
            self.features[torch.tensor([n >= 0 for n in names])] = pooled
            self.from_other[torch.tensor([n >= 0 for n in names])] = torch.from_numpy(~same)

    def _box_weights(self, boxes: np.ndarray, patches: int) -> np.ndarray:
        """(n, G*G) float32: 1 on the patches ``myvlm.look`` would pool for each box (n, 4), after the margins."""
        if self.box_margin > 0:
            grow = self.rng.uniform(0, self.box_margin, size=boxes.shape) * np.array([-1, -1, 1, 1])
            boxes = np.clip(boxes + grow, 0.0, 1.0)
        return np.stack([box_mask(patches, tuple(map(float, box))).numpy() for box in boxes]).astype(np.float32)

    def vectors(self) -> dict[str, torch.Tensor]:
        """{name: its learned vector (D,)}, a copy."""
        return {name: row.detach().clone() for name, row in zip(NAMES, self.table)}

    def tokens(self, image_tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """(B, D): each renamed sample's token, norm-matched to its image tokens (B, N, D); zeros elsewhere."""
        if self.names is None or self.features is None:
            return None
        chosen = (self.names >= 0).float()[:, None]  # (B, 1)
        look = F.normalize(self.features, dim=-1)
        name = F.normalize(self.table[self.names.clamp(min=0)], dim=-1)
        if self.name_noise > 0 and self.training:
            fresh = torch.randn(name.shape, generator=self.noise)
            name = F.normalize(name + self.name_noise * F.normalize(fresh, dim=-1), dim=-1)
        token = F.normalize(look + name, dim=-1) * image_tokens.detach().norm(dim=-1).mean(dim=1, keepdim=True)
        return (token * chosen).to(image_tokens.dtype)

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
        """BLIP-2: a Q-Former pre-hook appending the token to the ViT tokens (masked where no name is given)."""
        states = kwargs.get("encoder_hidden_states")  # (B, 1+N, D)
        token = self.tokens(states) if states is not None else None
        if token is None:
            return None
        mask = kwargs.get("encoder_attention_mask")
        mask = torch.ones(states.shape[:2], dtype=torch.long) if mask is None else mask
        kwargs["encoder_hidden_states"] = torch.cat([states, token[:, None]], dim=1)
        kwargs["encoder_attention_mask"] = torch.cat([mask, (self.names >= 0)[:, None].to(mask.dtype)], dim=1)
        return args, kwargs


def slot_labels(data: WorldData, idx: np.ndarray, plans: Optional[list[tuple[Scene, int]]] = None) -> torch.Tensor:
    """(B, MAX_OBJECTS, fields) targets of the query slots: each object's labels in the caption's order; an object
    the naming prior renamed (``plans``, from ``NamingPrior.plan``) carries the prior's name, which only its token
    can tell."""
    labels = torch.from_numpy(data.objects[idx].copy())
    for row, (i, (_, name)) in enumerate(zip(idx, plans or [])):
        if name >= 0:
            labels[row, data.other_object[i], NAME_FIELD] = name + 1
    return labels


def train_language(model, processor, data: WorldData, cfg: StageConfig, heads: Optional[ObjectHeads] = None,
                   vision_lr_scale: float = 0.0, naming: float = 0.0,
                   evaluate: Optional[Callable[[], str]] = None, same_photo: float = 0.5,
                   held_out: Optional[WorldData] = None, placement: Optional[dict] = None,
                   locate: float = 0.0, locate_layer: int = 1, named_weight: float = 1.0,
                   slots: float = 0.0, name_noise: float = 0.0,
                   name_vectors: Optional[dict] = None) -> list[float]:
    """Queries, Q-Former, projection and OPT learn to caption; with ``vision_lr_scale`` > 0 the ViT is tuned
    too (at that fraction of the learning rate), its object objective (``heads``) kept as an auxiliary loss;
    ``naming`` > 0 adds the NamingPrior to that fraction of the scenes that have a second photo. With
    ``held_out`` scenes (with second photos), ``prior_slot_accuracy`` is measured at the end of the stage,
    logged and left in ``placement``. The placement objectives, as for the LLaVA: ``locate`` > 0 weighs the
    ``ObjectLocator`` read from OPT's state at the caption's first token after decoder layer ``locate_layer``
    (``blip2_locator``: the first state that has read every query); ``named_weight``: ``placement_weights``.
    Both are off by default: on the BLIP-2 (README) the locator found the token's object in 45% (the LLaVA's:
    97%), the prior's name never landed in its object's place, and the base captions lost names (39% -> 14%).
    ``slots`` > 0 weighs the query slots: the first queries' Q-Former outputs, one per object in the caption's
    order, predict that object's category, look, size and name (linear ``ObjectHeads``, discarded after).
    ``name_noise``: ``NamingPrior``'s. ``name_vectors``: a dict that gets the prior's learned name vectors
    ({name: (D,)}), for diagnostics (``scripts/binding_ceiling.py``); personalization never reads them."""
    trainable = [model.query_tokens, *model.qformer.parameters(), *model.language_projection.parameters(),
                 *model.language_model.parameters()]
    prior = NamingPrior(model.config.vision_config.hidden_size, naming, cfg.seed, same_photo,
                        name_noise) if naming > 0 else None
    groups = [{"params": trainable + (list(prior.parameters()) if prior else [])}]
    handle = model.qformer.register_forward_pre_hook(prior.hook, with_kwargs=True) if prior else None
    tuned = TunedVision(model.vision_model, heads, vision_lr_scale) if vision_lr_scale > 0 and heads is not None \
        else None
    if tuned is not None:
        groups.append(tuned.group())
    slot_heads = ObjectHeads(model.config.qformer_config.hidden_size) if slots > 0 else None
    if slot_heads is not None:
        groups[0]["params"] += list(slot_heads.parameters())
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(True)
    model.vision_model.train(tuned is not None)
    model.qformer.train()
    model.language_model.train()
    norm = PixelNormaliser()
    image_token = model.config.image_token_index
    locator = blip2_locator(model, locate_layer, data.cover.shape[-1]) if locate > 0 and prior is not None else None
    if locator is not None:
        groups[0]["params"] += list(locator.parameters())
    located: list[float] = []

    def loss_fn(idx: np.ndarray) -> torch.Tensor:
        texts = [data.captions[i] for i in idx]
        if prior is not None:
            plans = [prior.plan(data, int(i)) for i in idx]
            texts = [caption(scene) for scene, _ in plans]
            prior.prepare(lambda pixels: model.vision_model(pixel_values=pixels).last_hidden_state[:, 1:], data, idx,
                          [name for _, name in plans])
        batch = caption_batch(processor.tokenizer, model.config.num_query_tokens, image_token, texts)
        pixels = norm(data.pixels[idx])
        out = model(pixel_values=pixels, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        labels = batch["labels"][:, 1:]
        token_loss = F.cross_entropy(out.logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")
        valid = (labels != -100).float()
        weights = placement_weights(plans, named_weight) if prior is not None else None
        if weights is None:
            loss = token_loss.sum() / valid.sum()
        else:  # weighted per token, so that the scenes' caption lengths weigh as without weights
            loss = (token_loss.sum(1) * weights).sum() / (valid.sum(1) * weights).sum()
        if prior is not None:  # per-token loss of the captions that name an object vs the others
            per_sample = (token_loss.sum(1) / valid.sum(1)).detach()
            named = prior.names >= 0
            if bool(named.any()) and bool((~named).any()):
                named_loss.append((per_sample[named].mean().item(), per_sample[~named].mean().item()))
        if locator is not None:
            loss = loss + locate * locate_step(locator, prior, data, idx, located)
        if slot_heads is not None:  # query k reads the caption's k-th object (scene.objects is in caption order)
            queries = out.qformer_outputs.last_hidden_state[:, :MAX_OBJECTS]
            slot_loss = slot_heads.read_loss(queries, slot_labels(data, idx, plans if prior is not None else None))
            slot_losses.append(slot_loss.item())
            loss = loss + slots * slot_loss
        if tuned is not None:
            loss = loss + tuned.loss(data, idx)
        return loss

    named_loss: list[tuple[float, float]] = []
    slot_losses: list[float] = []
    placement = {} if placement is None else placement

    def report() -> str:
        recent = np.array(named_loss[-100:]) if named_loss else np.full((1, 2), np.nan)
        extra = evaluate() if evaluate else ""
        named, others = recent.mean(axis=0)
        where = f", the token's object located (other photo) {np.mean(located[-100:]):.3f}" if located else ""
        where += f", query slots' loss {np.mean(slot_losses[-100:]):.3f}" if slot_losses else ""
        return f"loss per token, captions naming an object {named:.3f} vs others {others:.3f}{where} {extra}"

    def finish() -> str:  # a few hundred captions with the prior's token: ~15 s
        from myvlm.backbones.blip2 import Blip2Backbone
        from myvlm.config import BackboneConfig

        backbone = Blip2Backbone(model, processor, BackboneConfig("toyworld-blip2", device="cpu", dtype="float32"))
        return prior_slots(model, prior, lambda images, names: backbone.generate(images),  # names: by the token
                           lambda pixels: model.vision_model(pixel_values=pixels).last_hidden_state[:, 1:],
                           held_out, placement)

    try:
        losses = run_stage(groups, loss_fn, len(data.captions), cfg, "language", evaluate=report,
                           finish=finish if prior is not None else None)
    finally:
        if handle is not None:
            handle.remove()
        if locator is not None:
            locator.remove()
        if tuned is not None:
            tuned.remove()
    model.requires_grad_(False).eval()
    if prior is not None and name_vectors is not None:
        name_vectors.update(prior.vectors())
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


def look_alike(look: Appearance, rng: np.random.Generator) -> Appearance:
    """Another object of the same category that differs in one respect: colour(s), pattern or detail."""
    colours = list(PATTERN_COLOURS)
    while True:
        mode = int(rng.integers(3))
        if look.pattern is None:
            other = Appearance(look.category, list(COLOURS)[int(rng.integers(len(COLOURS)))])
        elif mode == 0:
            fill, second = (str(x) for x in rng.choice(colours, size=2, replace=False))
            other = replace(look, fill=fill, second=second)
        elif mode == 1:
            other = replace(look, pattern=PATTERNS[int(rng.integers(len(PATTERNS)))])
        else:
            detail = None if rng.random() < 0.3 else DETAILS[int(rng.integers(2))]
            other = replace(look, detail=detail, detail_colour=str(rng.choice(colours)) if detail else None)
        if other.key() != look.key() and other.key() not in CONCEPT_KEYS:
            return other


def object_pairs(n: int, seed: int, look_alikes: bool = False) -> tuple[WorldData, ...]:
    """``n`` pairs of photos sharing one object (any look, details included, never a personal concept's),
    with different pose, scale, lighting, background and other objects: what "the same object" means.
    ``look_alikes``: a third view, the first photo with that object swapped for a look-alike."""
    rng = np.random.default_rng(seed)
    views: list[list[Scene]] = [[], [], []] if look_alikes else [[], []]
    for _ in range(n):
        kind = str(rng.choice(["solid", "patterned", "named"], p=[0.3, 0.5, 0.2]))
        look, name = random_appearance(rng, kind=kind)
        if kind == "patterned" and rng.random() < 0.6:
            detailed = Appearance(look.category, look.fill, look.pattern, look.second, DETAILS[int(rng.integers(2))],
                                  str(rng.choice(list(PATTERN_COLOURS))))
            look = detailed if detailed.key() not in CONCEPT_KEYS else look
        for view in views[:2]:
            view.append(sample_scene(rng, n_objects=int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2])),
                                     kinds=["solid", "patterned", "named"], fixed=[(look, name, "pair")],
                                     **PHOTO_VARIATION, fixed_sizes=("medium", "large")))
        if look_alikes:
            first = views[0][-1]
            swapped = [replace(o, appearance=look_alike(look, rng), name=None) if o.concept == "pair" else o
                       for o in first.objects]
            views[2].append(replace(first, objects=swapped))
    out = []
    for scenes in views:
        pixels = np.stack([np.asarray(render(s)) for s in scenes])
        out.append(WorldData(pixels, [caption(s) for s in scenes], np.zeros((n, 1, 1), np.float32),
                             np.zeros((n, 1, 1), np.int64), scenes))
    return tuple(out)


Box = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels


def crop_boxes(pairs: tuple[WorldData, ...], seed: int) -> tuple[list[Box], ...]:
    """Per ``object_pairs`` view, a square box around each photo's shared object: a random side of 24-40 px
    holding the object's centre at a random offset. A look-alike view (the third) reuses its anchor's boxes."""
    rng = np.random.default_rng(seed)

    def box(scene: Scene) -> Box:
        cx, cy = next(o.centre for o in scene.objects if o.concept == "pair")
        side = int(rng.integers(24, 41))
        left, top = (int(np.clip(round(c - side / 2 + rng.uniform(-side / 4, side / 4)), 0, SIZE - side))
                     for c in (cx, cy))
        return left, top, left + side, top + side

    first, second = [box(s) for s in pairs[0].scenes], [box(s) for s in pairs[1].scenes]
    return (first, second) + (first,) * (len(pairs) - 2)


def object_crops(pairs: tuple[WorldData, ...], seed: int) -> tuple[np.ndarray, ...]:
    """Zoomed-in crops of each view's shared object (``crop_boxes``), resized back to 64 px as the concept
    head's crop views are: ``(n, 64, 64, 3)`` per view. Anchor and look-alike crops differ only in the object."""
    from PIL import Image

    return tuple(np.stack([np.asarray(Image.fromarray(im).crop(box).resize((SIZE, SIZE), Image.BICUBIC))
                           for im, box in zip(view.pixels, boxes)])
                 for view, boxes in zip(pairs, crop_boxes(pairs, seed)))


INVENTORY = ([("look", c, v) for c in CATEGORIES for v in LOOKS]
             + [("fill", c, v) for c in CATEGORIES for v in PATTERN_COLOURS]
             + [("second", c, v) for c in CATEGORIES for v in PATTERN_COLOURS]
             + [("detail", c, v) for c in CATEGORIES for v in DETAILS])
INVENTORY_INDEX = {unit: i for i, unit in enumerate(INVENTORY)}
# Every appearance without its detail: solid (category, colour) or patterned (category, fill, pattern, second).
APPEARANCES = ([(c, v, None, None) for c in CATEGORIES for v in COLOURS]
               + [(c, a, p, b) for c in CATEGORIES for p in PATTERNS for a in PATTERN_COLOURS for b in PATTERN_COLOURS
                  if a != b])
APPEARANCE_INDEX = {unit: i for i, unit in enumerate(APPEARANCES)}


def appearance_id(appearance: Appearance) -> int:
    a = appearance
    return APPEARANCE_INDEX[(a.category, a.fill, a.pattern, a.second)]


def inventory(scene: Scene, conjunctions: bool = False) -> np.ndarray:
    """Multi-hot over (category, look / pattern colour / detail) pairs: which kinds of object the scene holds.
    Pairs, not single words, so that "a checkered circle" and "a circle and a checkered square" differ.
    ``conjunctions``: also one unit per whole appearance (``APPEARANCES``), appended."""
    out = np.zeros(len(INVENTORY) + (len(APPEARANCES) if conjunctions else 0), np.float32)
    for obj in scene.objects:
        a = obj.appearance
        units = [("look", a.category, a.pattern or a.fill)]
        units += [("fill", a.category, a.fill), ("second", a.category, a.second)] if a.pattern else []
        units += [("detail", a.category, a.detail)] if a.detail else []
        out[[INVENTORY_INDEX[u] for u in units]] = 1.0
        if conjunctions:
            out[len(INVENTORY) + appearance_id(a)] = 1.0
    return out


APPEARANCE_FIELDS = {"appearance": len(APPEARANCES), "detail": len(DETAILS) + 1}  # CLIP's object read-out


def object_appearances(data: WorldData) -> torch.Tensor:
    """(N, MAX_OBJECTS, 2) APPEARANCE_FIELDS labels: each object's ``appearance_id`` and detail (0 none,
    1 + DETAILS index); -1 absent."""
    out = np.full((len(data.scenes), MAX_OBJECTS, 2), -1, np.int64)
    for i, scene in enumerate(data.scenes):
        for k, obj in enumerate(scene.objects):
            a = obj.appearance
            out[i, k] = (appearance_id(a), DETAILS.index(a.detail) + 1 if a.detail else 0)
    return torch.from_numpy(out)


@dataclass
class ClipObjectives:
    """Weights of the CLIP stage's losses (0 = off). The defaults are the shipped CLIP's: whole-image pairs
    replaced by crop pairs, which the crop-scoring head needs (val, 12 concepts, head alone at threshold 0.9:
    96% recall / 7.5% look-alike FP vs 87% / 8.7% for the previous CLIP with the same head)."""

    text: float = 1.0  # contrastive (image, full description)
    inventory: float = 10.0  # multi-label read-out of the embedding: which kinds of object are in the image
    conjunctions: bool = False  # the inventory also names whole appearances (category, fill, pattern, second)
    pairs: float = 0.0  # InfoNCE between two whole photos of the same object (the previous CLIP: 1.0)
    objects: float = 0.0  # object-level read-out of the patch tokens (``ObjectHeads`` on APPEARANCE_FIELDS)
    look_alikes: float = 0.0  # the pairs' InfoNCE also against the anchor photo with the object swapped for a look-alike
    crops: float = 1.0  # InfoNCE between zoomed-in crops of the pair's object (``object_crops``), with the
    # look-alike's crop (the pairs' third view) as an extra negative


def train_clip(data: WorldData, cfg: StageConfig, pairs: Optional[tuple[WorldData, ...]] = None,
               objectives: Optional[ClipObjectives] = None, pooling: str = "tok",
               crops: Optional[tuple[np.ndarray, ...]] = None):
    """CLIP loss on (image, full description), a multi-label read-out of the image embedding (``inventory``:
    what kinds of object are in the image) and, with ``pairs``, an InfoNCE loss between two photos of the
    same object (instance discrimination: the invariance a personalization head needs). ``objectives``
    weighs these and the experimental ones; ``pooling``: "tok" (class token) or "avg" (mean patch token);
    ``crops``: ``object_crops(pairs)``, for the ``crops`` objective."""
    import open_clip
    from myvlm.toyworld.models import clip_config

    w = objectives or ClipObjectives()
    if w.look_alikes and (pairs is None or len(pairs) < 3):
        raise ValueError("the look_alikes objective needs the third view: object_pairs(..., look_alikes=True)")
    if w.crops and (crops is None or len(crops) < 3):
        raise ValueError("the crops objective needs the pairs' crops with the look-alike view: "
                         "object_crops(object_pairs(..., look_alikes=True), seed)")
    torch.manual_seed(cfg.seed)
    clip = open_clip.CLIP(**clip_config(pooling)).train()
    clip.visual.output_tokens = True
    texts = clip_text_ids([alt_text(s) for s in data.scenes])  # (N, L)
    labels = torch.from_numpy(np.stack([inventory(s, w.conjunctions) for s in data.scenes]))  # (N, units)
    readout = nn.Linear(clip.visual.output_dim, labels.shape[1])
    objects = ObjectHeads(clip.visual.transformer.width, APPEARANCE_FIELDS)
    appearances, cover = object_appearances(data), torch.from_numpy(data.cover)
    norm = PixelNormaliser()
    loss = open_clip.ClipLoss()
    n = len(data.captions) if pairs is None else min(len(data.captions), len(pairs[0].captions))

    def embed(pixels: np.ndarray) -> torch.Tensor:
        return F.normalize(clip.visual(norm(pixels))[0], dim=-1)

    def loss_fn(idx: np.ndarray) -> torch.Tensor:
        embedding, tokens = clip.visual(norm(data.pixels[idx]))
        image = F.normalize(embedding, dim=-1)
        total = image.new_zeros(())
        if w.text:
            text = F.normalize(clip.encode_text(texts[idx]), dim=-1)
            total = w.text * loss(image, text, clip.logit_scale.exp())
        total = total + w.inventory * F.binary_cross_entropy_with_logits(readout(image), labels[idx])
        if w.objects:
            total = total + w.objects * objects.loss(tokens, cover[idx], appearances[idx])
        if pairs is not None and w.pairs:
            a, b = embed(pairs[0].pixels[idx]), embed(pairs[1].pixels[idx])  # (B, E) each
            total = total + w.pairs * loss(a, b, clip.logit_scale.exp())
            if w.look_alikes:
                c = embed(pairs[2].pixels[idx])  # (B, E): the anchor's scene, the object swapped for a look-alike
                scale = clip.logit_scale.exp()
                logits = torch.cat([a @ b.T, (a * c).sum(-1, keepdim=True)], dim=1) * scale  # (B, B+1)
                total = total + w.look_alikes * F.cross_entropy(logits, torch.arange(len(idx)))
        if w.crops:
            views = [embed(view[idx]) for view in crops]  # anchor, other photo, look-alike: (B, E) each
            total = total + w.crops * _instance_loss(*views, scale=clip.logit_scale.exp())
        return total

    params = list(clip.parameters()) + list(readout.parameters()) + list(objects.parameters())
    losses = run_stage(params, loss_fn, n, cfg, "clip")
    clip.visual.output_tokens = False
    return clip.eval().requires_grad_(False), losses


def _instance_loss(anchor: torch.Tensor, positive: torch.Tensor, look_alike: torch.Tensor,
                   scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between (B, E) views of B objects, each anchor also against its look-alike."""
    logits = anchor @ positive.T * scale  # (B, B)
    target = torch.arange(len(anchor))
    extra = (anchor * look_alike).sum(-1, keepdim=True) * scale  # (B, 1)
    return (F.cross_entropy(torch.cat([logits, extra], 1), target) + F.cross_entropy(logits.T, target)) / 2


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


def llava_task(scene: Scene, name: Optional[str], rng: np.random.Generator, backbone,
               captions: float = 0.8) -> tuple[Optional[str], str]:
    """(prompt, target) for one LLaVA pretraining sample: a caption with probability ``captions``, else a question.
    ``name``: the naming prior renamed one object of ``scene`` (its ``name`` is set): the reference code's "Please
    caption this image of <name>." caption, or a question about it. Otherwise the plain caption or a scene question
    (one asks about an absent name)."""
    from myvlm.toyworld.questions import scene_questions

    if rng.random() < captions:
        return (backbone.caption_prompt([name]) if name else None), caption(scene)
    pairs = scene_questions(scene, rng)
    if name:  # the questions about the named object
        pairs = [(q, a) for q, a in pairs if name in q.split(" ")[-1] or f" {name} " in q] or pairs
    return pairs[int(rng.integers(len(pairs)))]


class PriorInjector(ConceptInjector):
    """The naming prior through the library's own LLaVA injection path (concept slots at the projector
    input): one concept whose token is the prior's per-sample token."""

    def __init__(self, backbone, prior: NamingPrior):
        super().__init__(backbone, ConceptBank(["prior"], backbone.concept_dim, seed=0))
        self.prior = prior

    def concept_tokens(self, image_tokens: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        if self.active_mask is None:
            return None
        mask = self.active_mask.to(image_tokens.device)  # (B, 1)
        return self.prior.tokens(image_tokens)[:, None] * mask[..., None], mask


class ObjectLocator(nn.Module):
    """Where is the object the naming prior's token names? A linear read-out of a state the model computes
    after the token joined (``states``, set by a forward hook), over the image's patches; the target is the
    renamed object's cover in *this* image. With the token's look from another photo, its own position says
    nothing: the model must find the object that looks like it. Discarded after pretraining, like the name
    vectors: what stays is a model that locates the object a token looks like; with ``placement_weights``
    it also puts the identifier in that object's place of a caption (README, "Placement, trained").
    ``llava_slot_locator`` reads the LLM's hidden state at the concept slot after one decoder layer (the
    slot comes after the image tokens, so it can attend to the patches)."""

    def __init__(self, width: int, patches: int):
        super().__init__()
        self.readout = nn.Linear(width, patches)
        self.states: Optional[torch.Tensor] = None  # (B, width), from the last forward
        self.handle = None  # the hook's handle

    def loss(self, cover: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """``cover``: (B, patches) the named object's cover; ``chosen``: (B,) bool, samples with a token."""
        states, self.states = self.states, None
        if states is None or not bool(chosen.any()):
            return torch.zeros(())
        target = cover[chosen] / cover[chosen].sum(-1, keepdim=True).clamp(min=1e-6)
        return -(target * F.log_softmax(self.readout(states[chosen]), dim=-1)).sum(-1).mean()

    @torch.no_grad()
    def accuracy(self, cover: torch.Tensor, chosen: torch.Tensor) -> Optional[float]:
        """Fraction of the chosen samples whose most likely patch is one the object covers."""
        if self.states is None or not bool(chosen.any()):
            return None
        best = self.readout(self.states[chosen]).argmax(-1, keepdim=True)
        return float((cover[chosen].gather(1, best)[:, 0] > 0).float().mean())

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def llava_slot_locator(backbone, layer: int, patches: int) -> ObjectLocator:
    locator = ObjectLocator(backbone.model.config.text_config.hidden_size, patches)

    def record(module: nn.Module, args: tuple, output) -> None:
        slots = backbone._slots
        hidden = output[0] if isinstance(output, tuple) else output  # (B, T, D)
        if slots is not None and hidden.shape[1] == slots.mask.shape[1]:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            locator.states = hidden[rows, slots.positions[:, 0].to(hidden.device)]  # (B, D)

    locator.handle = backbone.model.model.language_model.layers[layer].register_forward_hook(record)
    return locator


def blip2_locator(model, layer: int, patches: int) -> ObjectLocator:
    """An ``ObjectLocator`` on the tiny BLIP-2: OPT's hidden state after decoder layer ``layer`` at the first
    text position (the BOS after the query tokens, ``caption_batch``'s layout), which has read every query."""
    locator = ObjectLocator(model.config.text_config.hidden_size, patches)
    first_text = model.config.num_query_tokens

    def record(module: nn.Module, args: tuple, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output  # (B, T, D)
        if hidden.shape[1] > first_text:
            locator.states = hidden[:, first_text]

    locator.handle = model.language_model.model.decoder.layers[layer].register_forward_hook(record)
    return locator


def placement_weights(plans: list[tuple[Scene, int]], named_weight: float) -> Optional[torch.Tensor]:
    """(B,) caption weights: ``named_weight`` for the scenes with several objects where the naming prior renamed
    one (where the caption must say *which* object the token is), 1 elsewhere; None when it is 1."""
    if named_weight == 1.0:
        return None
    several = torch.tensor([name >= 0 and len(scene.objects) >= 2 for scene, name in plans], dtype=torch.float32)
    return 1.0 + (named_weight - 1.0) * several


def locate_step(locator: ObjectLocator, prior: "NamingPrior", data: WorldData, idx: np.ndarray,
                accuracies: list[float]) -> torch.Tensor:
    """The locator's loss for this batch; logs its accuracy on the tokens from another photo."""
    chosen = prior.names >= 0
    cover = torch.from_numpy(data.cover[idx, np.maximum(data.other_object[idx], 0)])  # (B, patches)
    accuracy = locator.accuracy(cover, chosen & prior.from_other)
    if accuracy is not None:
        accuracies.append(accuracy)
    return locator.loss(cover, chosen)


@torch.no_grad()
def prior_slot_accuracy(prior: "NamingPrior", caption: Callable[[list, list[int]], list[str]],
                        patch_features: Callable, data: WorldData, same_photo: float, batch_size: int = 50) -> float:
    """The naming prior, measured the way personalization is: in held-out scenes with several objects, one
    object is renamed by a token (its look from this photo with probability ``same_photo``, else from
    another photo); the fraction of greedy captions that put the name in that object's place.
    ``caption(images, names)``: the model's captions with the prior's token in."""
    from PIL import Image

    from myvlm.toyworld.scenes import named_in_place

    saved = prior.same_photo, prior.rng
    prior.same_photo, prior.rng = same_photo, np.random.default_rng(0)
    rows = [i for i, s in enumerate(data.scenes) if len(s.objects) >= 2 and data.other_object[i] >= 0
            and not s.objects[data.other_object[i]].name]
    hits = []
    try:
        for start in range(0, len(rows), batch_size):
            idx = np.array(rows[start : start + batch_size])
            names = [NAMES.index(next(n for n in NAMES if n not in {o.name for o in data.scenes[i].objects}))
                     for i in idx]
            prior.prepare(patch_features, data, idx, names)
            texts = caption([Image.fromarray(data.pixels[i]) for i in idx], names)
            hits += [named_in_place(text, int(data.other_object[i]), NAMES[n]) for i, n, text in zip(idx, names, texts)]
    finally:
        prior.same_photo, prior.rng = saved
        prior.names = prior.features = None
    return float(np.mean(hits)) if hits else float("nan")


def prior_slots(model: nn.Module, prior: "NamingPrior", caption: Callable, patch_features: Callable,
                held_out: Optional[WorldData], into: dict) -> str:
    """``prior_slot_accuracy`` for tokens from the same and from another photo, stored in ``into``; a log line.
    ``model`` is measured in eval mode (no dropout) on a forked RNG, so training goes on exactly as without it."""
    if held_out is None or not bool((held_out.other_object >= 0).any()):
        return ""
    modes = {module: module.training for module in [*model.modules(), prior]}
    model.eval()
    prior.eval()  # its tokens without the training's name noise
    try:
        with torch.random.fork_rng():
            for key, same in (("same_photo", 1.0), ("other_photo", 0.0)):
                into[key] = round(prior_slot_accuracy(prior, caption, patch_features, held_out, same), 4)
    finally:
        for module, training in modes.items():
            module.training = training
    return f" name in the token's place: same photo {into['same_photo']:.3f}, other photo {into['other_photo']:.3f}"


def train_llava_language(model, processor, data: WorldData, cfg: StageConfig, naming: float = 0.0,
                         same_photo: float = 0.5, locate: float = 0.0, locate_layer: int = 1,
                         held_out: Optional[WorldData] = None, named_weight: float = 1.0,
                         placement: Optional[dict] = None, heads: Optional[ObjectHeads] = None,
                         vision_lr_scale: float = 0.0, name_vectors: Optional[dict] = None,
                         captions: float = 0.8, look_pool: str = "cover", box_margin: float = 0.0) -> list[float]:
    """Projector + Llama learn captions and answers through the backbone's own batch builder; ``naming`` > 0
    adds the NamingPrior, its token inserted by the backbone's concept slots at the projector input;
    ``locate`` > 0 weighs the ``ObjectLocator`` objective (read after decoder layer ``locate_layer``);
    ``named_weight``: see ``placement_weights``; ``held_out``, ``placement``: as in ``train_language``.
    ``vision_lr_scale`` > 0 (with the vision stage's ``heads``): the vision tower is tuned too, at that fraction
    of the learning rate, its object objective kept, as the BLIP-2's is in ``train_language``. ``name_vectors``: as
    there. ``captions``: the share of samples that are captions (the others are questions, ``llava_task``).
    ``look_pool``, ``box_margin``: how the naming prior pools its looks (``NamingPrior``)."""
    from PIL import Image

    from myvlm.backbones.llava import LlavaBackbone
    from myvlm.config import BackboneConfig

    backbone = LlavaBackbone(model, processor, BackboneConfig("toyworld-llava", device="cpu", dtype="float32"))
    placement = {} if placement is None else placement
    prior = NamingPrior(backbone.concept_dim, naming, cfg.seed, same_photo, look_pool=look_pool, box_margin=box_margin)
    trainable = [*model.model.multi_modal_projector.parameters(), *model.model.language_model.parameters(),
                 *model.lm_head.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    rng = np.random.default_rng(cfg.seed + 1)
    vision = model.model.vision_tower
    layer = model.config.vision_feature_layer

    def patch_features(pixels: torch.Tensor) -> torch.Tensor:
        return vision(pixel_values=pixels, output_hidden_states=True).hidden_states[layer][:, 1:]

    locator = llava_slot_locator(backbone, locate_layer, data.cover.shape[-1]) if locate > 0 and naming > 0 else None
    located: list[float] = []
    tuned = TunedVision(vision, heads, vision_lr_scale) if vision_lr_scale > 0 and heads is not None else None

    def loss_fn(idx: np.ndarray) -> torch.Tensor:
        plans = [prior.plan(data, int(i)) for i in idx]
        tasks = [llava_task(scene, NAMES[name] if name >= 0 else None, rng, backbone, captions)
                 for scene, name in plans]
        prior.prepare(patch_features, data, idx, [name for _, name in plans])
        images = [Image.fromarray(data.pixels[i]) for i in idx]
        with injector.activate([[0] if name >= 0 else [] for _, name in plans]):
            batch = backbone.prepare_batch(images, [t for _, t in tasks], [p for p, _ in tasks])
            per_sample = backbone.sequence_loss(batch)  # (B,)
        weights = placement_weights(plans, named_weight)
        loss = per_sample.mean() if weights is None else (per_sample * weights).sum() / weights.sum()
        if tuned is not None:
            loss = loss + tuned.loss(data, idx)
        return loss + locate * locate_step(locator, prior, data, idx, located) if locator is not None else loss

    def captions_with_token(images: list, names: list[int]) -> list[str]:
        with injector.activate([[0]] * len(images)):
            return backbone.generate(images, [backbone.caption_prompt([NAMES[n]]) for n in names])

    def report() -> str:
        return f"the token's object located (token from another photo) {np.mean(located[-100:]):.3f}" if located else ""

    def finish() -> str:
        return prior_slots(model, prior, captions_with_token, patch_features, held_out, placement)

    injector = PriorInjector(backbone, prior)
    extra = list(locator.parameters()) if locator is not None else []
    params = trainable + list(prior.parameters()) + extra
    if tuned is not None:
        params = [{"params": params}, tuned.group()]
    try:
        with injector:
            losses = run_stage(params, loss_fn, len(data.captions), cfg, "llava-language", evaluate=report,
                               finish=finish)
    finally:
        if locator is not None:
            locator.remove()
        if tuned is not None:
            tuned.remove()
    model.requires_grad_(False).eval()
    if name_vectors is not None:
        name_vectors.update(prior.vectors())
    return losses
