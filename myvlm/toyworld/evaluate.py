"""Measuring the toy world's models: base caption accuracy on fresh scenes.

    from myvlm.toyworld.evaluate import caption_accuracy
    caption_accuracy(toyworld_blip2(), n=300)   # {"summary": {"exact": ..., "category": ...}, "by_count": ...}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import numpy as np

from myvlm.toyworld.pretrain import caption_scores, summarise
from myvlm.toyworld.scenes import caption, render, sample_scene


def caption_accuracy(backbone: Union[str, Path, Any], n: int = 300, seed: int = 10_000,
                     batch_size: int = 50) -> dict[str, Any]:
    """Greedy captions of ``n`` fresh scenes (seeded apart from pretraining) scored per attribute."""
    from myvlm import BackboneConfig, load_backbone

    if isinstance(backbone, (str, Path)):
        backbone = load_backbone(BackboneConfig(str(backbone), device="cpu", dtype="float32"))
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    truths = [caption(s) for s in scenes]
    predictions: list[str] = []
    for start in range(0, n, batch_size):
        predictions += backbone.generate([render(s) for s in scenes[start : start + batch_size]])
    rows = [caption_scores(p, t) for p, t in zip(predictions, truths)]
    counts = sorted({len(s.objects) for s in scenes})
    by_count = {f"{k} objects": summarise([r for r, s in zip(rows, scenes) if len(s.objects) == k]) for k in counts}
    return {"summary": summarise(rows), "n": n, "by_count": by_count,
            "examples": [{"truth": t, "predicted": p} for t, p in list(zip(truths, predictions))[:10]]}


def vqa_accuracy(backbone: Any, n: int = 200, seed: int = 20_000, batch_size: int = 50) -> dict[str, Any]:
    """Exact-answer accuracy on one random scene question per fresh scene, by question type."""
    from myvlm.toyworld.questions import scene_questions

    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    pairs = [scene_questions(s, rng) for s in scenes]
    picked = [p[int(rng.integers(len(p)))] for p in pairs]
    answers: list[str] = []
    for start in range(0, n, batch_size):
        chunk = range(start, min(n, start + batch_size))
        answers += backbone.generate([render(scenes[i]) for i in chunk],
                                     [backbone.question_prompt(picked[i][0]) for i in chunk])
    by_type: dict[str, list[bool]] = {}
    for (question, truth), answer in zip(picked, answers):
        kind = ("presence" if question.startswith("Is ") else "shape" if question.startswith("What shape")
                else "background" if "background" in question else "count")
        by_type.setdefault(kind, []).append(answer.strip().rstrip(".").lower() == truth)
    return {k: round(float(np.mean(v)), 4) for k, v in by_type.items()} | {
        "all": round(float(np.mean([a.strip().rstrip(".").lower() == t for (_, t), a in zip(picked, answers)])), 4)}
