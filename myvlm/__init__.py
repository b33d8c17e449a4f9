"""myvlm: personalize frozen vision-language models (MyVLM, Alaluf et al., ECCV 2024).

    import myvlm
    concept = myvlm.personalize("photos/my_dog", name="my_dog", class_word="dog")
    vlm = myvlm.MyVLM(myvlm.load_backbone("Salesforce/blip2-opt-2.7b"), [concept])
    print(vlm.caption(["beach.jpg"])[0].text)
"""

__version__ = "0.1.0"

from myvlm.api import personalize
from myvlm.backbones import Backbone, BackboneNotFoundError, load_backbone
from myvlm.concept import Concept, ConceptError, load_concept, load_library
from myvlm.config import AugmentConfig, BackboneConfig, TrainConfig
from myvlm.model import CaptionResult, MyVLM

__all__ = [
    "AugmentConfig", "Backbone", "BackboneConfig", "BackboneNotFoundError", "CaptionResult", "Concept",
    "ConceptError", "MyVLM", "TrainConfig", "load_backbone", "load_concept", "load_library", "personalize",
]
