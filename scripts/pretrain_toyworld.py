"""Pretrain the toy world's tiny BLIP-2, tiny open_clip and (``--llava``) tiny LLaVA on the CPU, seeded.

    python scripts/pretrain_toyworld.py --llava               # writes myvlm/toyworld/checkpoints
    python scripts/pretrain_toyworld.py --out /tmp/tw --vision-steps 100 --language-steps 100 --clip-steps 50

The three models are independent parts, pretrained ``--jobs`` at a time, each in a child process of this
script with ``--threads`` torch threads. One thread is the default: on these tiny models a second thread in
one process hardly helps, while two one-thread processes get about 1.3x the work of one two-thread process
done on two cores. Children get ``OMP_WAIT_POLICY=PASSIVE`` (with more threads than cores, spinning OpenMP
threads starve the other processes). The weights depend on ``--threads`` and ``--seed``, not on ``--jobs``:
``--jobs 1`` (one part after another in this process) writes the same bytes -- on the same kind of CPU (another
CPU's float kernels give other bytes). A part that fails does not stop
the others: they finish and keep their weights and report, and the script exits non-zero naming it.
``--llava`` on an idle 2-core machine (an AMD EPYC VM, the default ``--jobs 2``: the LLaVA on one core, the
BLIP-2 then the CLIP on the other): 25.9 and 29.0 min on two days; 30.8 min with all three at once (34.8 min there
before the faster masks; the VM's speed drifts: 22.7 min on a faster day, see the README).

Writes ``<out>/blip2`` and ``<out>/llava`` (load with ``myvlm.load_backbone``), ``<out>/clip.safetensors``
and ``<out>/pretrain_report.json`` (losses, wall times and the captioners' accuracy on fresh scenes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from myvlm.toyworld.evaluate import caption_accuracy, vqa_accuracy
from myvlm.toyworld.models import (
    CHECKPOINTS, NAME_VECTORS, Blip2Sizes, LlavaSizes, new_blip2, new_llava, save_name_vectors,
)
from myvlm.toyworld.pretrain import (
    ClipObjectives, StageConfig, WorldData, make_data, object_crops, object_pairs, train_clip, train_language,
    train_llava_language, train_vision, vision_accuracy,
)

logger = logging.getLogger("pretrain_toyworld")
PARTS = ("blip2", "llava", "clip")  # --jobs starts them in this order: the CLIP, the shortest, last
LANGUAGE_LR = 1e-3  # peak learning rate of the language stages (the vision stages take --vision-lr)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=CHECKPOINTS)
    parser.add_argument("--n-train", type=int, default=60000,
                        help="rendered pretraining scenes of the BLIP-2 (20000 until 2026-11-27 night: it learned them "
                             "by heart, captioning them at 98%% and fresh scenes at 85-92%% per attribute)")
    parser.add_argument("--llava-n-train", type=int, default=60000,
                        help="--n-train for the LLaVA (20000 until 2026-11-28; 60000 with the naming prior on half of "
                             "the scenes weakened the prior: name in place 57%% vs 80%%; see --llava-naming)")
    parser.add_argument("--vision-steps", type=int, default=2500)
    parser.add_argument("--vision-lr", type=float, default=3e-3)
    parser.add_argument("--language-steps", type=int, default=2500)
    parser.add_argument("--clip-steps", type=int, default=800)
    parser.add_argument("--clip-scenes", type=int, default=20000 // 3,
                        help="rendered scenes (and object pairs) of the CLIP stage; apart from --n-train")
    parser.add_argument("--clip-batch", type=int, default=64)
    parser.add_argument("--clip-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="CLIP stage objectives (ClipObjectives), e.g. objects=1 conjunctions=true look_alikes=1")
    parser.add_argument("--clip-pool", default="tok", choices=["tok", "avg"],
                        help="open_clip image pooling: class token (shipped) or mean of the patch tokens")
    parser.add_argument("--details", type=float, default=0.0,
                        help="BLIP-2 scenes: fraction of the patterned, unnamed objects given a rim or centre dot, as "
                             "the CLIP's scenes and the personal concepts have (never a concept's look); 0 = none")
    parser.add_argument("--llava-details", type=float, default=0.0, help="--details for the LLaVA's scenes")
    parser.add_argument("--variation", type=float, default=0.0,
                        help="BLIP-2 scenes: fraction drawn with the pose, scale and lighting ranges of the personal "
                             "concepts' photos (scenes.PHOTO_VARIATION); 0 = none")
    parser.add_argument("--llava-variation", type=float, default=0.0, help="--variation for the LLaVA's scenes")
    parser.add_argument("--look-alikes", type=float, default=0.0,
                        help="BLIP-2 scenes: fraction that set a patterned object beside a look-alike (same category, "
                             "other colours or pattern: worded alike) and name it in the prior's second photo")
    parser.add_argument("--llava-look-alikes", type=float, default=0.25, help="--look-alikes for the LLaVA's scenes")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-n", type=int, default=300, help="fresh scenes for the accuracy report")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process; the weights depend on it (shipped: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision-lr-scale", type=float, default=1.0,
                        help="BLIP-2: the ViT's learning rate in the language stage, times the stage's (0 = frozen)")
    parser.add_argument("--naming", type=float, default=0.5,
                        help="BLIP-2: fraction of scenes with the naming prior (0 = off; the LLaVA's: --llava-naming)")
    parser.add_argument("--same-photo", type=float, default=0.5,
                        help="naming prior: fraction of its tokens taken from the scene itself (the rest from another "
                             "photo of the object, so that the token binds by appearance, not position)")
    parser.add_argument("--locate", type=float, default=0.0,
                        help="BLIP-2: weight of the naming prior's locate objective (ObjectLocator on OPT's state at "
                             "the first text token, blip2_locator); 0 = off")
    parser.add_argument("--locate-layer", type=int, default=1, help="the OPT decoder layer the BLIP-2 locator reads")
    parser.add_argument("--named-weight", type=float, default=1.0,
                        help="BLIP-2: --llava-named-weight for the BLIP-2 (1 = off)")
    parser.add_argument("--slots", type=float, default=0.25,
                        help="BLIP-2: weight of the query slots objective (the first queries name the caption's "
                             "objects' attributes, in its order); 0 = off")
    parser.add_argument("--name-noise", type=float, default=0.0,
                        help="BLIP-2, naming prior: a fresh random direction of this relative norm added to each "
                             "token's name vector in training (0 = off)")
    parser.add_argument("--qformer-dropout", type=float, default=0.1, help="BLIP-2 Q-Former dropout (Blip2Sizes)")
    parser.add_argument("--queries", type=int, default=Blip2Sizes().num_query_tokens,
                        help="BLIP-2 learned queries, the image tokens its LM sees (Blip2Sizes)")
    parser.add_argument("--llava-naming", type=float, default=0.7,
                        help="--naming for the LLaVA (0.5 until 2026-11-28, on 20000 scenes)")
    parser.add_argument("--llava-same-photo", type=float, default=0.2, help="--same-photo for the LLaVA")
    parser.add_argument("--llava-locate", type=float, default=0.3,
                        help="LLaVA: weight of the naming prior's locate objective (ObjectLocator: find the object "
                             "the token looks like in this image); 0 = off")
    parser.add_argument("--llava-locate-layer", type=int, default=1, help="the LLaVA decoder layer the locator reads")
    parser.add_argument("--llava-named-weight", type=float, default=5.0,
                        help="LLaVA, naming prior: caption weight of the scenes with several objects where one is "
                             "renamed (placement_weights; 1 = off)")
    parser.add_argument("--llava-vision-lr-scale", type=float, default=1.0,
                        help="LLaVA: --vision-lr-scale for the LLaVA's vision tower (0 = frozen)")
    parser.add_argument("--llava-vision-steps", type=int, default=2500)
    parser.add_argument("--llava-language-steps", type=int, default=3000)
    parser.add_argument("--llava-text-layers", type=int, default=LlavaSizes().text_layers,
                        help="LLaVA: the Llama's depth (LlavaSizes)")
    parser.add_argument("--llava-captions", type=float, default=0.8,
                        help="LLaVA language stage: share of the samples that are captions (the rest are questions)")
    parser.add_argument("--llava-look-pool", default="cover", choices=["cover", "box"],
                        help="LLaVA, naming prior: its looks pooled over the patches the object covers, weighted by "
                             "how much (cover), or as personalization pools them, over the object's box (NamingPrior)")
    parser.add_argument("--llava-box-margin", type=float, default=0.0,
                        help="with --llava-look-pool box: each side of the box moved out by up to this fraction")
    parser.add_argument("--skip-clip", action="store_true")
    parser.add_argument("--skip-blip2", action="store_true")
    parser.add_argument("--llava", action="store_true", help="also pretrain the tiny LLaVA")
    parser.add_argument("--jobs", type=int, default=min(len(PARTS), os.cpu_count() or 1),
                        help="parts (BLIP-2, LLaVA, CLIP) pretrained at a time, in child processes (default: one per "
                             "core, at most all three; on 2 cores the LLaVA on one, the BLIP-2 then the CLIP on the "
                             "other); 1 = one after another in this process. Does not change the weights")
    parser.add_argument("--only", choices=PARTS, help="pretrain this part alone (what --jobs runs in each child)")
    parser.add_argument("--report", type=Path, help="where to write the report (default <out>/pretrain_report.json)")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return args


def selected_parts(args) -> list[str]:
    if args.only:
        return [args.only]
    wanted = {"blip2": not args.skip_blip2, "llava": args.llava, "clip": not args.skip_clip}
    return [part for part in PARTS if wanted[part]]


def curve(losses: list[float], every: int = 50) -> list[float]:
    return [round(sum(losses[i : i + every]) / len(losses[i : i + every]), 4) for i in range(0, len(losses), every)]


def run_stages(args, report: dict, stages) -> None:
    """``stages``: (name, steps, peak learning rate, stage); each stage's wall time and loss curve go to ``report``."""
    for name, steps, lr, stage in stages:
        t = time.perf_counter()
        losses = stage(StageConfig(steps=steps, batch_size=args.batch_size, lr=lr, seed=args.seed))
        report["seconds"][name] = round(time.perf_counter() - t, 1)
        report[f"{name}_loss"] = curve(losses)


