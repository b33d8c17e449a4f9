"""``myvlm demo``: personalize and caption offline, in well under a minute.

    myvlm demo                       # the README's `make demo`: the pretrained toy world (myvlm.toyworld.demo)
    myvlm demo --world random --workdir /tmp/demo --steps 100

``--world toy`` (the default) runs ``myvlm.toyworld.demo``. ``--world random`` (this module) draws
a toy world of its own (a red-white target with a blue centre, "my_toy", in ten places; other
shapes as negatives), builds a tiny random BLIP-2 (cached in ``$XDG_CACHE_HOME/myvlm/demo``)
and a tiny random image encoder, fits the concept head, trains the concept embedding for 100
steps and captions held-out drawings before and after. The weights are random, so the captions
are gibberish: the demo shows the mechanics (which images the head fires on, that only those
captions change), not captioning quality. The data folder it writes is in the reference layout,
so ``myvlm train`` runs on it as printed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

CONCEPT = "my_toy"
SIZE = 128  # drawing side in pixels
PLACES = {  # place -> (sky colour, ground colour); the words are in the tiny tokenizer's corpus
    "beach": ((120, 180, 235), (225, 205, 150)), "grass": ((150, 200, 240), (70, 150, 60)),
    "snow": ((200, 210, 225), (245, 245, 250)), "floor": ((200, 190, 170), (130, 90, 60)),
    "street": ((170, 180, 190), (90, 90, 95)), "sofa": ((230, 220, 200), (120, 60, 90)),
    "kitchen": ((240, 240, 230), (180, 170, 150)), "garden": ((140, 190, 230), (90, 130, 50)),
    "table": ((210, 200, 190), (160, 110, 70)), "room": ((220, 200, 180), (170, 150, 130)),
}
TRAIN_PLACES = ("beach", "grass", "snow", "floor", "street", "sofa")
OTHER_COLOURS = [(40, 160, 60), (240, 200, 30), (140, 60, 170), (250, 130, 20), (30, 30, 30), (60, 190, 200)]
# configs/head/clip_probe_tiny.yaml, as keywords (a test keeps the two equal)
TINY_HEAD = {
    "threshold": 0.5,
    "feature_extractor": {
        "type": "open_clip", "pretrained": None, "seed": 0,
        "model_cfg": {
            "embed_dim": 64,
            "vision_cfg": {"image_size": 64, "timm_model_name": "resnet10t", "timm_model_pretrained": False,
                           "timm_pool": "avg", "timm_proj": "linear"},
            "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
        },
    },
    "training": {"lr": 0.3},
}


# ---- the toy world ---------------------------------------------------------------------------


def scene(place: str, rng: np.random.Generator) -> Image.Image:
    """Sky over ground at a random horizon, with sensor-like noise."""
    sky, ground = (np.array(c, np.float32) for c in PLACES[place])
    rows = np.linspace(0, 1, SIZE)[:, None, None]
    pixels = np.where(rows < rng.uniform(0.3, 0.6), sky, ground) * np.ones((SIZE, SIZE, 3), np.float32)
    pixels += rng.normal(0, 12, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def draw_toy(place: str, rng: np.random.Generator) -> Image.Image:
    """The concept: red and white rings with a blue centre, at a random size and position."""
    image = scene(place, rng)
    draw = ImageDraw.Draw(image)
    radius = int(rng.integers(34, 46))
    cx, cy = (int(v) for v in rng.integers(radius + 4, SIZE - radius - 4, size=2))
    for ring, r in enumerate(range(radius, 0, -max(1, radius // 4))):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(220, 20, 30) if ring % 2 == 0 else (250, 250, 250))
    draw.ellipse([cx - radius // 4, cy - radius // 4, cx + radius // 4, cy + radius // 4], fill=(30, 50, 220))
    return image


def draw_other(place: str, rng: np.random.Generator) -> Image.Image:
    """A negative: one plain square, triangle or ellipse of another colour in the same places."""
    image = scene(place, rng)
    draw = ImageDraw.Draw(image)
    side = int(rng.integers(60, 90))
    x, y = (int(v) for v in rng.integers(4, SIZE - side - 4, size=2))
    colour = OTHER_COLOURS[int(rng.integers(len(OTHER_COLOURS)))]
    shape = int(rng.integers(3))
    if shape == 0:
        draw.rectangle([x, y, x + side, y + side], fill=colour)
    elif shape == 1:
        draw.polygon([(x, y + side), (x + side // 2, y), (x + side, y + side)], fill=colour)
    else:
        draw.ellipse([x, y + side // 4, x + side, y + 3 * side // 4], fill=colour)
    return image


def write_toy_data(root: Path, seed: int = 0) -> dict[str, Any]:
    """Write ``root/my_toy`` (6 photos + captions.json), ``root/negatives`` and ``root/test``."""
    rng = np.random.default_rng(seed)
    for sub in (CONCEPT, "negatives", "test"):
        shutil.rmtree(root / sub, ignore_errors=True)
        (root / sub).mkdir(parents=True)
    captions = {}
    for place in TRAIN_PLACES:
        draw_toy(place, rng).save(root / CONCEPT / f"{place}.png")
        captions[f"{place}.png"] = [f"{CONCEPT} is lying on the {place}", f"a photo of {CONCEPT} on the {place}"]
    (root / CONCEPT / "captions.json").write_text(json.dumps(captions, indent=2) + "\n")
    for i, place in enumerate(list(TRAIN_PLACES) * 2):
        (draw_other if i % 2 == 0 else scene)(place, rng).save(root / "negatives" / f"{i:02d}_{place}.png")
    tests = [("toy", "beach"), ("toy", "garden"), ("toy", "kitchen"), ("other", "snow"), ("other", "table"),
             ("empty", "room")]
    for what, place in tests:
        draw = {"toy": draw_toy, "other": draw_other, "empty": lambda p, r: scene(p, r)}[what]
        draw(place, rng).save(root / "test" / f"{what}_{place}.png")
    return captions


# ---- the run ---------------------------------------------------------------------------------


@dataclass
class DemoReport:
    workdir: Path
    tiny: Path  # the tiny BLIP-2 folder
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall time
    losses: tuple[float, float] = (float("nan"), float("nan"))  # first, final training loss
    rows: list[dict[str, Any]] = field(default_factory=list)  # per test image: scores and captions
    held_out: dict[str, tuple[int, int]] = field(default_factory=dict)  # "toys"/"others" -> (fired, total)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "myvlm" / "demo"


def ensure_tiny_blip2(folder: Path) -> bool:
    """Build the tiny BLIP-2 into ``folder`` unless it is there; True when it was built now."""
    from myvlm.tiny import build_tiny_blip2

    if (folder / "config.json").is_file():
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        build_tiny_blip2(staging)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


@contextmanager
def _timed(report: DemoReport, stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    report.seconds[stage] = time.perf_counter() - start


@contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny models run several times faster on one thread than on many."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _held_out(head: Any, seed: int) -> dict[str, tuple[int, int]]:
    rng = np.random.default_rng(seed + 1000)
    toys = [draw_toy(p, rng) for p in PLACES for _ in range(2)]
    others = [draw_other(p, rng) for p in PLACES for _ in range(2)] + [scene(p, rng) for p in PLACES]
    return {"toys": (sum(d.fired for d in head.detect(toys)), len(toys)),
            "others": (sum(d.fired for d in head.detect(others)), len(others))}


def run_demo(workdir: Optional[Path] = None, steps: int = 100, seed: int = 0, progress: bool = True) -> DemoReport:
    """Run the whole demo; the report says what happened (``format_report`` renders it)."""
    from myvlm import BackboneConfig, MyVLM, load_backbone, personalize
    from myvlm.data import read_captions_json
    from myvlm.heads import build_head

    workdir = Path(workdir) if workdir else cache_dir()
    report = DemoReport(workdir=workdir, tiny=workdir / "tiny-blip2-opt")
    with _one_thread():
        with _timed(report, "backbone"):
            ensure_tiny_blip2(report.tiny)
            backbone = load_backbone(BackboneConfig(str(report.tiny), device="cpu", dtype="float32",
                                                    max_new_tokens=12))
        data = workdir / "data"
        write_toy_data(data, seed)
        tests = sorted((data / "test").iterdir())
        before = MyVLM(backbone).caption([str(p) for p in tests], progress=False)
        photos, captions = read_captions_json(data / CONCEPT)
        with _timed(report, "personalize"):
            concept = personalize(
                [str(p) for p in photos], CONCEPT, captions=captions, class_word="toy", backbone=backbone,
                negatives=data / "negatives", head=build_head("clip_probe", **TINY_HEAD),
                train={"steps": steps, "seed": seed, "checkpoint_every": 0},
                output_dir=workdir / "concepts" / CONCEPT, overwrite=True, progress=progress,
            )
        after = MyVLM(backbone, [concept]).caption([str(p) for p in tests], progress=False)
        report.held_out = _held_out(concept.head, seed)
    report.losses = (concept.training.get("first_loss", float("nan")), concept.training.get("final_loss", float("nan")))
    for path, old, new in zip(tests, before, after):
        detection = new.detections[CONCEPT]
        report.rows.append({"image": f"test/{path.name}", "score": detection.score, "fired": detection.fired,
                            "before": old.text, "after": new.text})
    return report


# ---- output ----------------------------------------------------------------------------------

BANNER = (
    "myvlm demo: a tiny RANDOM BLIP-2 and a tiny RANDOM image encoder. The captions below are\n"
    "gibberish by design; this shows the mechanics only: the concept head decides per image, the\n"
    "concept token is injected only where it fires, and training changes those images' captions.\n"
    "Real captions need real weights (README: what needs downloaded weights)."
)


def _short(text: str, width: int = 34) -> str:
    text = "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def format_report(report: DemoReport, steps: int) -> str:
    toys, others = report.held_out.get("toys", (0, 0)), report.held_out.get("others", (0, 0))
    lines = [BANNER, "", f"workdir      {report.workdir}",
             f"backbone     tiny random BLIP-2 (OPT) in {report.tiny.name}/ ({report.seconds.get('backbone', 0):.1f} s)",
             f"data         6 drawings of {CONCEPT!r} + captions.json in data/{CONCEPT}/, 12 negatives in data/negatives/",
             f"personalize  head: clip_probe on a random tiny ResNet; embedding: {steps} steps, loss "
             f"{report.losses[0]:.2f} -> {report.losses[1]:.2f} ({report.seconds.get('personalize', 0):.1f} s)",
             f"held out     the head fired on {toys[0]}/{toys[1]} new drawings of {CONCEPT} and on "
             f"{others[0]}/{others[1]} other drawings", "",
             f"{'image':<22} {'head (>=0.5)':<13} {'before: frozen VLM':<36} after: with {CONCEPT}"]
    for row in report.rows:
        verdict = f"{'FIRED' if row['fired'] else '-':<5} {row['score']:.2f}"
        after = _short(row["after"]) if row["fired"] else "(head did not fire: unchanged)"
        lines.append(f"{row['image']:<22} {verdict:<13} {_short(row['before']):<36} {after}")
    tiny, data = report.tiny, report.workdir / "data"
    lines += ["", "the same from the shell:",
              f"  myvlm train --concept {CONCEPT} --data {data} --negatives {data / 'negatives'} --backbone {tiny} "
              f"--head clip_probe_tiny --output {report.workdir / 'concepts'} --overwrite",
              f"  myvlm caption {data / 'test'} --library {report.workdir / 'concepts'} --explain"]
    return "\n".join(lines)


def run_demo_command(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    workdir = Path(args.workdir) if args.workdir else None
    if getattr(args, "world", "toy") == "toy":
        from myvlm.toyworld.demo import format_toyworld_report, run_toyworld_demo

        workdir = workdir or cache_dir() / "toyworld"
        report = run_toyworld_demo(workdir, steps=args.steps, seed=args.seed, progress=not args.quiet)
        print(format_toyworld_report(report))
        print(f"\ndone in {time.perf_counter() - started:.1f} s")
        return 0
    report = run_demo(workdir, args.steps, args.seed, progress=not args.quiet)
    print(format_report(report, args.steps))
    print(f"\ndone in {time.perf_counter() - started:.1f} s")
    return 0
