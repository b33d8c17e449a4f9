"""Concept heads and their registry. Importing this package registers the built-in heads."""

from myvlm.heads.base import (
    AlwaysOnHead,
    ConceptHead,
    Detection,
    available_heads,
    build_head,
    head_class,
    load_head,
    register_head,
)
from myvlm.heads.clip_probe import ClipProbeHead, ProbeTraining
from myvlm.heads.detect import active_concepts, detect_concepts, explain, match_faces
from myvlm.heads.face import FaceHead, get_face_backend, register_face_backend
from myvlm.heads.features import (
    CachedFeatures,
    FeatureExtractor,
    LiteRTFeatures,
    OpenClipFeatures,
    build_feature_extractor,
    register_extractor,
    tiny_clip_features,
)
from myvlm.heads.negatives import collect_negatives, generic_negatives

default_negatives = generic_negatives  # the drawn set used when a concept has no other negatives

__all__ = [
    "AlwaysOnHead",
    "CachedFeatures",
    "ClipProbeHead",
    "ConceptHead",
    "Detection",
    "FaceHead",
    "FeatureExtractor",
    "LiteRTFeatures",
    "OpenClipFeatures",
    "ProbeTraining",
    "active_concepts",
    "available_heads",
    "build_feature_extractor",
    "build_head",
    "collect_negatives",
    "default_negatives",
    "detect_concepts",
    "explain",
    "generic_negatives",
    "get_face_backend",
    "head_class",
    "load_head",
    "match_faces",
    "register_extractor",
    "register_face_backend",
    "register_head",
    "tiny_clip_features",
]