def save(model, processor, folder: Path, name_vectors: Optional[dict] = None) -> None:
    """The checkpoint folder ``myvlm.load_backbone`` reads; with the naming prior's name vectors
    (``NAME_VECTORS``, for ``scripts/binding_ceiling.py``) where given."""
    folder.mkdir(parents=True, exist_ok=True)
    if name_vectors:
        save_name_vectors(name_vectors, folder / NAME_VECTORS)
    backend = getattr(processor.tokenizer, "_tokenizer", None)  # the fast tokenizer's Rust object
    if backend is not None:
        backend.no_padding()  # prior_slots generated captions (left padding); save the tokenizer as built
    model.to(torch.float16).save_pretrained(folder)  # half the size; loads as float32 on the CPU
    processor.save_pretrained(folder)
    model.to(torch.float32)


def pretrain_blip2(args, data, held_out, report: dict) -> None:
    sizes = Blip2Sizes(qformer_dropout=args.qformer_dropout, num_query_tokens=args.queries)
    model, processor = new_blip2(sizes, seed=args.seed)
    heads, names = {}, {}

    def vision(cfg):
        losses, heads["vision"] = train_vision(model.vision_model, data, cfg, held_out)
        report["vision_accuracy"] = vision_accuracy(model.vision_model, heads["vision"], held_out)
        return losses

    run_stages(args, report, (
        ("vision", args.vision_steps, args.vision_lr, vision),
        ("language", args.language_steps, LANGUAGE_LR,
         lambda cfg: train_language(model, processor, data, cfg, heads.get("vision"), args.vision_lr_scale,
                                     args.naming, same_photo=args.same_photo, held_out=held_out,
                                     placement=report.setdefault("blip2_prior_placement", {}),
                                     locate=args.locate, locate_layer=args.locate_layer, named_weight=args.named_weight,
                                     slots=args.slots, name_noise=args.name_noise, name_vectors=names)),
    ))
    save(model, processor, args.out / "blip2", names)
    t = time.perf_counter()
    report["blip2_caption_accuracy"] = caption_accuracy(args.out / "blip2", args.eval_n, seed=10_000 + args.seed)
    report["seconds"]["blip2_eval"] = round(time.perf_counter() - t, 1)
    logger.info("BLIP-2 caption accuracy on fresh scenes: %s", report["blip2_caption_accuracy"]["summary"])


