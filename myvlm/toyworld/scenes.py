"""The toy world: scenes of 1-3 shapes with known captions, deterministic from a seed.

    from myvlm.toyworld.scenes import sample_scene, render, caption
    scene = sample_scene(np.random.default_rng(0))
    render(scene)   # 64x64 RGB PIL image
    caption(scene)  # "a small red circle above a striped square on a dotted background"

Vocabulary: category x (solid colour | two-colour pattern) x size, 2-object relations
("above", "left of", canonical: the top / left object is named first), 3 objects left to right,
and a background type. Scenes also hold *named objects*: fixed (category, pattern, colours)
combinations that captions call by a name ("zib above a blue square ..."), so that the language
model learns names as something seen, as real LLMs do; ``pretrain.NamingPrior`` also teaches that
a name can be given by a token showing the object. Medium size is not spoken ("a red circle").
Every scene keeps its structured ground truth.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # image side in pixels
SUPERSAMPLE = 4  # shape masks are drawn at SIZE * SUPERSAMPLE and averaged down (anti-aliasing)

CATEGORIES = ("circle", "square", "triangle", "star")
COLOURS = {  # solid colours of the base vocabulary
    "red": (215, 35, 35), "green": (35, 160, 55), "blue": (40, 75, 215),
    "yellow": (240, 205, 30), "purple": (140, 50, 180), "orange": (245, 130, 20),
}
PATTERN_COLOURS = {**COLOURS, "white": (250, 250, 250), "black": (25, 25, 25)}  # colours inside patterns
PATTERNS = ("striped", "dotted", "checkered", "split")  # two-colour fills
DETAILS = ("outline", "centre")  # shape details only personal concepts have (a rim, a centre dot)
SIZES = {"small": 18, "medium": 24, "large": 30}  # diameter in pixels (times the scale jitter)
BACKGROUNDS = ("plain", "striped", "checkered", "dotted")
RELATIONS = ("above", "left of")
# Names of the named objects (pretraining). Short, pronounceable, one BPE token each.
NAMES = (
    "zib", "mox", "tev", "kal", "rup", "dax", "fen", "gol", "hix", "jor", "lum", "nep",
    "pov", "quan", "ris", "sot", "vek", "wam", "yul", "zor", "bip", "cav", "dov", "fum",
)


@dataclass(frozen=True)
class Appearance:
    """What an object looks like. Solid: ``pattern`` None. Patterned: ``fill`` and ``second`` colours."""

    category: str  # one of CATEGORIES
    fill: str  # the solid colour, or the first colour of a pattern
    pattern: Optional[str] = None  # one of PATTERNS, None = solid
    second: Optional[str] = None  # the pattern's second colour
    detail: Optional[str] = None  # one of DETAILS (personal concepts only)
    detail_colour: Optional[str] = None  # colour of the detail

    def key(self) -> tuple:
        return (self.category, self.fill, self.pattern, self.second, self.detail, self.detail_colour)


@dataclass
class SceneObject:
    appearance: Appearance
    size: str  # one of SIZES
    centre: tuple[float, float]  # (x, y) in pixels
    angle: float = 0.0  # pose: rotation in degrees
    scale: float = 1.0  # multiplies the size's diameter (photo-like scale variation)
    name: Optional[str] = None  # the name captions use (named objects, or a personal concept's identifier)
    concept: Optional[str] = None  # the personal concept this object is, if any


@dataclass
class Scene:
    objects: list[SceneObject]  # in caption order (top/left first)
    background: str  # one of BACKGROUNDS
    relation: Optional[str] = None  # for 2 objects: one of RELATIONS
    seed: int = 0  # drives background colour, texture phase, lighting and noise
    lighting: float = 1.0  # brightness multiplier
    extra: dict = field(default_factory=dict)  # free-form ground truth (e.g. split, role)


# ---- vocabulary of named objects -------------------------------------------------------------


def _all_patterned(category: str) -> list[Appearance]:
    names = list(PATTERN_COLOURS)
    return [Appearance(category, a, p, b) for p in PATTERNS for a in names for b in names if a != b]


def named_objects(seed: int = 0) -> dict[str, Appearance]:
    """NAMES -> appearance, len(NAMES) / len(CATEGORIES) per category, drawn deterministically."""
    rng = np.random.default_rng(seed + 7)
    per = len(NAMES) // len(CATEGORIES)
    table = {}
    for c, category in enumerate(CATEGORIES):
        pool = _all_patterned(category)
        picks = rng.choice(len(pool), size=per, replace=False)
        for k, i in enumerate(picks):
            table[NAMES[c * per + k]] = pool[int(i)]
    return table


NAMED = named_objects()
NAME_OF = {appearance.key(): name for name, appearance in NAMED.items()}


# ---- sampling --------------------------------------------------------------------------------


def random_appearance(rng: np.random.Generator, category: Optional[str] = None, kind: Optional[str] = None,
                      avoid: frozenset = frozenset()) -> tuple[Appearance, Optional[str]]:
    """(appearance, name): ``kind`` 'solid' | 'patterned' (never a named combination) | 'named'."""
    category = category or CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    kind = kind or str(rng.choice(["solid", "patterned", "named"], p=[0.5, 0.25, 0.25]))
    if kind == "named":
        options = [n for n, a in NAMED.items() if a.category == category and n not in avoid]
        name = options[int(rng.integers(len(options)))]
        return NAMED[name], name
    if kind == "solid":
        return Appearance(category, list(COLOURS)[int(rng.integers(len(COLOURS)))]), None
    while True:
        a, b = rng.choice(list(PATTERN_COLOURS), size=2, replace=False)
        appearance = Appearance(category, str(a), PATTERNS[int(rng.integers(len(PATTERNS)))], str(b))
        if appearance.key() not in NAME_OF and appearance.key() not in avoid:
            return appearance, None


def _layout(rng: np.random.Generator, n: int, relation: Optional[str], sizes: list[str]) -> list[tuple[float, float]]:
    """Centres in caption order: top then bottom ('above'), left to right otherwise."""
    def spot(lo_x, hi_x, lo_y, hi_y, size):
        r = SIZES[size] / 2 + 2
        return (float(rng.uniform(lo_x + r, max(lo_x + r, hi_x - r))), float(rng.uniform(lo_y + r, max(lo_y + r, hi_y - r))))

    if n == 1:
        return [spot(0, SIZE, 0, SIZE, sizes[0])]
    if n == 2 and relation == "above":
        return [spot(0, SIZE, 0, SIZE / 2, sizes[0]), spot(0, SIZE, SIZE / 2, SIZE, sizes[1])]
    width = SIZE / n
    return [spot(i * width, (i + 1) * width, 0, SIZE, s) for i, s in enumerate(sizes)]


# How much photos of one object vary (the personal concepts' photos, ``concepts.py``): sample_scene keywords.
PHOTO_VARIATION = {"pose": 35.0, "scale_jitter": 0.15, "lighting": (0.75, 1.25)}


def sample_scene(rng: np.random.Generator, n_objects: Optional[int] = None, kinds: Optional[list[str]] = None,
                 fixed: Optional[list[tuple[Appearance, Optional[str], Optional[str]]]] = None,
                 avoid_names: frozenset = frozenset(), pose: float = 20.0, scale_jitter: float = 0.0,
                 lighting: tuple[float, float] = (0.85, 1.15), fixed_sizes: Optional[tuple[str, ...]] = None) -> Scene:
    """A random scene. ``fixed``: (appearance, name, concept) objects to include at random slots, with a
    size from ``fixed_sizes`` when given; the other objects are drawn with ``kinds`` probabilities."""
    fixed = list(fixed or [])
    n = n_objects or int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    n = max(n, len(fixed))
    relation = str(rng.choice(RELATIONS)) if n == 2 else None
    size_names = ["small", "medium"] if n == 3 else list(SIZES)
    sizes = [size_names[int(rng.integers(len(size_names)))] for _ in range(n)]
    slots = list(rng.permutation(n))
    entries: list = [None] * n
    for item, slot in zip(fixed, slots):
        entries[int(slot)] = item
        allowed = [s for s in (fixed_sizes or ()) if s in size_names]
        if allowed:
            sizes[int(slot)] = allowed[int(rng.integers(len(allowed)))]
    objects = []
    for i, (size, centre) in enumerate(zip(sizes, _layout(rng, n, relation, sizes))):
        if entries[i] is None:
            kind = str(rng.choice(kinds)) if kinds else None
            appearance, name = random_appearance(rng, kind=kind, avoid=avoid_names)
            concept = None
        else:
            appearance, name, concept = entries[i]
        scale = float(rng.uniform(1 - scale_jitter, 1 + scale_jitter)) if scale_jitter else 1.0
        objects.append(SceneObject(appearance, size, centre, float(rng.uniform(-pose, pose)), scale, name, concept))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return Scene(objects, background, relation, int(rng.integers(2**31)), float(rng.uniform(*lighting)))


# ---- captions --------------------------------------------------------------------------------


def phrase(obj: SceneObject, names: bool = True) -> str:
    """How the base vocabulary names one object; ``names=False`` describes named objects generically."""
    if names and obj.name:
        return obj.name
    size = "" if obj.size == "medium" else f"{obj.size} "
    look = obj.appearance.pattern or obj.appearance.fill
    return f"a {size}{look} {obj.appearance.category}"


def caption(scene: Scene, names: bool = True, name_concepts: bool = True) -> str:
    """The ground-truth caption. ``name_concepts=False``: personal concepts are described, not named."""
    parts = [phrase(o, names and (name_concepts or o.concept is None)) for o in scene.objects]
    if len(parts) == 1:
        body = parts[0]
    elif len(parts) == 2:
        body = f"{parts[0]} {scene.relation} {parts[1]}"
    else:
        body = f"{parts[0]}, {parts[1]} and {parts[2]}"
    return f"{body} on a {scene.background} background"


def mirrored_caption(scene: Scene, names: bool = True, name_concepts: bool = True) -> str:
    """The caption of the scene's photo mirrored left-right: what is left of something is then right of it,
    so two objects side by side and three in a row are named in the other order ("above" stays)."""
    objects = list(scene.objects)
    if len(objects) == 3 or (len(objects) == 2 and scene.relation == "left of"):
        objects.reverse()
    return caption(replace(scene, objects=objects), names, name_concepts)


_CAPTION = re.compile(r"^(?P<body>.+) on a (?P<background>\w+) background$")


def parse_caption(text: str) -> Optional[dict]:
    """Inverse of ``caption``: {'objects': [phrase, ...], 'relation', 'background'} or None if off-grammar."""
    match = _CAPTION.match(" ".join(text.strip().split()))
    if not match:
        return None
    body, relation = match["body"], None
    for rel in RELATIONS:
        if f" {rel} " in body:
            parts, relation = body.split(f" {rel} ", 1), rel
            break
    else:
        three = re.match(r"^(.+), (.+) and (.+)$", body)
        parts = list(three.groups()) if three else [body]
    return {"objects": [p.strip() for p in parts], "relation": relation, "background": match["background"]}


def named_in_place(text: str, index: int, name: str) -> bool:
    """Whether caption ``text`` calls the ``index``-th object (caption order) by ``name``."""
    objects = (parse_caption(text) or {"objects": []})["objects"]
    return index < len(objects) and objects[index] == name


# ---- rendering -------------------------------------------------------------------------------


def _polygon(category: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    theta = np.deg2rad(angle)
    if category == "square":
        corners = [(np.pi / 4 + k * np.pi / 2, r * 0.8 * np.sqrt(2)) for k in range(4)]
    elif category == "triangle":
        corners = [(-np.pi / 2 + k * 2 * np.pi / 3, r * 1.1) for k in range(3)]
    else:  # star: 5 outer, 5 inner points
        corners = [(-np.pi / 2 + k * np.pi / 5, r * 1.1 if k % 2 == 0 else r * 0.45) for k in range(10)]
    return [(cx + d * np.cos(a + theta), cy + d * np.sin(a + theta)) for a, d in corners]


def _mask(category: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Soft mask (SIZE, SIZE) in [0, 1]."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (SIZE * s, SIZE * s), 0)
    draw = ImageDraw.Draw(canvas)
    if category == "circle":
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=255)
    else:
        draw.polygon([(x * s, y * s) for x, y in _polygon(category, cx, cy, r, angle)], fill=255)
    # the mean of each s x s block, summed as integers (exact, so the same floats as a float mean; 4x faster)
    rows = np.asarray(canvas).reshape(SIZE, s, SIZE * s).sum(axis=1, dtype=np.uint32)  # (SIZE, SIZE * s)
    mask = rows.reshape(SIZE, SIZE, s).sum(axis=2, dtype=np.uint32).astype(np.float32) / np.float32(s * s)
    return mask / 255.0


def _texture(pattern: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """(SIZE, SIZE) in {0, 1}: 1 where the pattern shows its second colour; rotates with the object."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    theta = np.deg2rad(angle)
    u = (xs - cx) * np.cos(theta) + (ys - cy) * np.sin(theta)
    v = -(xs - cx) * np.sin(theta) + (ys - cy) * np.cos(theta)
    period = max(4.0, r * 0.55)
    if pattern == "striped":
        return (np.floor(v / (period / 2)) % 2).astype(np.float32)
    if pattern == "checkered":
        return ((np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2).astype(np.float32)
    if pattern == "dotted":
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        return (du**2 + dv**2 < (period * 0.3) ** 2).astype(np.float32)
    return (u > 0).astype(np.float32)  # split: two halves


def _background(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(150, 215) + rng.uniform(-22, 22, size=3)
    other = base * rng.uniform(0.72, 0.82)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    period, phase = rng.uniform(6, 10), rng.uniform(0, 10)
    if scene.background == "striped":
        direction = rng.integers(3)
        coord = [ys, xs, xs + ys][int(direction)]
        pick = np.floor((coord + phase) / (period / 2)) % 2
    elif scene.background == "checkered":
        pick = (np.floor((xs + phase) / (period / 2)) + np.floor((ys + phase) / (period / 2))) % 2
    elif scene.background == "dotted":
        du, dv = ((xs + phase) % period) - period / 2, ((ys + phase) % period) - period / 2
        pick = (du**2 + dv**2 < 2.2).astype(np.float32)
    else:
        pick = np.zeros((SIZE, SIZE), np.float32)
    return base * (1 - pick[..., None]) + other * pick[..., None]  # (H, W, 3)


def render_object(pixels: np.ndarray, obj: SceneObject) -> np.ndarray:
    """Paint ``obj`` onto ``pixels`` (H, W, 3) float; returns its mask (H, W)."""
    look = obj.appearance
    r = SIZES[obj.size] * obj.scale / 2
    cx, cy = obj.centre
    mask = _mask(look.category, cx, cy, r, obj.angle)
    fill = np.array(PATTERN_COLOURS[look.fill], np.float32) * np.ones_like(pixels)
    if look.pattern:
        t = _texture(look.pattern, cx, cy, r, obj.angle)[..., None]
        fill = fill * (1 - t) + np.array(PATTERN_COLOURS[look.second], np.float32) * t
    if look.detail == "outline":
        inner = _mask(look.category, cx, cy, r * 0.72, obj.angle)
        rim = np.clip(mask - inner, 0, 1)[..., None]
        fill = fill * (1 - rim) + np.array(PATTERN_COLOURS[look.detail_colour], np.float32) * rim
    elif look.detail == "centre":
        dot = _mask("circle", cx, cy, r * 0.3, 0.0)[..., None]
        fill = fill * (1 - dot) + np.array(PATTERN_COLOURS[look.detail_colour], np.float32) * dot
    pixels[:] = pixels * (1 - mask[..., None]) + fill * mask[..., None]
    return mask


def render(scene: Scene, with_masks: bool = False):
    """The scene as a SIZE x SIZE RGB image (and the per-object masks when ``with_masks``)."""
    rng = np.random.default_rng(scene.seed)
    pixels = _background(scene, rng)
    masks = [render_object(pixels, obj) for obj in scene.objects]
    pixels = pixels * scene.lighting + rng.normal(0, 5, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return (image, masks) if with_masks else image


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """A rendered object's box (left, top, right, bottom), fractions of the image: what a box from a detector
    or the ground truth gives ``myvlm.look``; the whole image for an empty mask."""
    ys, xs = np.nonzero(mask > 0.5)
    if not len(xs):
        return 0.0, 0.0, 1.0, 1.0
    return xs.min() / SIZE, ys.min() / SIZE, (xs.max() + 1) / SIZE, (ys.max() + 1) / SIZE


def with_background(scene: Scene, background: str) -> Scene:
    return replace(scene, background=background)
