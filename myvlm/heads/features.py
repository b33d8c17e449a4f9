"""Image feature extractors for concept heads, with a cache and augmented views.

    from myvlm.heads.features import build_feature_extractor
    extractor = build_feature_extractor({"type": "open_clip", "model": "ViT-H-14-378-quickgelu", "pretrained": "dfn5b"})
    features = extractor(images)  # (B, D) float32 on the CPU

An extractor is any callable ``list[PIL.Image] -> Tensor (B, D)`` with a ``describe()`` dict that
names it; ``describe()`` is written into the concept JSON so ``build_feature_extractor`` can rebuild
it on load. Plain callables (one image -> one vector) are wrapped by ``as_feature_extractor``.
Heavy dependencies (open_clip, ai_edge_litert) are imported only when an extractor is built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

_EXTRACTORS: dict[str, Callable[..., "FeatureExtractor"]] = {}

# The paper's object encoder: DFN5B-CLIP-ViT-H-14 (HF apple/DFN5B-CLIP-ViT-H-14-378, a.k.a. "-384").
DEFAULT_CLIP_MODEL = "ViT-H-14-378-quickgelu"
DEFAULT_CLIP_PRETRAINED = "dfn5b"

# A tiny CLIP config for tests and demos: random weights, fast on a CPU.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps a batch of RGB images to features ``(B, D)``; ``describe()`` says how to rebuild it."""

    name: str

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]: ...


def register_extractor(name: str) -> Callable[[Callable[..., FeatureExtractor]], Callable[..., FeatureExtractor]]:
    """Decorator: make an extractor buildable from a ``{"type": name, ...}`` spec."""

    def wrap(builder: Callable[..., FeatureExtractor]) -> Callable[..., FeatureExtractor]:
        if name in _EXTRACTORS and _EXTRACTORS[name] is not builder:
            raise ValueError(f"a feature extractor named {name!r} is already registered")
        _EXTRACTORS[name] = builder
        return builder

    return wrap


def available_extractors() -> list[str]:
    return sorted(_EXTRACTORS)


def build_feature_extractor(spec: dict[str, Any], **runtime: Any) -> FeatureExtractor:
    """Rebuild an extractor from its ``describe()`` dict; ``runtime`` adds e.g. ``device``/``dtype``."""
    kind = spec.get("type")
    if kind not in _EXTRACTORS:
        raise ValueError(
            f"cannot rebuild feature extractor {spec!r}: unknown type {kind!r} (known: {available_extractors()}); "
            "pass feature_extractor=... when loading the concept"
        )
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    return _EXTRACTORS[kind](**kwargs, **runtime)


class CallableFeatures:
    """Wraps a plain callable: ``fn(image) -> vector`` (or ``fn(images) -> (B, D)`` with ``batched=True``)."""

    def __init__(self, fn: Callable[..., Any], name: Optional[str] = None, batched: bool = False):
        self.fn = fn  # the user's function
        self.name = name or getattr(fn, "__name__", type(fn).__name__)  # recorded in the concept JSON
        self.batched = batched  # True when fn takes the whole list of images

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if self.batched:
            return torch.as_tensor(np.asarray(self.fn(list(images))), dtype=torch.float32)
        rows = [torch.as_tensor(np.asarray(self.fn(image)), dtype=torch.float32).flatten() for image in images]
        return torch.stack(rows)

    def describe(self) -> dict[str, Any]:
        return {"type": "callable", "name": self.name}


def as_feature_extractor(obj: Any) -> FeatureExtractor:
    """Accept an extractor, or any callable image -> vector."""
    if isinstance(obj, (FeatureExtractor, CachedFeatures)):
        return obj
    if callable(obj):
        return CallableFeatures(obj)
    raise TypeError(f"feature_extractor must be callable (images -> (B, D) features), got {type(obj).__name__}")