def pretrain_clip(args, report: dict) -> None:
    from safetensors.torch import save_file

    t = time.perf_counter()
    objectives = ClipObjectives(**{k: json.loads(v) for k, v in (pair.split("=", 1) for pair in args.clip_set)})
    clip_data = make_data(args.clip_scenes, args.seed + 1, details=0.3)
    third_view = objectives.look_alikes > 0 or objectives.crops > 0  # look-alike photos (and their crops)
    pairs = object_pairs(args.clip_scenes, args.seed + 3, look_alikes=third_view)
    crops = object_crops(pairs, args.seed + 4) if objectives.crops else None
    stage = StageConfig(steps=args.clip_steps, batch_size=args.clip_batch, seed=args.seed)
    clip, losses = train_clip(clip_data, stage, pairs, objectives, pooling=args.clip_pool, crops=crops)
    save_file({k: v.half().contiguous() for k, v in clip.state_dict().items() if k.startswith("visual.")},
              str(args.out / "clip.safetensors"),
              metadata={"pool_type": args.clip_pool} if args.clip_pool != "tok" else None)  # none = class token
    report["seconds"]["clip"] = round(time.perf_counter() - t, 1)
    report["clip_loss"] = curve(losses)
    report["clip_objectives"] = {**asdict(objectives), "pool": args.clip_pool}


