"""``myvlm caption``: caption (or question) images with every concept of a library.

    myvlm caption photos/ --explain              # path<TAB>caption<TAB>[fired: my_dog 0.93>=0.5]
    myvlm caption a.jpg b.jpg --json --concepts=concepts/my_dog
    myvlm caption 'trip/*.jpg' --question "What is sks doing?"

Concepts come from ``--concepts`` (concept folders, library folders, or names in ``--library``)
or, by default, from the whole ``--library`` (``./concepts``); a corrupt concept in a library is
skipped with a warning. The backbone is the one the concepts were trained on (``--backbone``
picks another checkpoint; then library concepts trained elsewhere are skipped with a warning).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

from myvlm.cli_config import (
    ConfigError,
    TaskConfig,
    compose_config,
    find_config_dir,
    hydra_list,
    hydra_string,
    resolve,
    to_dataclass,
    to_yaml,
)
from myvlm.cli_inputs import expand_images, split_overrides
from myvlm.config import CONCEPT_FILE

logger = logging.getLogger(__name__)


def flag_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    simple = {"library": "library", "backbone": "backbone.name_or_path", "device": "backbone.device",
              "dtype": "backbone.dtype"}
    for flag, key in simple.items():
        if getattr(args, flag, None) is not None:
            out.append(f"{key}={hydra_string(getattr(args, flag))}")
    if args.batch_size is not None:
        out.append(f"batch_size={int(args.batch_size)}")
    for flag in ("concepts", "force"):  # nargs="+" swallows what follows: files and key=value go back to the inputs
        if getattr(args, flag):
            names, extra = split_overrides(getattr(args, flag))
            files = [n for n in names if Path(n).is_file()]
            args.inputs = list(args.inputs or []) + files + extra
            out.append(f"{flag}={hydra_list([n for n in names if n not in files])}")
    if args.prompt is not None:
        out.append(f"task.prompt={hydra_string(args.prompt)}")
    if args.question is not None:
        out += ["task=vqa", f"task.question={hydra_string(args.question)}"]
    return out


def gather_concepts(entries: Optional[list[str]], library: Path, **runtime: Any) -> list[tuple[Any, bool]]:
    """``(concept, named explicitly)`` pairs: explicit ones must load, library members may be skipped.

    ``runtime`` goes to the heads (``device=`` for their feature extractors)."""
    from myvlm.concept import ConceptError, load_concept, load_library

    if not entries:
        if not library.is_dir():
            logger.warning("no concept library at %s: captioning with the frozen VLM alone", library)
            return []
        concepts = [(c, False) for c in load_library(library, **runtime)]
        if not concepts:
            logger.warning("the library %s holds no concepts: captioning with the frozen VLM alone", library)
        return concepts
    out = []
    for entry in entries:
        path = Path(entry)
        if (path / CONCEPT_FILE).is_file():
            out.append((load_concept(path, **runtime), True))
        elif path.is_dir():
            out += [(c, False) for c in load_library(path, **runtime)]
        elif (library / entry / CONCEPT_FILE).is_file():
            out.append((load_concept(library / entry, **runtime), True))
        else:
            have = sorted(p.name for p in library.iterdir() if (p / CONCEPT_FILE).is_file()) if library.is_dir() else []
            raise ConceptError(f"no concept {entry!r}: not a folder, and not in library {library} "
                               f"(it has: {', '.join(have) or 'nothing'})")
    return out


def backbone_config(concepts: list[tuple[Any, bool]], overrides: dict[str, Any]) -> Any:
    """The concepts' recorded backbone, with the non-null ``overrides`` (``backbone.*``) applied."""
    from myvlm.config import BackboneConfig

    chosen = {k: v for k, v in overrides.items() if v is not None}
    if chosen.get("name_or_path"):
        return to_dataclass(BackboneConfig, chosen, "backbone")
    recorded = {(c.backbone.get("type"), c.backbone.get("name_or_path"), c.backbone.get("revision"),
                 c.backbone.get("injection")) for c, _ in concepts}
    if not recorded:
        raise ConfigError("no concept to caption with and no backbone: pass --backbone ID_OR_DIR, or --concepts")
    if len(recorded) > 1:
        names = ", ".join(sorted(str(r[1]) for r in recorded))
        raise ConfigError(f"the concepts were trained on different backbones ({names}); pick one with --backbone "
                          "or choose concepts with --concepts")
    kind, name_or_path, revision, injection = recorded.pop()
    base = {"type": kind, "name_or_path": name_or_path, "revision": revision, "injection": injection}
    return to_dataclass(BackboneConfig, {**base, **chosen}, "backbone")


