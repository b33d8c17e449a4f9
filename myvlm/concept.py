"""Concepts: one learned vector plus the head that toggles it, saved as a self-describing folder.

    concept.save("concepts/my_dog")         # concept.json + embedding.safetensors + head.safetensors
    concept = load_concept("concepts/my_dog")
    library = load_library("concepts")       # every concept folder inside, corrupt ones skipped

``concept.json`` records the name, identifier, kind, the backbone (type, id, revision,
injection point, width) the vector was trained for, the head (type, parameters,
threshold), the training config and the myvlm version. Tensors are safetensors; nothing
is pickled. Saving writes a temporary folder and renames it, so a crash never leaves a
half-written concept.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from myvlm.config import CONCEPT_FILE, CONCEPT_FORMAT, EMBEDDING_FILE, HEAD_FILE
from myvlm.heads import ConceptHead, load_head
from myvlm.injection import Route

if TYPE_CHECKING:
    from myvlm.backbones.base import Backbone

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
ROUTED_FORMAT_VERSION = 2  # a concept with a route: older myvlm versions, which would ignore it, refuse the folder
KINDS = ("object", "person")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ConceptError(ValueError):
    """A concept folder is invalid, or does not fit the backbone it is used with."""


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name or ""):
        raise ConceptError(
            f"concept name {name!r} must be letters, digits, '_', '.' or '-' (no spaces or slashes), e.g. 'my_dog'"
        )
    return name


def _version() -> str:
    from myvlm import __version__

    return __version__


@dataclass
class Concept:
    name: str  # folder-safe name, e.g. "my_dog"
    identifier: str  # the word the VLM says for it, e.g. "sks"
    kind: str  # "object" or "person"
    embedding: torch.Tensor  # (D,) the learned vector (norm-matched at injection time)
    backbone: dict[str, Any]  # Backbone.describe() of the backbone it was trained on
    head: Optional[ConceptHead] = None  # decides when the concept is active; None = only when forced
    class_word: Optional[str] = None  # what the base model calls it ("dog"), for targets and metrics
    training: dict[str, Any] = field(default_factory=dict)  # TrainConfig + run statistics
    route: Optional[Route] = None  # query routing it was trained with (and must be used with), if any
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.kind not in KINDS:
            raise ConceptError(f"concept kind must be one of {KINDS}, got {self.kind!r}")
        if self.embedding.ndim != 1:
            raise ConceptError(f"a concept embedding is one vector, got shape {tuple(self.embedding.shape)}")
        if self.route is not None and self.route.look.shape != self.embedding.shape:
            raise ConceptError(f"the route's look has shape {tuple(self.route.look.shape)}, the embedding "
                               f"{tuple(self.embedding.shape)}")

    @property
    def dim(self) -> int:
        return self.embedding.shape[0]

    def metadata(self) -> dict[str, Any]:
        return {
            "format": CONCEPT_FORMAT,
            "format_version": FORMAT_VERSION if self.route is None else ROUTED_FORMAT_VERSION,
            "myvlm_version": _version(),
            "name": self.name,
            "identifier": self.identifier,
            "kind": self.kind,
            "class_word": self.class_word,
            "dim": self.dim,
            "backbone": self.backbone,
            "head": self.head.config() if self.head is not None else None,
            "training": self.training,
            "route": None if self.route is None else {"strength": self.route.strength,
                                                      "temperature": self.route.temperature},
            "created": self.created,
        }

    def check_compatible(self, backbone: "Backbone", strict_name: bool = True) -> None:
        """Raise ConceptError when this concept was trained for another backbone or injection point."""
        mine, theirs = self.backbone, backbone.describe()
        for key in ("type", "injection", "concept_dim"):
            if mine.get(key) != theirs.get(key):
                raise ConceptError(
                    f"concept {self.name!r} was trained for {mine.get('type')} {mine.get('name_or_path')!r} "
                    f"(injection {mine.get('injection')!r}, width {mine.get('concept_dim')}); it cannot be used with "
                    f"{theirs['type']} {theirs['name_or_path']!r} (injection {theirs['injection']!r}, width "
                    f"{theirs['concept_dim']}). Retrain it on this backbone."
                )
        same_model = Path(str(mine.get("name_or_path"))).name == Path(str(theirs["name_or_path"])).name
        if strict_name and not same_model:
            raise ConceptError(
                f"concept {self.name!r} was trained on {mine.get('name_or_path')!r}, not {theirs['name_or_path']!r}; "
                "vectors do not transfer between checkpoints. Retrain it, or pass strict_name=False if the two are "
                "the same weights under different names."
            )

    # ---- saving ------------------------------------------------------------------------------
    def save(self, folder: Union[str, Path], overwrite: bool = False) -> Path:
        """Write the concept folder atomically; refuse to replace an existing one unless ``overwrite``."""
        folder = Path(folder)
        if folder.exists() and not overwrite:
            raise FileExistsError(f"{folder} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            (staging / CONCEPT_FILE).write_text(json.dumps(self.metadata(), indent=2) + "\n")
            tensor_meta = {"format": CONCEPT_FORMAT, "name": self.name}
            tensors = {"embedding": self.embedding.detach().float().cpu().contiguous()}
            if self.route is not None:
                tensors["look"] = self.route.look.detach().float().cpu().contiguous()
            save_file(tensors, staging / EMBEDDING_FILE, metadata=tensor_meta)
            head_state = self.head.state_dict() if self.head is not None else {}
            if head_state:
                save_file({k: v.detach().cpu().contiguous() for k, v in head_state.items()},
                          staging / HEAD_FILE, metadata=tensor_meta)
            replace_folder(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("saved concept %r to %s", self.name, folder)
        return folder


def replace_folder(staging: Path, folder: Path) -> None:
    """Move the finished ``staging`` folder to ``folder``, swapping out an existing one; never half-done."""
    if not folder.exists():
        os.replace(staging, folder)
        return
    backup = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(backup, ignore_errors=True)
    os.replace(folder, backup)
    try:
        os.replace(staging, folder)
    except BaseException:
        os.replace(backup, folder)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def load_concept(folder: Union[str, Path], **head_runtime: Any) -> Concept:
    """Load a concept folder. ``head_runtime`` goes to the head (e.g. ``feature_extractor=...``)."""
    folder = Path(folder)
    config_path = folder / CONCEPT_FILE
    if not config_path.is_file():
        raise ConceptError(f"{folder} is not a concept folder (no {CONCEPT_FILE})")
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ConceptError(f"{config_path} is not valid JSON ({error})") from error
    if not isinstance(meta, dict) or meta.get("format") != CONCEPT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ConceptError(f"{config_path} is not a myvlm concept (format {found!r})")
    missing = [key for key in ("name", "identifier", "kind", "dim", "backbone") if key not in meta]
    if missing:
        raise ConceptError(f"{config_path} lacks {missing}; the folder is damaged, retrain or restore it")
    if meta.get("format_version", 0) > ROUTED_FORMAT_VERSION:
        raise ConceptError(f"{folder} was written by a newer myvlm ({meta.get('myvlm_version')}); upgrade myvlm")
    try:
        tensors = load_file(folder / EMBEDDING_FILE)
        embedding = tensors["embedding"]
        route = Route(tensors["look"], **meta["route"]) if meta.get("route") else None
        head_tensors = load_file(folder / HEAD_FILE) if (folder / HEAD_FILE).is_file() else {}
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as error:
        raise ConceptError(f"cannot read the tensors of {folder}: {error}") from error
    if embedding.shape != (meta["dim"],):
        raise ConceptError(f"{folder}: embedding has shape {tuple(embedding.shape)} but concept.json says {meta['dim']}")
    head = load_head(meta["head"], head_tensors, **head_runtime) if meta.get("head") else None
    return Concept(
        name=meta["name"], identifier=meta["identifier"], kind=meta["kind"], embedding=embedding,
        backbone=meta["backbone"], head=head, class_word=meta.get("class_word"),
        training=meta.get("training", {}), route=route, created=meta.get("created", ""),
    )


def load_library(folder: Union[str, Path], **head_runtime: Any) -> list[Concept]:
    """Every concept folder directly inside ``folder``; unreadable ones are skipped with a warning."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConceptError(f"concept library {folder} does not exist")
    concepts = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            concepts.append(load_concept(child, **head_runtime))
        except (ConceptError, ValueError, KeyError, OSError) as error:
            logger.warning("skipping %s: %s", child, error)
    return concepts