def pretrain_llava(args, data, held_out, report: dict) -> None:
    from myvlm import BackboneConfig, load_backbone

    model, processor = new_llava(LlavaSizes(text_layers=args.llava_text_layers), seed=args.seed)
    heads, names = {}, {}

    def vision(cfg):
        losses, heads["vision"] = train_vision(model.model.vision_tower, data, cfg, held_out)
        report["llava_vision_accuracy"] = vision_accuracy(model.model.vision_tower, heads["vision"], held_out)
        return losses

    run_stages(args, report, (
        ("llava_vision", args.llava_vision_steps, args.vision_lr, vision),
        ("llava_language", args.llava_language_steps, LANGUAGE_LR,
         lambda cfg: train_llava_language(model, processor, data, cfg, args.llava_naming, args.llava_same_photo,
                                          args.llava_locate, args.llava_locate_layer, held_out, args.llava_named_weight,
                                          report.setdefault("llava_prior_placement", {}), heads.get("vision"),
                                          args.llava_vision_lr_scale, names, args.llava_captions,
                                          args.llava_look_pool, args.llava_box_margin)),
    ))
    save(model, processor, args.out / "llava", names)
    t = time.perf_counter()
    backbone = load_backbone(BackboneConfig(str(args.out / "llava"), device="cpu", dtype="float32"))
    report["llava_caption_accuracy"] = caption_accuracy(backbone, args.eval_n, seed=10_000 + args.seed)
    report["llava_vqa_accuracy"] = vqa_accuracy(backbone, args.eval_n, seed=20_000 + args.seed)
    report["seconds"]["llava_eval"] = round(time.perf_counter() - t, 1)
    logger.info("LLaVA caption accuracy: %s; VQA: %s", report["llava_caption_accuracy"]["summary"],
                report["llava_vqa_accuracy"])


