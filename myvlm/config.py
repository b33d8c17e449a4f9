"""Configuration dataclasses: the schema of every knob in myvlm.

The library takes these dataclasses (or keywords); Hydra only composes them from YAML
at the command-line edge (``configs/`` and ``myvlm.cli``). Defaults follow the MyVLM
paper and its reference code for BLIP-2.

    from myvlm.config import BackboneConfig, TrainConfig
    TrainConfig(steps=50, reg_lambda=0.0)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

# A concept folder: its files and the format tag of its JSON (myvlm.concept writes them; the CLI finds and
# checks concepts by them without importing torch)
CONCEPT_FILE, EMBEDDING_FILE, HEAD_FILE = "concept.json", "embedding.safetensors", "head.safetensors"
CONCEPT_FORMAT = "myvlm.concept"


@dataclass
class BackboneConfig:
    name_or_path: str = "Salesforce/blip2-opt-2.7b"  # hub id or local folder of a saved checkpoint
    type: Optional[str] = None  # backbone registry key ("blip2", ...); None = infer from the checkpoint's config
    revision: Optional[str] = None  # hub revision (branch, tag or commit); recorded in concept files
    device: Optional[str] = None  # "cpu", "cuda", "cuda:1", ...; None = cuda when available, else cpu
    dtype: Optional[str] = None  # "float32", "bfloat16", "float16"; None = bfloat16 on GPU, float32 on CPU
    injection: Optional[str] = None  # where the concept token joins the visual features; None = backbone default
    max_new_tokens: int = 30  # caption / answer length limit for generation
    local_files_only: Optional[bool] = None  # None = follow HF_HUB_OFFLINE


@dataclass
class AugmentConfig:
    hflip_p: float = 0.5  # probability of a horizontal flip
    brightness: float = 0.6  # ColorJitter brightness factor range [1-b, 1+b]
    rotation_degrees: float = 45.0  # random rotation in [-d, d] degrees
    enabled: bool = True  # False = the training images are used as they are (ablation)


INITS = ("random", "look", "anchor")  # how a concept vector starts (TrainConfig.init)


@dataclass
class TrainConfig:
    steps: int = 100  # optimisation steps
    batch_size: int = 4  # images per step (sampled without replacement, cycling through the photos)
    lr: float = 1.0  # AdamW learning rate (constant), as in the reference code
    weight_decay: float = 1e-4  # AdamW weight decay
    grad_clip: float = 0.05  # max grad norm, per concept vector
    reg_lambda: float = 0.04  # weight of the attention regularizer lambda * mean(p^2)
    reg_form: Optional[str] = None  # attention it penalises: None = backbone default; "to_concept" (paper),
    # "from_concept" (the concept token's own attention row: LLaVA's default, as the reference code)
    checkpoint_every: int = 25  # save the concept vector every N steps (0 = never); needs an output folder
    seed: int = 0  # seeds caption sampling, augmentation and the initial vector
    init_std: float = 1.0  # std of the random initial concept vector (it is norm-matched anyway)
    init: str = "random"  # personalize: "random", or "look": the mean image token over where the head found the concept
    # in each photo (myvlm.look; with a small lr, e.g. 0.01, so that the vector stays near that look), or "anchor":
    # that look fixed as the concept's anchor and a random vector learned beside it (ConceptBank anchors)
    route: float = 0.0  # query routing strength (BLIP-2; 0 = off, the paper's): the concept token is read mostly by the
    # Q-Former queries that look where the concept is, found by its look (myvlm.injection.Route); kept with the concept
    route_temperature: float = 0.02  # softmax temperature of that likeness over the image tokens
    prefetch: bool = True  # prepare the next batch on a background thread while the current step runs
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"unknown training init {self.init!r}; known: {list(INITS)}")
        self.route, self.route_temperature = float(self.route), float(self.route_temperature)  # YAML may give ints
        if self.route < 0 or self.route_temperature <= 0:
            raise ValueError(f"route must be >= 0 and route_temperature > 0, "
                             f"got {self.route}, {self.route_temperature}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        values = dict(values)
        augment = AugmentConfig(**values.pop("augment", {}))
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(augment=augment, **values)
