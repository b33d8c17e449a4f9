"""``myvlm train``: personalize one concept from a data folder into a concept library.

    myvlm train --concept my_dog --data data --backbone blip2_opt_2.7b
    myvlm train --concept my_dog --images photos/dog --class-word dog train=quick head.threshold=0.6

Order of work: compose the config, check every input (name, photos, captions, output) without
loading a model, then fit the head and train the embedding through ``myvlm.personalize`` into
a hidden staging folder inside the library, add ``config.yaml``, and rename it into place: a
failed or interrupted run leaves no concept folder behind. The run folder
(``outputs/<date>/<time>-<concept>/``) keeps ``train.log``, ``config.yaml``, ``overrides.yaml``
and the training checkpoints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from myvlm.cli_config import (
    ConfigError,
    TaskConfig,
    compose_config,
    find_config_dir,
    group_options,
    hydra_list,
    hydra_string,
    resolve,
    to_dataclass,
    to_yaml,
)
from myvlm.cli_inputs import expand_images, split_overrides
from myvlm.config import CONCEPT_FILE

logger = logging.getLogger(__name__)

_HINTS = {"concept.name": "; pass --concept NAME (or concept.name=NAME)"}


@dataclass
class TrainJob:
    """Everything ``train`` will do, checked before any model is loaded."""

    name: str  # concept name
    images: list[Path]  # training photos
    folder: Optional[Path]  # the folder they came from (captions.json, vqa.json), None for loose files
    captions: Optional[list[list[str]]]  # per photo, from captions.json; None = the VLM's own captions
    config: dict[str, Any]  # the resolved config, as saved
    destination: Path  # <output>/<name>
    run_dir: Path  # log, config, checkpoints
    personalize_kwargs: dict[str, Any] = field(default_factory=dict)  # the rest of personalize()'s arguments


def flag_overrides(args: argparse.Namespace, directory: Path) -> list[str]:
    """The Hydra overrides that the flags stand for (explicit key=value overrides come after them)."""
    out = []
    simple = {"concept": "concept.name", "identifier": "concept.identifier", "class_word": "concept.class_word",
              "kind": "concept.kind", "data": "data.root", "negatives": "data.negatives", "output": "output",
              "head_from": "head_from", "device": "backbone.device", "dtype": "backbone.dtype"}
    for flag, key in simple.items():
        if getattr(args, flag, None) is not None:
            out.append(f"{key}={hydra_string(getattr(args, flag))}")
    for flag, key in {"steps": "train.steps", "seed": "seed"}.items():
        if getattr(args, flag, None) is not None:
            out.append(f"{key}={int(getattr(args, flag))}")
    if args.images:
        images, extra = split_overrides(args.images)
        args.overrides = extra + list(args.overrides or [])
        out.append(f"data.images={hydra_list(images)}")
    if args.overwrite:
        out.append("overwrite=true")
    if args.head:
        out.append(f"head={args.head}")
    if args.backbone:
        if args.backbone in group_options("backbone", directory):
            out.append(f"backbone={args.backbone}")
        else:  # a hub id or a checkpoint folder: its type is read from its config
            out += [f"backbone.name_or_path={hydra_string(args.backbone)}", "backbone.type=null"]
    return out


def _training_photos(data: dict[str, Any], name: str) -> tuple[list[Path], Optional[list[list[str]]], Optional[Path]]:
    """Photos, their captions.json captions (None when there is none) and their folder (None for loose files)."""
    from myvlm.data import read_captions_json
    from myvlm.images import ImageError

    if data.get("images") and data.get("root"):
        raise ConfigError("give --data ROOT or --images PATH..., not both")
    if isinstance(data.get("images"), str):  # data.images=photos/ rather than a list
        data = {**data, "images": [data["images"]]}
    if data.get("images"):
        sources = [Path(p) for p in data["images"]]
        folder = sources[0] if len(sources) == 1 and sources[0].is_dir() else None
    elif data.get("root"):
        root = Path(data["root"])
        folder = root / name
        if not folder.is_dir():
            found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            where = f" (it has: {', '.join(found[:10])})" if found else "" if root.is_dir() else " (no such folder)"
            raise ImageError(f"no folder {name!r} in data root {root}{where}")
    else:
        raise ConfigError("no training photos: pass --data ROOT (photos in ROOT/<concept>/) or --images PATH...")
    if folder is not None and (folder / "captions.json").is_file():
        return (*read_captions_json(folder), folder)
    return expand_images([str(folder)] if folder is not None else data["images"]), None, folder


def _check_output(output: Path, destination: Path, overwrite: bool) -> None:
    if (output / CONCEPT_FILE).is_file():
        raise ConfigError(f"--output {output} is a concept folder; --output takes the library folder that holds concepts")
    if destination.exists():
        if not (destination / CONCEPT_FILE).is_file():
            raise FileExistsError(f"{destination} exists and is not a concept folder; choose another --output or --concept")
        if not overwrite:
            raise FileExistsError(f"{destination} already holds a concept; pass --overwrite to replace it")


def _check_targets(images: list[Path], captions: Optional[list[list[str]]], concept: dict[str, Any],
                   mirrored: Optional[list[list[str]]] = None) -> None:
    """Fail before loading a model: every captions.json (and mirrored_captions.json) entry must name the concept,
    or a class word is needed."""
    from myvlm.data import MIRRORED_FILE, make_examples
    from myvlm.images import load_image

    if captions is None:
        if mirrored is not None:
            raise ConfigError(f"{MIRRORED_FILE} needs a captions.json beside it (the captions of the photos "
                              "themselves); add one, or remove it to train on the frozen VLM's own captions")
        if not concept.get("class_word"):
            raise ConfigError("the photos have no captions.json: pass --class-word WORD (e.g. --class-word dog) so the "
                              "frozen VLM's own captions become the targets, or add a captions.json")
        return
    make_examples([load_image(p) for p in images], captions, concept["name"], concept["identifier"],
                  concept["kind"], [p.name for p in images], mirrored=mirrored)


def _head_arguments(values: dict[str, Any], kind: str) -> dict[str, Any]:
    from myvlm.cli_config import head_spec
    from myvlm.concept import load_concept

    if values.get("head_from"):
        donor = load_concept(values["head_from"])
        if donor.head is None:
            raise ConfigError(f"--head-from {values['head_from']}: that concept has no head to reuse")
        if donor.kind != kind:
            logger.warning("reusing the head of %r, a %s, for a %s", donor.name, donor.kind, kind)
        logger.info("reusing the fitted %s head of %s (no head fitting)", donor.head.head_type, values["head_from"])
        return {"head": donor.head, "fit_head_on_images": False}
    name, kwargs = head_spec(values["head"], kind)
    return {"head": name, "head_kwargs": kwargs}


def plan_job(cfg: Any) -> TrainJob:
    """Check the composed config and the data; build the arguments of ``personalize``."""
    from myvlm.concept import KINDS, check_name
    from myvlm.config import BackboneConfig, TrainConfig
    from myvlm.data import read_mirrored_captions

    values = resolve(cfg, _HINTS)
    concept = values["concept"]
    check_name(str(concept["name"]))
    if concept["kind"] not in KINDS:
        raise ConfigError(f"concept.kind must be one of {', '.join(KINDS)}, got {concept['kind']!r}")
    backbone = to_dataclass(BackboneConfig, values["backbone"], "backbone")
    train = _drop_nulls(values["train"])  # a dict: personalize fills the rest from the backbone's defaults
    to_dataclass(TrainConfig, train, "train")
    task = to_dataclass(TaskConfig, values["task"], "task").name
    if task not in ("caption", "vqa"):
        raise ConfigError(f"task.name must be caption or vqa, got {task!r}")
    output = Path(values["output"])
    destination = output / concept["name"]
    _check_output(output, destination, bool(values["overwrite"]))
    images, captions, folder = _training_photos(values["data"], concept["name"])
    mirrored = read_mirrored_captions(folder, [p.name for p in images]) if folder is not None else None
    _check_targets(images, captions, concept, mirrored)
    negatives = values["data"].get("negatives")
    if negatives and not Path(negatives).is_dir():
        raise ConfigError(f"--negatives {negatives} is not a folder")
    kwargs = dict(identifier=concept["identifier"], class_word=concept["class_word"], kind=concept["kind"],
                  backbone=backbone, negatives=Path(negatives) if negatives else None, train=train, task=task,
                  mirrored_captions=mirrored, **_head_arguments(values, concept["kind"]))
    if task == "vqa" and folder is not None and (folder / "vqa.json").is_file():
        from myvlm.vqa import read_vqa_file

        kwargs["questions"] = read_vqa_file(folder / "vqa.json", [p.name for p in images])
    return TrainJob(concept["name"], images, folder, captions, values, destination, Path(values["run_dir"]), kwargs)


def _drop_nulls(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _drop_nulls(v) if isinstance(v, dict) else v for k, v in values.items() if v is not None}


def _write_yaml(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _publish(staged: Path, destination: Path, overwrite: bool) -> None:
    """Rename the finished concept folder into the library (swapping out the old one with ``overwrite``)."""
    from myvlm.concept import replace_folder

    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} appeared while training; pass --overwrite to replace it")
    replace_folder(staged, destination)


def train_job(job: TrainJob, config_yaml: str, progress: bool) -> Path:
    """Run ``personalize`` into a staging folder inside the library, then move the result into place."""
    from myvlm.api import personalize

    library_existed = job.destination.parent.exists()
    job.destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{job.name}.staging-", dir=job.destination.parent))
    try:
        staged = staging / job.name
        # a bare folder goes as the folder, so that personalize(task="vqa") can keep its vqa.json next to it
        images = job.folder if job.captions is None and job.folder is not None else [str(p) for p in job.images]
        personalize(images, job.name, captions=job.captions, output_dir=staged, progress=progress,
                    **job.personalize_kwargs)
        _write_yaml(staged / "config.yaml", config_yaml)
        _publish(staged, job.destination, bool(job.config["overwrite"]))
    finally:
        checkpoints = staging / f".{job.name}.run" / "checkpoints"
        if checkpoints.is_dir():
            shutil.move(str(checkpoints), str(job.run_dir / "checkpoints"))
        shutil.rmtree(staging, ignore_errors=True)
        if not library_existed and not any(job.destination.parent.iterdir()):
            job.destination.parent.rmdir()  # a failed first run leaves no empty library either
    return job.destination


def run_train(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from myvlm.cli import log_file

    directory = find_config_dir(args.config_dir)
    overrides = flag_overrides(args, directory) + list(args.overrides or [])
    cfg = compose_config("train", overrides, directory)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    job = plan_job(cfg)
    config_yaml = OmegaConf.to_yaml(OmegaConf.create(job.config))  # resolved once: same run_dir everywhere
    job.run_dir.mkdir(parents=True, exist_ok=True)
    _write_yaml(job.run_dir / "config.yaml", config_yaml)
    _write_yaml(job.run_dir / "overrides.yaml", "".join(f"- {json.dumps(o)}\n" for o in overrides) or "[]\n")
    with log_file(job.run_dir / "train.log"):
        logger.info("training %r on %d photos; run folder %s", job.name, len(job.images), job.run_dir)
        destination = train_job(job, config_yaml, progress=not args.quiet)
        logger.info("wrote %s", destination)
    print(f"trained {job.name!r} -> {destination}  (log: {job.run_dir / 'train.log'})")
    return 0

