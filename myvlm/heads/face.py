"""The person head: detect faces, embed them, and match them to a person's reference faces.

    from myvlm.heads import build_head
    head = build_head("face")          # dlib backend: MTCNN boxes + dlib ResNet, Euclidean < 0.6
    head.fit(photos_of_anna)           # references: one face per photo (group photos are cleaned up)
    head.detect(images)                # score = distance of the closest face; fired when <= threshold

Scores are distances (``higher_is_present = False``): the smallest distance between any face in
the image and any reference face, ``inf`` when the image has no face. Backends are pluggable
(``register_face_backend``); ``dlib`` (weights from the ``face_recognition_models`` package,
offline) and ``facenet`` (InceptionResnetV1 ``vggface2``, downloaded by facenet-pytorch) ship.
Several people in one image: see ``myvlm.heads.detect.match_faces``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import torch
from PIL import Image

from myvlm.heads.base import ConceptHead, Detection, register_head
from myvlm.heads.features import ensure_rgb, fraction_box, image_digest, image_label

logger = logging.getLogger(__name__)

_FACE_BACKENDS: dict[str, type["FaceBackend"]] = {}
_SHARED: dict[tuple, "FaceBackend"] = {}


@dataclass(frozen=True)
class Face:
    """One detected face."""

    box: tuple[float, float, float, float]  # (left, top, right, bottom) in image pixels
    probability: float  # detector confidence
    embedding: torch.Tensor  # (E,) identity embedding


def register_face_backend(name: str) -> Callable[[type["FaceBackend"]], type["FaceBackend"]]:
    def wrap(cls: type[FaceBackend]) -> type[FaceBackend]:
        if name in _FACE_BACKENDS and _FACE_BACKENDS[name] is not cls:
            raise ValueError(f"a face backend named {name!r} is already registered")
        cls.name = name
        _FACE_BACKENDS[name] = cls
        return cls

    return wrap


def get_face_backend(name: str, **options: Any) -> "FaceBackend":
    """A shared backend instance per (name, options): models load once, faces are cached per image."""
    if name not in _FACE_BACKENDS:
        raise ValueError(f"unknown face backend {name!r}; available: {sorted(_FACE_BACKENDS)}")
    key = (name, tuple(sorted((k, repr(v)) for k, v in options.items())))
    if key not in _SHARED:
        _SHARED[key] = _FACE_BACKENDS[name](**options)
    return _SHARED[key]


class FaceBackend:
    """Finds faces and embeds them. Subclasses implement ``_find_faces``; results are cached per image."""

    name: ClassVar[str]
    metric: ClassVar[str]  # "euclidean" or "cosine"
    default_threshold: ClassVar[float]  # distance at or below which two faces are the same person

    def __init__(self, max_side: int = 1600, cache_size: int = 512):
        self.max_side = max_side  # larger images are downscaled before detection
        self.cache_size = cache_size  # images whose faces are remembered (LRU)
        self._cache: OrderedDict[str, list[Face]] = OrderedDict()

    def options(self) -> dict[str, Any]:
        """Constructor options, saved in the head config."""
        return {}

    def faces(self, image: Image.Image) -> list[Face]:
        key = image_digest(image)
        if key not in self._cache:
            scale = min(1.0, self.max_side / max(image.size))
            small = image.resize((round(image.width * scale), round(image.height * scale))) if scale < 1 else image
            found = self._find_faces(small)
            self._cache[key] = [
                Face(tuple(c / scale for c in face.box), face.probability, face.embedding) for face in found
            ]
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def _find_faces(self, image: Image.Image) -> list[Face]:
        raise NotImplementedError

    def distances(self, embeddings: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """(F, E) x (R, E) -> (F, R) distances in this backend's metric."""
        if self.metric == "cosine":
            normalize = torch.nn.functional.normalize
            return 1 - normalize(embeddings, dim=-1) @ normalize(references, dim=-1).T
        return torch.cdist(embeddings.double(), references.double()).float()