def new_report(args) -> dict:
    """The report's head: the arguments it was run with and an empty table of wall times."""
    return {"args": {k: str(v) for k, v in vars(args).items()}, "seconds": {}}


def run_in_process(args, parts: list[str]) -> dict:
    """The parts one after another; the BLIP-2 and the LLaVA share the rendered scenes where their ``--details``
    and ``--variation`` agree."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    report, started = new_report(args), time.perf_counter()
    rendered: dict[tuple[int, float, float, float], WorldData] = {}

    def scenes(n: int, details: float, variation: float, look_alikes: float) -> WorldData:
        key = (n, details, variation, look_alikes)
        if key not in rendered:
            t = time.perf_counter()
            rendered[key] = make_data(n, args.seed, Blip2Sizes().patch_size, details=details, others=1.0,
                                      variation=variation, look_alikes=look_alikes)
            report["seconds"]["data"] = round(report["seconds"].get("data", 0.0) + time.perf_counter() - t, 1)
        return rendered[key]

    held_out = None
    if "blip2" in parts or "llava" in parts:  # fresh scenes without details, second photos for prior_slots
        held_out = make_data(400, args.seed + 99, Blip2Sizes().patch_size, others=1.0)
    if "blip2" in parts:
        pretrain_blip2(args, scenes(args.n_train, args.details, args.variation, args.look_alikes), held_out, report)
    if "clip" in parts:
        pretrain_clip(args, report)
    if "llava" in parts:
        data = scenes(args.llava_n_train, args.llava_details, args.llava_variation, args.llava_look_alikes)
        pretrain_llava(args, data, held_out, report)
    report["seconds"]["total"] = round(time.perf_counter() - started, 1)
    return report


def run_part(args, part: str) -> dict:
    """This script with ``--only part`` in a child process; its log lines are relayed prefixed with the part."""
    report_path = args.out / f".pretrain_report_{part}.json"
    command = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--only", part, "--jobs", "1",
               "--report", str(report_path)]
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    logger.info("%s: started, its log lines are prefixed [%s]", part, part)
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as child:
        for line in child.stdout:
            sys.stderr.write(f"[{part}] {line}")
    if child.returncode != 0:
        raise RuntimeError(f"pretraining the {part} failed (exit {child.returncode}); its log is above, prefixed [{part}]")
    report = json.loads(report_path.read_text())
    report_path.unlink()
    return report


def run_in_children(args, parts: list[str]) -> dict:
    """``args.jobs`` parts at a time; a failed part does not stop the others (their weights and report are
    kept) and is listed under ``failed`` in the report."""
    started = time.perf_counter()
    report = new_report(args)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {part: pool.submit(run_part, args, part) for part in parts}
    failed = []
    for part, future in futures.items():
        if future.exception() is not None:
            logger.error("%s", future.exception())
            failed.append(part)
            continue
        part_report = future.result()
        report["seconds"][part] = part_report.pop("seconds")
        report.update({k: v for k, v in part_report.items() if k != "args"})
    if failed:
        report["failed"] = failed
    report["seconds"]["total"] = round(time.perf_counter() - started, 1)
    return report


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    parts = selected_parts(args)
    if not parts:
        raise SystemExit("nothing to pretrain: every part is skipped")
    concurrent = args.jobs > 1 and len(parts) > 1
    report = run_in_children(args, parts) if concurrent else run_in_process(args, parts)
    (args.report or args.out / "pretrain_report.json").write_text(json.dumps(report, indent=1) + "\n")
    logger.info("wall times: %s", report["seconds"])
    if report.get("failed"):
        raise SystemExit(f"pretraining failed for {', '.join(report['failed'])}; the other parts' weights and "
                         f"report are in {args.out}")


if __name__ == "__main__":
    main()
