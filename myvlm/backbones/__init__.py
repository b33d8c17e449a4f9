"""Backbones: frozen Hugging Face VLMs wrapped for personalization. Importing registers them."""

from myvlm.backbones.base import (
    Backbone,
    BackboneNotFoundError,
    available_backbones,
    load_backbone,
    register_backbone,
)
from myvlm.backbones import blip2  # noqa: F401  (registers "blip2")
from myvlm.backbones import llava  # noqa: F401  (registers "llava", "llava_next")

__all__ = ["Backbone", "BackboneNotFoundError", "available_backbones", "load_backbone", "register_backbone"]