class _Mtcnn:
    """facenet-pytorch MTCNN (its real weights ship in the wheel), keeping confident faces only."""

    def __init__(self, device: Any, min_probability: float, min_face_size: int):
        from facenet_pytorch import MTCNN

        self.model = MTCNN(keep_all=True, min_face_size=min_face_size, device=torch.device(device or "cpu"))
        self.min_probability = min_probability

    def boxes(self, image: Image.Image) -> list[tuple[tuple[float, ...], float]]:
        boxes, probs = self.model.detect(image)
        if boxes is None:
            return []
        keep = [(b, float(p)) for b, p in zip(boxes, probs) if float(p) >= self.min_probability]
        return [(tuple(float(v) for v in box), probability) for box, probability in keep]


def _face_models_dir() -> str:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the dlib face backend needs its weights: pip install dlib-bin face_recognition_models")
    return str(Path(list(spec.submodule_search_locations)[0]) / "models")


@register_face_backend("dlib")
class DlibFaceBackend(FaceBackend):
    """dlib's ResNet face embedder (128-d, Euclidean distance, same person below 0.6)."""

    metric = "euclidean"
    default_threshold = 0.6

    def __init__(
        self,
        detector: str = "mtcnn",  # "mtcnn" (facenet-pytorch) or "hog" (dlib's frontal face detector)
        min_probability: float = 0.9,  # MTCNN confidence below which a box is not a face
        min_face_size: int = 20,  # smallest face side in pixels that MTCNN looks for
        device: Any = None,  # MTCNN device; None = CPU (dlib itself runs on the CPU)
        **base: Any,
    ):
        super().__init__(**base)
        try:
            import dlib
        except ImportError as error:
            raise ImportError(
                "the dlib face backend needs dlib: pip install dlib-bin face_recognition_models"
            ) from error
        models = _face_models_dir()
        self.detector, self.min_probability, self.min_face_size = detector, min_probability, min_face_size
        self._dlib = dlib
        self.shape_predictor = dlib.shape_predictor(f"{models}/shape_predictor_5_face_landmarks.dat")
        self.embedder = dlib.face_recognition_model_v1(f"{models}/dlib_face_recognition_resnet_model_v1.dat")
        if detector == "mtcnn":
            self._mtcnn = _Mtcnn(device, min_probability, min_face_size)
        elif detector == "hog":
            self._hog = dlib.get_frontal_face_detector()
        else:
            raise ValueError(f"unknown face detector {detector!r}; use 'mtcnn' or 'hog'")

    def options(self) -> dict[str, Any]:
        return {"detector": self.detector, "min_probability": self.min_probability, "min_face_size": self.min_face_size}

    def _find_faces(self, image: Image.Image) -> list[Face]:
        import numpy as np

        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        if self.detector == "mtcnn":
            found = self._mtcnn.boxes(image)
        else:
            found = [((r.left(), r.top(), r.right(), r.bottom()), 1.0) for r in self._hog(pixels, 1)]
        faces = []
        for box, probability in found:
            rect = self._dlib.rectangle(*(int(round(v)) for v in box))
            shape = self.shape_predictor(pixels, rect)
            embedding = torch.tensor(list(self.embedder.compute_face_descriptor(pixels, shape)), dtype=torch.float32)
            faces.append(Face(box, probability, embedding))
        return faces


