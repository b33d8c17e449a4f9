"""The object head: a linear probe on frozen image features (CLIP in the paper).

    from myvlm.heads import build_head
    from myvlm.heads.negatives import collect_negatives
    head = build_head("clip_probe")  # DFN5B-CLIP-ViT-H-14 features; or feature_extractor=any callable
    head.fit(my_mug_photos, collect_negatives("data/not_my_mug"))
    head.detect(images)  # probability of the concept, fired when >= head.threshold (0.5)

Training: every positive is encoded in a few flipped/rotated views and every negative in two,
once (features are cached by image content), then one linear layer on L2-normalised features
is trained with balanced batches, AdamW and a cosine schedule. The steps run on cached
features, so a refit takes well under a second after the encoder pass.

Small concepts (``crops``): the probe then scores zoomed-in square crops of the image too and fires
on the best one, so that one object among others is judged on its own pixels rather than through
the whole image's embedding. Which crop of a training photo shows the concept is not given: it
starts as the crop most like some crop of every other positive and least like the negatives, and is
then re-picked by the probe itself for ``mil_rounds`` refits (multiple-instance learning). Every
crop of every negative is a negative.

    head = build_head("clip_probe", crops=[[0.375, 0.125], [0.5, 0.25]])  # 36 + 9 crops and the image
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image

from myvlm.heads.base import ConceptHead, Detection, register_head
from myvlm.heads.features import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_CLIP_PRETRAINED,
    CachedFeatures,
    crop_box,
    crop_grid,
    ensure_rgb,
    fraction_box,
    shared_features,
)
from myvlm.heads.negatives import MIN_REAL_NEGATIVES, count_real, generic_negatives

logger = logging.getLogger(__name__)

DEFAULT_EXTRACTOR = {"type": "open_clip", "model": DEFAULT_CLIP_MODEL, "pretrained": DEFAULT_CLIP_PRETRAINED}


@dataclass
class ProbeTraining:
    """How a probe is fitted; saved in the concept JSON."""

    steps: int = 500  # AdamW steps on cached features
    lr: float = 1e-3  # peak learning rate (cosine decay to 0)
    weight_decay: float = 1e-2  # AdamW weight decay
    batch_size: int = 32  # per step: half positives, half negatives (sampled with replacement)
    positive_views: tuple[str, ...] = ("id", "flip", "rot+10", "rot-10", "flip,rot+20", "flip,rot-20")  # augmentations
    negative_views: tuple[str, ...] = ("id", "flip")  # views of each negative
    # L2-normalised features are multiplied by this. Chosen by `bench_heads.py --validate` (training-side
    # data only): 1 -> 98% recall / 0.3% FPR, 4 -> 93% / 0.1%, sqrt(D)=32 -> 92% / 0.1% (MobileNet features).
    feature_scale: float = 1.0
    mil_rounds: int = 2  # with crops: refits that re-pick each positive's best-scoring crop
    seed: int = 0  # sampling and initialisation seed: same data + seed -> same probe

    @classmethod
    def from_dict(cls, values: Optional[dict[str, Any]]) -> "ProbeTraining":
        values = dict(values or {})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            known = sorted(cls.__dataclass_fields__)
            raise ValueError(f"unknown probe training options {sorted(unknown)}; known: {known}")
        for key in ("positive_views", "negative_views"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


@dataclass
class FitReport:
    """What ``fit`` saw; kept on the head (``head.fit_report``) and in its config."""

    n_positives: int = 0  # positive photos
    n_negatives: int = 0  # negative photos (generic drawn images included)
    train_loss: float = float("nan")  # mean BCE of the last 50 steps
    min_positive_score: float = float("nan")  # lowest training-positive score (the head's, as in detect)
    max_negative_score: float = float("nan")  # highest training-negative score
    regions: list[str] = field(default_factory=list)  # with crops: the view of each positive the probe learned
    notes: list[str] = field(default_factory=list)  # warnings raised while fitting


@register_head("clip_probe")
class ClipProbeHead(ConceptHead):
    """Linear probe ``sigmoid(w . f/|f| + b)`` on frozen image features; fires when >= threshold."""

    higher_is_present = True
    needs_negatives = True  # fit() without negatives falls back to the generic drawn set (and warns)

    def __init__(
        self,
        feature_extractor: Union[None, dict[str, Any], Any] = None,  # callable, spec dict, or None (DFN5B CLIP)
        threshold: float = 0.5,  # probability above which the concept is present
        training: Union[None, ProbeTraining, dict[str, Any]] = None,  # fitting hyperparameters
        device: Union[str, torch.device, None] = None,  # for building the extractor from a spec
        dtype: Optional[torch.dtype] = None,  # idem
        crops: Sequence[Sequence[float]] = (),  # (side, stride) grids of zoomed-in crops, fractions of the image
    ):
        super().__init__(threshold)
        self.training = training if isinstance(training, ProbeTraining) else ProbeTraining.from_dict(training)
        self.crops = tuple((float(side), float(stride)) for side, stride in crops)
        self.regions = ["id"] + [view for side, stride in self.crops for view in crop_grid(side, stride)]
        self._runtime = {k: v for k, v in {"device": device, "dtype": dtype}.items() if v is not None}
        self._extractor: Optional[CachedFeatures] = None
        self._spec: dict[str, Any] = DEFAULT_EXTRACTOR
        if isinstance(feature_extractor, dict):
            self._spec = dict(feature_extractor)
        elif feature_extractor is not None:
            self.feature_extractor = feature_extractor
        self.linear: Optional[torch.nn.Linear] = None
        self.positive_centroid: Optional[torch.Tensor] = None  # (D,) mean normalised positive feature
        self.fit_report = FitReport()

    @property
    def feature_extractor(self) -> CachedFeatures:
        if self._extractor is None:  # shared with every head built from the same spec
            self._extractor = shared_features(self._spec, **self._runtime)
        return self._extractor

    @feature_extractor.setter
    def feature_extractor(self, extractor: Any) -> None:
        self._extractor = extractor if isinstance(extractor, CachedFeatures) else CachedFeatures(extractor)
        self._spec = self._extractor.describe()

    # --- fitting ------------------------------------------------------------------------------

    def fit(self, positives: Sequence[Image.Image], negatives: Sequence[Image.Image] = ()) -> None:
        if len(positives) == 0:
            raise ValueError("a clip_probe head needs at least one positive photo of the concept")
        notes = []
        if len(negatives) == 0:
            negatives = generic_negatives()
        real = count_real(negatives)
        if real < MIN_REAL_NEGATIVES:
            notes.append(
                f"only {real} real negative photos (drawn ones do not count): expect false positives on real photos "
                f"(benchmark: 75% with drawn negatives only, 7% with ~20 photos, <1% with ~50); pass a negatives "
                f"folder of at least {MIN_REAL_NEGATIVES} photos of other things (same class is best) or keep "
                "other concepts in the library"
            )
            logger.warning(notes[-1])
        cfg = self.training
        positives, negatives = ensure_rgb(positives), ensure_rgb(negatives)
        neg = self._encode(negatives, cfg.negative_views)  # (N*Vn, D)
        if len(self.regions) > 1:
            neg = torch.cat([neg, self._encode(negatives, self.regions[1:])])  # + every crop of every negative
            regions, pos, loss = self._fit_regions(positives, neg)
        else:
            regions, pos = [], self._encode(positives, cfg.positive_views)  # (P*Vp, D)
            self.linear, loss = _train_linear(pos, neg, cfg)
        self.positive_centroid = F.normalize(pos.mean(0), dim=0)  # (D,)
        self.fit_report = self._report(positives, negatives, loss, regions, notes)

    def _fit_regions(self, positives: list[Image.Image], neg: torch.Tensor) -> tuple[list[str], torch.Tensor, float]:
        """Multiple-instance fit: each positive photo is a bag of regions (the image and its crops), one of
        which shows the concept. Returns the regions picked last, the positive features and the loss."""
        cfg = self.training
        bags = self._normalise(self.feature_extractor.encode_views(positives, self.regions))  # (P, R, D)
        picks = _common_regions(bags, neg)  # (P,)
        for round_ in range(cfg.mil_rounds + 1):
            regions = [self.regions[i] for i in picks.tolist()]
            pos = torch.cat([  # every positive view of each picked region
                self._encode([image], [region if view == "id" else f"{region},{view}" for view in cfg.positive_views])
                for image, region in zip(positives, regions)
            ])  # (P*Vp, D)
            self.linear, loss = _train_linear(pos, neg, cfg)
            repicked = self.linear(bags).squeeze(-1).argmax(1)  # (P,)
            if round_ == cfg.mil_rounds or torch.equal(repicked, picks):
                break
            picks = repicked
        logger.info("clip_probe regions of the positives: %s", regions)
        return regions, pos, loss

    def _encode(self, images: list[Image.Image], views: Sequence[str]) -> torch.Tensor:
        features = self.feature_extractor.encode_views(images, views)  # (B, V, D)
        return self._normalise(features.flatten(0, 1))

    def _normalise(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=-1) * self.training.feature_scale

    def _report(self, positives, negatives, loss, regions, notes) -> FitReport:
        pos_scores, neg_scores = self.score(positives), self.score(negatives)
        report = FitReport(len(positives), len(negatives), loss, float(pos_scores.min()), float(neg_scores.max()),
                           regions, notes)
        if report.min_positive_score < self.threshold:
            report.notes.append(
                f"a training positive scores {report.min_positive_score:.2f} < threshold {self.threshold}: the "
                "probe could not separate it; check that every positive shows the concept"
            )
            logger.warning(report.notes[-1])
        logger.info("fitted clip_probe on %d positives / %d negatives, loss %.4f", len(positives), len(negatives), loss)
        return report

    # --- inference ----------------------------------------------------------------------------

    @torch.no_grad()
    def region_scores(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(B, R): the probability of the concept in each region of ``self.regions`` (the image, then its crops)."""
        if self.linear is None:
            raise RuntimeError("this clip_probe head is not fitted; call fit(positives, negatives) first")
        if len(images) == 0:
            return torch.zeros(0, len(self.regions))
        features = self._normalise(self.feature_extractor.encode_views(ensure_rgb(images), self.regions))  # (B, R, D)
        if features.shape[-1] != self.linear.in_features:
            raise ValueError(
                f"the feature extractor gives {features.shape[-1]}-d features but this head was trained on "
                f"{self.linear.in_features}-d features ({self._spec}); load it with the extractor it was trained with"
            )
        return torch.sigmoid(self.linear(features)).squeeze(-1)

    def score(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.region_scores(images).amax(1)  # (B,): the best region's probability

    def detect(self, images: Sequence[Image.Image]) -> list[Detection]:
        """As ``ConceptHead.detect``, and with crops each detection's ``box``: the best crop, where the concept was
        found (None when the whole image scored best)."""
        if len(self.regions) < 2:
            return super().detect(images)
        images = ensure_rgb(images)
        regions = self.region_scores(images)
        scores, best = regions.amax(1), regions.argmax(1)
        detections = []
        for image, score, index in zip(images, scores.tolist(), best.tolist()):
            box = None
            if self.regions[index] != "id":
                box = fraction_box(crop_box(self.regions[index], *image.size), image.size)
            detections.append(Detection(score, self.threshold, score >= self.threshold, box))
        return detections

    # --- saving -------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        if self.linear is None:
            raise RuntimeError("cannot save an unfitted clip_probe head; call fit first")
        training = asdict(self.training)
        for key in ("positive_views", "negative_views"):
            training[key] = list(training[key])
        return {
            "type": self.head_type,
            "threshold": self.threshold,
            "crops": [list(grid) for grid in self.crops],
            "feature_dim": self.linear.in_features,
            "extractor": self._spec,
            "training": training,
            "fit": asdict(self.fit_report),
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.linear is None:
            raise RuntimeError("cannot save an unfitted clip_probe head; call fit first")
        return {
            "weight": self.linear.weight.detach().clone(),  # (1, D)
            "bias": self.linear.bias.detach().clone(),  # (1,)
            "positive_centroid": self.positive_centroid.clone(),  # (D,)
        }

    @classmethod
    def from_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], **runtime: Any) -> "ClipProbeHead":
        """``runtime``: ``feature_extractor`` (else rebuilt from ``config["extractor"]``), ``device``, ``dtype``."""
        extractor = runtime.get("feature_extractor")
        extractor = config["extractor"] if extractor is None else extractor
        head = cls(extractor, config["threshold"], config.get("training"), runtime.get("device"), runtime.get("dtype"),
                   config.get("crops", ()))
        if not isinstance(extractor, dict) and head._spec != config["extractor"]:
            logger.warning("loading a probe trained on %s with extractor %s", config["extractor"], head._spec)
        weight = tensors["weight"].float()
        head.linear = torch.nn.Linear(weight.shape[1], 1)
        with torch.no_grad():
            head.linear.weight.copy_(weight)
            head.linear.bias.copy_(tensors["bias"].float())
        head.positive_centroid = tensors.get("positive_centroid")
        head.fit_report = FitReport(**config.get("fit", {}))
        return head


