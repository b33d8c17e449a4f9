"""myvlm: personalize frozen vision-language models (MyVLM, Alaluf et al., ECCV 2024).

    import myvlm
    concept = myvlm.personalize("photos/my_dog", name="my_dog", class_word="dog")
    vlm = myvlm.MyVLM(myvlm.load_backbone("Salesforce/blip2-opt-2.7b"), [concept])
    print(vlm.caption(["beach.jpg"])[0].text)

The public names are imported on first use, so ``myvlm --help`` and ``myvlm concepts list``
do not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable

__version__ = "0.1.0"

_EXPORTS = {
    "personalize": "myvlm.api",
    "Backbone": "myvlm.backbones",
    "BackboneNotFoundError": "myvlm.backbones",
    "load_backbone": "myvlm.backbones",
    "Concept": "myvlm.concept",
    "ConceptError": "myvlm.concept",
    "load_concept": "myvlm.concept",
    "load_library": "myvlm.concept",
    "AugmentConfig": "myvlm.config",
    "BackboneConfig": "myvlm.config",
    "TrainConfig": "myvlm.config",
    "CaptionResult": "myvlm.model",
    "MyVLM": "myvlm.model",
}

__all__ = sorted(_EXPORTS)


def lazy_getattr(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) that imports ``exports[name]`` on first use of ``name``."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            setattr(sys.modules[package], name, value)  # later lookups skip this function
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