@register_extractor("open_clip")
class OpenClipFeatures:
    """open_clip image features. ``pretrained`` is a tag (``dfn5b``), a local checkpoint file, or None.

    ``model_cfg`` builds a custom architecture with random weights (seeded), e.g. ``TINY_CLIP_CONFIG``.
    """

    def __init__(
        self,
        model: str = DEFAULT_CLIP_MODEL,  # open_clip model name (ignored when model_cfg is given)
        pretrained: Optional[str] = DEFAULT_CLIP_PRETRAINED,  # tag, path to a checkpoint, or None (random)
        model_cfg: Optional[dict[str, Any]] = None,  # custom CLIP config dict -> random weights from `seed`
        seed: int = 0,  # initialisation seed when the weights are random
        batch_size: int = 16,  # images per encoder forward
        device: Union[str, torch.device, None] = None,  # where the encoder runs; None = CPU
        dtype: Optional[torch.dtype] = None,  # encoder dtype; None = float32
    ):
        import open_clip

        self.model_name, self.pretrained, self.model_cfg, self.seed = model, pretrained, model_cfg, seed
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype or torch.float32
        if model_cfg is not None:
            torch.manual_seed(seed)
            clip = open_clip.CLIP(**model_cfg)
            self.preprocess = open_clip.image_transform(model_cfg["vision_cfg"]["image_size"], is_train=False)
            self.name = "open_clip:custom"
        else:
            clip, self.preprocess = self._create(open_clip)
            self.name = f"open_clip:{model}:{pretrained}"
        self.model = clip.visual.to(self.device, self.dtype).eval()

    def _create(self, open_clip: Any) -> tuple[Any, Any]:
        if self.pretrained is None:
            logger.warning("open_clip %s has random weights (pretrained=None): meaningless features", self.model_name)
            torch.manual_seed(self.seed)
        try:
            clip, _, preprocess = open_clip.create_model_and_transforms(self.model_name, pretrained=self.pretrained)
        except RuntimeError as error:
            raise RuntimeError(
                f"could not load open_clip model {self.model_name!r} with pretrained={self.pretrained!r} ({error}). "
                "Without internet, download the weights elsewhere and pass the file: "
                "pretrained='/path/to/open_clip_model.safetensors' (open_clip model name unchanged)."
            ) from error
        return clip, preprocess

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(image) for image in images[start : start + self.batch_size]])
            out.append(self.model(batch.to(self.device, self.dtype)).float().cpu())  # (b, D)
        return torch.cat(out)

    def describe(self) -> dict[str, Any]:
        if self.model_cfg is not None:
            return {"type": "open_clip", "model_cfg": self.model_cfg, "seed": self.seed, "pretrained": None}
        return {"type": "open_clip", "model": self.model_name, "pretrained": self.pretrained}


def tiny_clip_features(seed: int = 0, **runtime: Any) -> OpenClipFeatures:
    """A random-weight tiny open_clip encoder (64 px, 64-d): for tests and offline demos only."""
    return OpenClipFeatures(model_cfg=TINY_CLIP_CONFIG, pretrained=None, seed=seed, **runtime)


@register_extractor("litert")
class LiteRTFeatures:
    """A quantized TFLite image encoder (e.g. MobileNet v1 embedding: uint8 224x224x3 -> 1024-d)."""

    def __init__(
        self,
        model_path: Union[str, Path],  # the .tflite file
        num_threads: int = 1,  # LiteRT CPU threads
        device: Any = None,  # accepted for a uniform signature; LiteRT runs on the CPU
        dtype: Any = None,  # idem
    ):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as error:
            raise ImportError("LiteRTFeatures needs LiteRT: pip install ai-edge-litert") from error
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"LiteRT model not found: {self.model_path}")
        self.num_threads = num_threads
        self.interpreter = Interpreter(model_path=str(self.model_path), num_threads=num_threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.size = (int(self.input["shape"][2]), int(self.input["shape"][1]))  # (W, H)
        self.name = f"litert:{self.model_path.name}"

    def _encode_one(self, image: Image.Image) -> np.ndarray:
        pixels = np.asarray(image.convert("RGB").resize(self.size, Image.BILINEAR), dtype=np.uint8)[None]
        if self.input["dtype"] != np.uint8:
            scale, zero = self.input["quantization"]
            pixels = (pixels / 255.0 if not scale else pixels / scale + zero).astype(self.input["dtype"])
        self.interpreter.set_tensor(self.input["index"], pixels)
        self.interpreter.invoke()
        raw = self.interpreter.get_tensor(self.output["index"]).reshape(-1)
        scale, zero = self.output["quantization"]
        return (raw.astype(np.float32) - zero) * scale if scale else raw.astype(np.float32)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self._encode_one(image) for image in images]))

    def describe(self) -> dict[str, Any]:
        return {"type": "litert", "model_path": str(self.model_path), "num_threads": self.num_threads}


# --- augmented views -------------------------------------------------------------------------