def _common_regions(bags: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """For each positive photo (``bags``: (P, R, D) normalised region features), the index of the region
    most like some region of every other positive photo, minus its likeness to the closest negatives:
    the object the photos share, not the background they happen to share with other scenes."""
    best_match = torch.einsum("ikd,jld->ikjl", bags, bags).amax(-1)  # (P, R, P): region k of i vs photo j
    others = 1 - torch.eye(len(bags))  # (P, P)
    shared = (best_match * others[:, None]).sum(-1) / others.sum(-1).clamp(min=1)[:, None]  # (P, R)
    closest = torch.einsum("ikd,nd->ikn", bags, negatives).topk(min(5, len(negatives)), dim=-1).values.mean(-1)
    return (shared - closest).argmax(1)


def _train_linear(pos: torch.Tensor, neg: torch.Tensor, cfg: ProbeTraining) -> tuple[torch.nn.Linear, float]:
    """Balanced-batch logistic regression on (already normalised) features."""
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    linear = torch.nn.Linear(pos.shape[1], 1)
    optimizer = torch.optim.AdamW(linear.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.steps)
    half = max(1, cfg.batch_size // 2)
    labels = torch.cat([torch.ones(half), torch.zeros(half)])  # (2*half,)
    losses = []
    for _ in range(cfg.steps):
        batch = torch.cat([
            pos[torch.randint(len(pos), (half,), generator=generator)],
            neg[torch.randint(len(neg), (half,), generator=generator)],
        ])  # (2*half, D)
        loss = F.binary_cross_entropy_with_logits(linear(batch).squeeze(-1), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return linear.requires_grad_(False), float(sum(losses[-50:]) / len(losses[-50:]))
