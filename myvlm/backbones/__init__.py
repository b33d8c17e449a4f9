"""Backbones: frozen Hugging Face VLMs wrapped for personalization. Importing registers them."""

from myvlm.backbones.base import (
    Backbone,
    BackboneNotFoundError,
    available_backbones,
    load_backbone,
    register_backbone,
)
from myvlm.backbones import blip2  # noqa: F401  (registers "blip2")

__all__ = ["Backbone", "BackboneNotFoundError", "available_backbones", "load_backbone", "register_backbone"]
