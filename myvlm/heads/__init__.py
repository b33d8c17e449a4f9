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

__all__ = [
    "AlwaysOnHead",
    "ConceptHead",
    "Detection",
    "available_heads",
    "build_head",
    "head_class",
    "load_head",
    "register_head",
]