def _rotate_and_crop(image: Image.Image, degrees: float) -> Image.Image:
    """Rotate and crop the largest axis-aligned rectangle with no empty corners."""
    width, height = image.size
    angle = math.radians(abs(degrees))
    long_side, short_side = max(width, height), min(width, height)
    sin, cos = math.sin(angle), math.cos(angle)
    if short_side <= 2.0 * sin * cos * long_side or abs(sin - cos) < 1e-10:
        half = 0.5 * short_side
        crop_w, crop_h = (half / sin, half / cos) if width >= height else (half / cos, half / sin)
    else:
        cos_2a = cos * cos - sin * sin
        crop_w, crop_h = (width * cos - height * sin) / cos_2a, (height * cos - width * sin) / cos_2a
    rotated = image.rotate(degrees, resample=Image.BILINEAR)
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return rotated.crop((round(left), round(top), round(left + crop_w), round(top + crop_h)))


VIEWS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "id": lambda image: image,
    "flip": lambda image: image.transpose(Image.FLIP_LEFT_RIGHT),
    "rot+10": lambda image: _rotate_and_crop(image, 10),
    "rot-10": lambda image: _rotate_and_crop(image, -10),
    "rot+20": lambda image: _rotate_and_crop(image, 20),
    "rot-20": lambda image: _rotate_and_crop(image, -20),
}


def crop_view(side: float, left: float, top: float) -> str:
    """The name of a square crop view: side ``side`` x the image's shorter side; ``left`` and ``top`` in
    [0, 1 - side] place it (on a square image, its corner is at ``left`` x width, ``top`` x height; on others
    the same fractions of the free range, so the crops of a grid reach every edge). The crop is resized
    back to the image's shorter side (zoomed in)."""
    return f"crop{side:g}@{left:g}:{top:g}"


def crop_grid(side: float, stride: float) -> list[str]:
    """Crop views of side ``side`` every ``stride`` (fractions of the shorter side) covering the image:
    (0.375, 0.125) gives 6 x 6 crops of 24 px every 8 px on 64 x 64 px."""
    if not (0 < side <= 1 and 0 < stride <= 1):
        raise ValueError(f"crop side and stride are fractions of the image in (0, 1], got {side}, {stride}")
    steps = int(round((1 - side) / stride + 1e-9))
    return [crop_view(side, x * stride, y * stride) for y in range(steps + 1) for x in range(steps + 1)]


def _crop_spec(spec: str) -> tuple[float, float, float]:
    try:
        side, corner = spec[len("crop"):].split("@")
        left, top = corner.split(":")
        return float(side), float(left), float(top)
    except ValueError:
        raise ValueError(f"bad crop view {spec!r}; build crop views with crop_view(side, left, top)") from None


def crop_box(view: str, width: int, height: int) -> tuple[int, int, int, int]:
    """The pixel box ``(left, top, right, bottom)`` a crop view (``crop_view``) cuts from a width x height image."""
    side, left, top = _crop_spec(view)
    pixels = max(1, round(side * min(width, height)))
    spread = 1 / (1 - side) if side < 1 else 0.0  # [0, 1 - side] -> [0, 1] of the free range
    x = min(round(left * spread * (width - pixels)), width - pixels)
    y = min(round(top * spread * (height - pixels)), height - pixels)
    return x, y, x + pixels, y + pixels


