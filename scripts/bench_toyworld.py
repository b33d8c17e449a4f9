"""Benchmark MyVLM on the toy world: concepts x splits, 4 training photos, heads included.

    python scripts/bench_toyworld.py                                   # 12 concepts x 3 splits, tiny BLIP-2, test pool
    python scripts/bench_toyworld.py --concepts toy_00 --splits 1 --pool val --set steps=50
    python scripts/bench_toyworld.py --head-only --pool val --head-positives 4 40   # the concept head alone

Prints one line per (concept, split), then the means, and writes them as JSON (``--out``).
Choose settings on ``--pool val``; report ``--pool test``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from myvlm.toyworld.bench import BenchConfig, aggregate, head_only, run_concept
from myvlm.toyworld.concepts import BY_NAME, CONCEPTS

KEYS = ("recall", "oracle_recall", "positive_head", "negative_identifier", "hard_negative_identifier", "unrelated_identifier",
        "hard_negative_head", "unrelated_head", "context_after", "oracle_context", "context_base", "oracle_slot",
        "placed_context", "placed_context_base", "misplaced_context", "background_after")


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=None, help="model folder (default: the shipped toy-world BLIP-2)")
    parser.add_argument("--injection", default=None, help="where the concept token joins (backbone default if unset), "
                        "e.g. projector_output for LLaVA")
    parser.add_argument("--concepts", nargs="*", default=None, help="concept names (default: all)")
    parser.add_argument("--splits", type=int, default=3, help="training-photo splits per concept")
    parser.add_argument("--pool", default="test", choices=["val", "test"])
    parser.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides, e.g. steps=50 augment.hflip_p=0")
    parser.add_argument("--probe", nargs="*", default=[], help="ClipProbeHead overrides, e.g. threshold=0.7")
    parser.add_argument("--head", default=None, help="head registry name instead of the toy-world clip_probe "
                        "(e.g. 'always' to measure the embedding alone)")
    parser.add_argument("--clip", default=None, help="toy-world CLIP checkpoint for the head (default: the shipped one)")
    parser.add_argument("--head-only", action="store_true",
                        help="measure the concept head alone (no VLM): fires on unseen positives / look-alikes / scenes")
    parser.add_argument("--head-positives", type=int, nargs="*", default=[4],
                        help="with --head-only: training photos per fit (several values: one table row each)")
    parser.add_argument("--task", default="caption", choices=["caption", "vqa"],
                        help="vqa: also train on and score questions about the concept (LLaVA)")
    parser.add_argument("--plain-flips", action="store_true",
                        help="flipped training photos keep their own captions (before mirrored captions existed)")
    parser.add_argument("--positives", type=int, default=20)
    parser.add_argument("--negatives", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args()


def overrides(pairs: list[str]) -> dict:
    out: dict = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        *parents, leaf = key.split(".")
        node = out
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = parse_value(value)
    return out


def bench_heads(cfg: BenchConfig, concepts: list, positives: list[int], splits: int) -> None:
    """One row per number of training photos: mean head firing rates over concepts x splits."""
    print(f"{'positives':>9} {'recall':>8} {'hard FP':>8} {'other FP':>8}   ({len(concepts)} concepts x {splits} splits)")
    for n in positives:
        started = time.perf_counter()
        rows = [head_only(c, cfg, n, start=n * split) for c in concepts for split in range(splits)]
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        print(f"{n:>9} {mean['positive_head']:>8.1%} {mean['hard_negative_head']:>8.1%} {mean['unrelated_head']:>8.1%}"
              f"   ({time.perf_counter() - started:.0f} s)", flush=True)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    from myvlm import BackboneConfig, load_backbone
    from myvlm.toyworld.models import toyworld_blip2

    cfg = BenchConfig(train=overrides(args.set), probe=overrides(args.probe), eval_pool=args.pool,
                      eval_positives=args.positives, eval_negatives=args.negatives, head=args.head,
                      task=args.task, clip=args.clip, mirrored_captions=not args.plain_flips)
    concepts = [BY_NAME[n] for n in args.concepts] if args.concepts else list(CONCEPTS)
    if args.head_only:
        bench_heads(cfg, concepts, args.head_positives, args.splits)
        return
    backbone = load_backbone(BackboneConfig(args.backbone or str(toyworld_blip2()), device="cpu", dtype="float32",
                                             injection=args.injection))
    results, started = [], time.perf_counter()
    keys = list(KEYS) + (["vqa_after", "vqa_base"] if args.task == "vqa" else [])
    print(f"{'concept':<8} {'split':>5} " + " ".join(f"{k[:12]:>12}" for k in keys), flush=True)
    for concept in concepts:
        for split in range(args.splits):
            r = run_concept(backbone, concept, split, cfg)
            results.append(r)
            print(f"{r.concept:<8} {split:>5} " + " ".join(f"{r.metrics[k]:>12.2f}" for k in keys)
                  + f"  ({r.seconds:.0f} s) {r.examples[0]['after']!r}", flush=True)
    summary = aggregate(results)
    print("mean     " + "      " + " ".join(f"{summary[k]:>12.3f}" for k in keys))
    print(f"{len(results)} runs in {time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"config": vars(args) | {"out": str(args.out)}, "summary": summary,
                                        "runs": [r.__dict__ for r in results]}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