@register_face_backend("facenet")
class FacenetFaceBackend(FaceBackend):
    """facenet-pytorch: MTCNN-aligned 160 px crops -> InceptionResnetV1 (512-d, cosine distance)."""

    metric = "cosine"
    default_threshold = 0.6  # not measured here (no weights offline); FaceNet's LFW point is ~1.1 L2 = 0.6 cosine

    def __init__(
        self,
        weights: Optional[str] = "vggface2",  # "vggface2", "casia-webface", a local .pt state dict, or None (random)
        min_probability: float = 0.9,  # MTCNN confidence below which a box is not a face
        min_face_size: int = 20,  # smallest face side in pixels that MTCNN looks for
        device: Any = None,  # where MTCNN and the embedder run; None = CPU
        **base: Any,
    ):
        super().__init__(**base)
        self.weights, self.min_probability, self.min_face_size = weights, min_probability, min_face_size
        self.device = torch.device(device or "cpu")
        self._mtcnn = _Mtcnn(device, min_probability, min_face_size)
        self.model = self._load_embedder(weights).to(self.device).eval()

    @staticmethod
    def _load_embedder(weights: Optional[str]) -> torch.nn.Module:
        from facenet_pytorch import InceptionResnetV1

        if weights in ("vggface2", "casia-webface"):
            try:
                return InceptionResnetV1(pretrained=weights)
            except OSError as error:  # urllib's URLError is an OSError
                from facenet_pytorch.models.inception_resnet_v1 import get_torch_home

                raise RuntimeError(
                    f"could not download facenet InceptionResnetV1 {weights!r} weights ({error}). Offline, copy the "
                    f"checkpoint into {get_torch_home()}/checkpoints/, pass weights='/path/to/state_dict.pt', or use "
                    "the dlib backend (FaceHead(backend='dlib'), weights from pip install face_recognition_models)"
                ) from error
        model = InceptionResnetV1(pretrained=None)
        if weights is None:
            logger.warning("facenet embedder with random weights: face matching will be meaningless")
        else:
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model

    def options(self) -> dict[str, Any]:
        return {"weights": self.weights, "min_probability": self.min_probability, "min_face_size": self.min_face_size}

    @torch.no_grad()
    def _find_faces(self, image: Image.Image) -> list[Face]:
        import numpy as np

        found = self._mtcnn.boxes(image)
        if not found:
            return []
        crops = self._mtcnn.model.extract(image, np.array([box for box, _ in found]), None)  # (F, 3, 160, 160)
        embeddings = self.model(crops.to(self.device)).float().cpu()  # (F, 512)
        return [Face(box, p, e) for (box, p), e in zip(found, embeddings)]