def fraction_box(box: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """A pixel box (a crop's, a face's) as fractions of an image of ``size`` = (width, height), clipped to the image
    (face detectors may reach past its edges): what ``Detection.box`` holds."""
    width, height = size
    left, top, right, bottom = box
    return (min(max(left / width, 0.0), 1.0), min(max(top / height, 0.0), 1.0),
            min(max(right / width, 0.0), 1.0), min(max(bottom / height, 0.0), 1.0))


def _crop(spec: str) -> Callable[[Image.Image], Image.Image]:
    _crop_spec(spec)  # a bad name fails here, before any image is touched

    def crop(image: Image.Image) -> Image.Image:
        side = min(image.size)
        return image.crop(crop_box(spec, *image.size)).resize((side, side), Image.BICUBIC)

    return crop


def _view_steps(view: str) -> list[Callable[[Image.Image], Image.Image]]:
    steps = []
    for part in view.split(","):
        if part in VIEWS:
            steps.append(VIEWS[part])
        elif part.startswith("crop") and "@" in part:
            steps.append(_crop(part))
        else:
            raise ValueError(f"unknown augmentation view {part!r} in {view!r}; choose from {list(VIEWS)}, "
                             "crop views (crop_view) and comma-joined compositions of them")
    return steps


def apply_view(image: Image.Image, view: str) -> Image.Image:
    """Apply a view: a name in VIEWS, a crop view (``crop_view``) or several joined by commas, applied in
    order ("flip,rot+20", "crop0.5@0.25:0.25,flip")."""
    for step in _view_steps(view):
        image = step(image)
    return image


def check_views(views: Sequence[str]) -> None:
    """Raise ValueError on the first view ``apply_view`` cannot apply."""
    for view in views:
        _view_steps(view)


def image_digest(image: Image.Image) -> str:
    """A content hash of the decoded pixels (same photo -> same key, whatever its file name)."""
    digest = hashlib.sha1()  # a cache key, not a security check; ~2x faster than blake2b here
    digest.update(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class CachedFeatures:
    """Caches an extractor's features per (image content, view), so refits never re-run the encoder.

    Share one instance between heads to encode shared negatives once.
    """

    def __init__(self, extractor: Any, max_items: int = 16384, chunk_size: int = 64):
        self.extractor = as_feature_extractor(extractor)  # the wrapped encoder
        self.max_items = max_items  # LRU bound on cached vectors
        self.chunk_size = chunk_size  # views encoded per extractor call (bounds memory)
        self._cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()

    @property
    def name(self) -> str:
        return self.extractor.name

    def describe(self) -> dict[str, Any]:
        return self.extractor.describe()

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.encode_views(images, ("id",))[:, 0]

    def encode_views(self, images: Sequence[Image.Image], views: Sequence[str]) -> torch.Tensor:
        """Features of every view of every image, ``(B, V, D)``; only unseen pairs are encoded."""
        check_views(views)
        keys = [[(image_digest(image), view) for view in views] for image in images]
        todo: dict[tuple[str, str], tuple[Image.Image, str]] = {}
        for image, row in zip(images, keys):
            for key in row:
                if key not in self._cache:
                    todo[key] = (image, key[1])
        pending = list(todo.items())
        chunks = range(0, len(pending), self.chunk_size)
        for start in tqdm(chunks, desc=f"encoding {self.name}", unit="chunk", disable=len(chunks) < 4):
            chunk = pending[start : start + self.chunk_size]
            encoded = self.extractor([apply_view(image, view) for _, (image, view) in chunk]).float()  # (m, D)
            for (key, _), vector in zip(chunk, encoded):
                self._cache[key] = vector
        out = torch.stack([torch.stack([self._cache[key] for key in row]) for row in keys])
        for row in keys:
            for key in row:
                self._cache.move_to_end(key)
        while len(self._cache) > self.max_items:
            self._cache.popitem(last=False)
        return out


_SHARED: dict[str, CachedFeatures] = {}


def shared_features(spec: dict[str, Any], **runtime: Any) -> CachedFeatures:
    """The process-wide ``CachedFeatures`` for ``spec`` (+ ``runtime``), built on first use.

    Heads rebuilt from the same spec share one encoder and one feature cache: a library of 20
    DFN5B probes loads the model once and encodes each image once, not 20 times.
    """
    key = json.dumps({"spec": spec, "runtime": runtime}, sort_keys=True, default=str)
    if key not in _SHARED:
        logger.info("building feature extractor %s", spec)
        _SHARED[key] = CachedFeatures(build_feature_extractor(spec, **runtime))
    return _SHARED[key]


def ensure_rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    """Upright RGB copies of images that are not already (grayscale, CMYK, EXIF-rotated, alpha...)."""
    from myvlm.images import load_image

    if isinstance(images, Image.Image):
        raise TypeError("expected a list of images, got a single PIL image; wrap it in a list")
    out = []
    for image in images:
        if not isinstance(image, Image.Image):
            kind = type(image).__name__
            raise TypeError(f"expected PIL images, got {kind}; load files with myvlm.images.load_images")
        upright = image.mode == "RGB" and image.getexif().get(0x0112, 1) == 1
        out.append(image if upright else load_image(image))
    return out


def image_label(image: Image.Image, index: int, role: str = "image") -> str:
    """A name for error messages: the source file when known, else ``"<role> #<index>"``."""
    source = image.info.get("source") or getattr(image, "filename", "")
    return f"{Path(source).name} ({role} #{index})" if source else f"{role} #{index}"