def build_vlm(backbone: Any, concepts: list[tuple[Any, bool]], strict: bool) -> Any:
    """A MyVLM with every concept that fits ``backbone`` (explicit misfits are errors, library ones warnings)."""
    from myvlm.concept import ConceptError
    from myvlm.model import MyVLM

    vlm = MyVLM(backbone, strict_backbone=strict)
    for concept, explicit in concepts:
        try:
            vlm.add(concept)
        except ConceptError as error:
            if explicit:
                raise
            logger.warning("skipping concept %r: %s", concept.name, error)
    logger.info("captioning with %d concept(s): %s", len(vlm.concepts), ", ".join(vlm.concepts) or "none")
    return vlm


def _finite(value: Any) -> Any:
    """JSON has no Infinity/NaN (a face head's score when there is no face): they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def explain_detections(result: Any, vlm: Any) -> str:
    """``[fired: my_dog 0.93>=0.5 | not: anna 0.71>0.6]`` from one result's detections."""
    fired, idle = [], []
    for name, detection in result.detections.items():
        higher = getattr(vlm.concepts[name].head, "higher_is_present", True)
        relation = (">=" if higher else "<=") if detection.fired else ("<" if higher else ">")
        (fired if detection.fired else idle).append(f"{name} {detection.score:.3g}{relation}{detection.threshold:.3g}")
    forced = [n for n in result.active if n not in result.detections or not result.detections[n].fired]
    parts = [f"fired: {', '.join(fired) or 'none'}"] + ([f"not: {', '.join(idle)}"] if idle else [])
    parts += [f"forced: {', '.join(forced)}"] if forced else []
    return "[" + " | ".join(parts) + "]"


def print_results(results: list[Any], vlm: Any, as_json: bool, explain: bool, question: Optional[str]) -> None:
    if as_json:
        rows = [{**r.to_dict(), **({"question": question} if question else {})} for r in results]
        print(json.dumps(_finite(rows), indent=2, allow_nan=False))
        return
    for result in results:
        text = " ".join(result.text.split())  # one line per image, whatever the model generated
        print(f"{result.source}\t{text}" + (f"\t{explain_detections(result, vlm)}" if explain else ""))


def run_caption(args: argparse.Namespace) -> int:
    from myvlm.backbones import load_backbone

    directory = find_config_dir(args.config_dir)
    overrides = flag_overrides(args)  # may move key=value items given after --concepts into args.inputs
    images, extra = split_overrides(args.inputs or [])
    cfg = compose_config("caption", overrides + extra, directory)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    values = resolve(cfg)
    task = to_dataclass(TaskConfig, values["task"], "task")
    if task.name not in ("caption", "vqa") or (task.name == "vqa" and not task.question):
        raise ConfigError(f"task must be caption, or vqa with a task.question (got {task.name!r})")
    if not images:
        raise ConfigError("no images to caption: give image files, folders or globs")
    paths = expand_images(images)
    runtime = {"device": values["head_device"]} if values["head_device"] else {}
    concepts = gather_concepts(values["concepts"], Path(values["library"]), **runtime)
    backbone = load_backbone(backbone_config(concepts, values["backbone"]))
    vlm = build_vlm(backbone, concepts, bool(values["strict_backbone"]))
    common = dict(force=values["force"], batch_size=int(values["batch_size"]), progress=not args.quiet)
    if task.name == "vqa":
        results = vlm.ask([str(p) for p in paths], task.question, **common)
    else:
        results = vlm.caption([str(p) for p in paths], prompt=task.prompt, **common)
    print_results(results, vlm, args.json, args.explain, task.question if task.name == "vqa" else None)
    return 0