@register_head("face")
class FaceHead(ConceptHead):
    """A person: reference face embeddings; fires when some face in the image is close enough."""

    higher_is_present = False
    needs_negatives = False

    def __init__(
        self,
        backend: Union[str, FaceBackend] = "dlib",  # registered backend name, or a backend instance
        threshold: Optional[float] = None,  # max distance for a match; None = the backend's default
        backend_options: Optional[dict[str, Any]] = None,  # options for building the backend by name
        strict: bool = True,  # ambiguous training photos raise (True) or are skipped with a warning
        device: Any = None,  # backend device when built by name; None = CPU
    ):
        options = dict(backend_options or {})
        if device is not None:
            options["device"] = device
        self.backend = backend if isinstance(backend, FaceBackend) else get_face_backend(backend, **options)
        super().__init__(self.backend.default_threshold if threshold is None else threshold)
        self.strict = strict
        self.references: Optional[torch.Tensor] = None  # (R, E) one embedding per kept training photo
        self.kept: list[str] = []  # the training photos whose face became a reference

    # --- fitting ------------------------------------------------------------------------------

    def fit(self, positives: Sequence[Image.Image], negatives: Sequence[Image.Image] = ()) -> None:
        """Negatives are not needed (the threshold is the backend's); they are ignored."""
        if len(positives) == 0:
            raise ValueError("a face head needs at least one photo of the person")
        images = ensure_rgb(positives)
        labels = [image_label(image, i, "photo") for i, image in enumerate(images)]
        faces = [self.backend.faces(image) for image in images]
        missing = [label for label, found in zip(labels, faces) if not found]
        problems = [f"no face found in {label}; use photos where the face is visible" for label in missing]
        solo = [i for i, f in enumerate(faces) if len(f) == 1]
        if not solo:
            problems.append("none of the photos shows a single face: add at least one photo where the person is alone")
            raise ValueError("cannot fit the face head:\n  " + "\n  ".join(problems))
        solo, outliers = self._consistent(solo, faces, labels)
        problems += outliers
        kept = {i: faces[i][0].embedding for i in solo}
        references = torch.stack(list(kept.values()))
        for i, found in enumerate(faces):
            if len(found) > 1:
                kept_face, problem = self._pick_face(found, references, labels[i])
                if problem:
                    problems.append(problem)
                else:
                    kept[i] = kept_face
        self._report(problems)
        order = sorted(kept)
        self.references = torch.stack([kept[i] for i in order])
        self.kept = [labels[i] for i in order]
        logger.info("face head: %d reference faces from %d photos", len(order), len(images))

    def _consistent(self, solo: list[int], faces: list[list[Face]], labels: list[str]) -> tuple[list[int], list[str]]:
        """Drop single-face photos whose face matches none of the other single-face photos."""
        if len(solo) < 2:
            return solo, []
        embeddings = torch.stack([faces[i][0].embedding for i in solo])
        distances = self.backend.distances(embeddings, embeddings).fill_diagonal_(float("inf"))  # (S, S)
        matches = (distances <= self.threshold).sum(1)
        if int(matches.max()) == 0:
            names = ", ".join(labels[i] for i in solo)
            raise ValueError(f"the faces in {names} all differ (distance > {self.threshold}): are they one person?")
        keep = [i for i, m in zip(solo, matches.tolist()) if m > 0]
        problems = [
            f"{labels[i]}: its face matches none of the other photos (closest {float(d.min()):.3f} > "
            f"{self.threshold}); is it another person?"
            for i, m, d in zip(solo, matches.tolist(), distances) if m == 0
        ]
        return keep, problems

    def _pick_face(self, found: list[Face], references: torch.Tensor, label: str) -> tuple[Optional[torch.Tensor], str]:
        """In a photo with several faces, the one face that matches the solo photos."""
        distances = self.backend.distances(torch.stack([f.embedding for f in found]), references).min(1).values
        matching = (distances <= self.threshold).nonzero().flatten().tolist()
        if len(matching) == 1:
            return found[matching[0]].embedding, ""
        if not matching:
            return None, (f"{label}: none of its {len(found)} faces matches the photos where the person is alone "
                          "(only other people?); remove the photo or crop it to the person")
        return None, (f"{label}: {len(matching)} of its {len(found)} faces match the person; crop the photo to the "
                      "person or remove it")

    def _report(self, problems: list[str]) -> None:
        if not problems:
            return
        if self.strict:
            raise ValueError("cannot fit the face head:\n  " + "\n  ".join(problems) +
                             "\n(or pass strict=False to skip these photos)")
        for problem in problems:
            logger.warning("skipping a training photo: %s", problem)

    # --- inference ----------------------------------------------------------------------------

    def face_distances(self, image: Image.Image) -> tuple[list[Face], torch.Tensor]:
        """The faces of ``image`` and each one's distance to the closest reference, ``(F,)``."""
        if self.references is None:
            raise RuntimeError("this face head is not fitted; call fit(photos_of_the_person) first")
        faces = self.backend.faces(ensure_rgb([image])[0])
        if not faces:
            return faces, torch.zeros(0)
        return faces, self.backend.distances(torch.stack([f.embedding for f in faces]), self.references).min(1).values

    def score(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.tensor([d.score for d in self.detect(images)], dtype=torch.float32)  # (B,) closest face's distance

    def detect(self, images: Sequence[Image.Image]) -> list[Detection]:
        """As ``ConceptHead.detect``, each detection's ``box`` the closest face's (None where there is no face)."""
        detections = []
        for image in ensure_rgb(images):  # upright: the box is in the frame the photo is seen in
            faces, distances = self.face_distances(image)
            if not faces:
                detections.append(Detection(float("inf"), self.threshold, False))
                continue
            closest = int(distances.argmin())
            distance = float(distances[closest])
            detections.append(Detection(distance, self.threshold, distance <= self.threshold,
                                        fraction_box(faces[closest].box, image.size)))
        return detections

    # --- saving -------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        if self.references is None:
            raise RuntimeError("cannot save an unfitted face head; call fit first")
        return {
            "type": self.head_type,
            "threshold": self.threshold,
            "backend": self.backend.name,
            "backend_options": self.backend.options(),
            "metric": self.backend.metric,
            "embedding_dim": int(self.references.shape[1]),
            "reference_photos": self.kept,
            "strict": self.strict,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.references is None:
            raise RuntimeError("cannot save an unfitted face head; call fit first")
        return {"references": self.references.clone()}  # (R, E)

    @classmethod
    def from_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], **runtime: Any) -> "FaceHead":
        """``runtime``: ``face_backend`` (an instance; else built from the config) and ``device``."""
        backend = runtime.get("face_backend") or config["backend"]
        head = cls(backend, config["threshold"], config.get("backend_options"), config.get("strict", True),
                   runtime.get("device"))
        if head.backend.name != config["backend"]:
            raise ValueError(
                f"this face head was fitted with the {config['backend']!r} backend, not {head.backend.name!r}"
            )
        head.references = tensors["references"].float()
        head.kept = list(config.get("reference_photos", []))
        return head
