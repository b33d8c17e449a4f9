"""The toy world: deterministic scenes and captions, personal concepts, the shipped tiny models, MyVLM recall."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from myvlm.toyworld.concepts import (
    CONCEPTS, concept_photos, hard_negative_photos, target_caption, unrelated_photos,
)
from myvlm.toyworld.pretrain import caption_scores, make_data, summarise
from myvlm.toyworld.scenes import (
    NAME_OF, NAMED, NAMES, SIZE, caption, parse_caption, render, sample_scene,
)


def test_scenes_are_deterministic_and_captions_parse():
    first = [sample_scene(np.random.default_rng(5)) for _ in range(2)]
    again = [sample_scene(np.random.default_rng(5)) for _ in range(2)]
    assert [caption(s) for s in first] == [caption(s) for s in again]
    assert np.array_equal(np.asarray(render(first[0])), np.asarray(render(again[0])))
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(200):
        scene = sample_scene(rng)
        text = caption(scene)
        parsed = parse_caption(text)
        assert parsed is not None and len(parsed["objects"]) == len(scene.objects), text
        assert parsed["background"] == scene.background and parsed["relation"] == scene.relation
        counts.add(len(scene.objects))
    assert counts == {1, 2, 3}


def test_caption_order_follows_the_layout():
    rng = np.random.default_rng(1)
    for _ in range(100):
        scene = sample_scene(rng, n_objects=2)
        (x0, y0), (x1, y1) = (o.centre for o in scene.objects)
        assert (y0 < y1) if scene.relation == "above" else (x0 < x1)


def test_named_objects_are_distinct_and_one_token_each():
    from myvlm.toyworld.models import build_tokenizer

    assert len(NAMED) == len(NAMES) and len(NAME_OF) == len(NAMES)
    tokenizer = build_tokenizer()
    rng = np.random.default_rng(3)
    words = {w for _ in range(300) for w in caption(sample_scene(rng)).replace(",", "").split()} | set(NAMES)
    for word in words:
        assert len(tokenizer(f" {word}", add_special_tokens=False).input_ids) == 1, word


def test_personal_concepts_are_unnamed_and_distinct():
    assert len(CONCEPTS) >= 10
    looks = {c.appearance.key() for c in CONCEPTS}
    assert len(looks) == len(CONCEPTS)
    for concept in CONCEPTS:
        assert concept.appearance.detail is not None  # no pretraining object has a detail
        assert concept.identifier in NAMES and NAMED[concept.identifier].category == concept.class_word
    assert len({c.identifier for c in CONCEPTS}) == len(CONCEPTS)


def test_concept_photos_vary_and_negatives_share_the_class():
    concept = CONCEPTS[3]
    photos = concept_photos(concept, "train", 4)
    again = concept_photos(concept, "train", 4)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (a, _), (b, _) in zip(photos, again))
    assert len({np.asarray(im).tobytes() for im, _ in photos}) == 4
    for _, scene in photos:
        assert concept.identifier in target_caption(scene).split()
        assert sum(o.concept == concept.name for o in scene.objects) == 1
    test = concept_photos(concept, "test", 4)
    assert not any(np.array_equal(np.asarray(a), np.asarray(b)) for a, _ in photos for b, _ in test)
    for _, scene in hard_negative_photos(concept, "test", 10):
        looks = [o.appearance for o in scene.objects if o.appearance.category == concept.class_word]
        assert looks and all(a.key() != concept.appearance.key() for a in looks)
        assert concept.identifier not in caption(scene).split()
    for _, scene in unrelated_photos(concept, "test", 10):
        assert concept.identifier not in caption(scene).split()
    for photos_of in (concept_photos, hard_negative_photos, unrelated_photos):
        with pytest.raises(ValueError, match="unknown photo pool 'tset'"):
            photos_of(concept, "tset", 1)


def test_caption_scores_per_attribute():
    truth = "a small red circle above zib on a striped background"
    perfect = summarise([caption_scores(truth, truth)])
    assert all(v == 1.0 for v in perfect.values())
    wrong = summarise([caption_scores("a small blue circle above zib on a dotted background", truth)])
    assert wrong["look"] == 0.0 and wrong["name"] == 1.0 and wrong["background"] == 0.0 and wrong["category"] == 1.0 and wrong["exact"] == 0.0
    assert summarise([caption_scores("gibberish", truth)])["count"] == 0.0


def test_object_labels_and_second_photos():
    from myvlm.toyworld.pretrain import OBJECT_FIELDS, _object_labels

    data = make_data(6, seed=0, others=1.0)
    assert data.pixels.shape == (6, 64, 64, 3) and data.cover.shape == (6, 3, 16)
    assert data.objects.shape == (6, 3, len(OBJECT_FIELDS))
    for i, scene in enumerate(data.scenes):
        n = len(scene.objects)
        assert (data.cover[i, :n].sum(axis=1) > 0).all() and (data.cover[i, n:] == 0).all()
        assert (data.objects[i, n:] == -1).all()
        assert [list(row) for row in data.objects[i, :n]] == [_object_labels(o) for o in scene.objects]
        assert 0 <= data.other_object[i] < n and data.other_cover[i].sum() > 0  # others=1: every scene has one
        assert not np.array_equal(data.other_pixels[i], data.pixels[i])
        _, masks = render(scene, with_masks=True)
        for k, mask in enumerate(masks):  # each box holds its object's mask, tightly
            left, top, right, bottom = (data.boxes[i, k] * SIZE).round().astype(int)
            inside = mask[top:bottom, left:right] > 0.5
            assert inside.sum() == (mask > 0.5).sum() and inside[0].any() and inside[:, -1].any()
        assert (data.boxes[i, n:] == 0).all()
        covered = np.nonzero(data.other_cover[i].reshape(4, 4) > 0.1)  # patches the second photo's object covers
        left, top, right, bottom = data.other_box[i] * 4  # the box in patch units
        assert (covered[0] >= np.floor(top)).all() and (covered[0] < np.ceil(bottom)).all()
        assert (covered[1] >= np.floor(left)).all() and (covered[1] < np.ceil(right)).all()


def test_naming_prior_pools_its_looks_over_the_box_when_asked():
    """look_pool="box": the look is the plain mean over the patches myvlm.look would pool for the object's box
    (as a concept's look is pooled at personalization); the margin only grows the box."""
    from myvlm.injection import box_mask
    from myvlm.toyworld.pretrain import NamingPrior, pool

    data = make_data(8, seed=3, others=1.0)
    idx = np.arange(8)
    tokens = {}

    def patch_features(pixels):
        tokens["last"] = torch.randn(len(pixels), 16, 6, generator=torch.Generator().manual_seed(len(pixels)))
        return tokens["last"]

    for same in (1.0, 0.0):
        prior = NamingPrior(6, 1.0, seed=0, same_photo=same, look_pool="box")
        prior.prepare(patch_features, data, idx, list(range(8)))
        boxes = data.boxes[idx, data.other_object] if same else data.other_box
        weights = torch.stack([box_mask(16, tuple(map(float, b))).float() for b in boxes])
        assert torch.allclose(prior.features, pool(tokens["last"], weights[:, None])[:, 0], atol=1e-6)
        cover = torch.from_numpy(data.cover[idx, data.other_object] if same else data.other_cover)
        assert not torch.allclose(prior.features, pool(tokens["last"], cover[:, None])[:, 0], atol=1e-3)
    grown = NamingPrior(6, 1.0, seed=0, look_pool="box", box_margin=0.3)._box_weights(data.other_box, 16)
    exact = NamingPrior(6, 1.0, seed=0, look_pool="box")._box_weights(data.other_box, 16)
    assert (grown >= exact).all() and grown.sum() > exact.sum()
    with pytest.raises(ValueError, match="look_pool"):
        NamingPrior(6, 1.0, seed=0, look_pool="crop")


def test_variation_draws_scenes_as_the_concept_photos_vary():
    from myvlm.toyworld.scenes import PHOTO_VARIATION

    plain, photos = make_data(30, seed=4), make_data(30, seed=4, variation=1.0)
    assert all(o.scale == 1.0 for s in plain.scenes for o in s.objects)  # no scale jitter by default
    low, high = PHOTO_VARIATION["lighting"]
    assert all(low <= s.lighting <= high for s in photos.scenes)
    assert all(o.scale != 1.0 and abs(o.angle) <= PHOTO_VARIATION["pose"] for s in photos.scenes for o in s.objects)
    assert max(abs(o.angle) for s in photos.scenes for o in s.objects) > 20.0  # beyond the default pose range
    rng = np.random.default_rng(4)  # at 0 no extra draw: the default data stay what the shipped weights saw
    assert plain.captions == [caption(sample_scene(rng)) for _ in range(30)]


def test_look_alike_scenes_name_the_patterned_object_beside_its_look_alike():
    """``make_data(look_alikes=...)``: a patterned object beside one of its category that differs only in colours
    or pattern, and the second photo (what the naming prior names) of that object; at 0 the data are unchanged."""
    mixed = make_data(40, seed=6, others=1.0, look_alikes=0.5)
    rng = np.random.default_rng(6)  # at 0 no extra draw: the default data stay what the shipped BLIP-2 saw
    assert make_data(30, seed=6, look_alikes=0.0).captions == [caption(sample_scene(rng)) for _ in range(30)]
    alike = [i for i, s in enumerate(mixed.scenes) if any(o.concept == "look-alike" for o in s.objects)]
    assert 10 <= len(alike) <= 30
    for i in alike:
        scene, k = mixed.scenes[i], int(mixed.other_object[i])
        look = scene.objects[k]
        assert look.concept == "look-alike" and look.appearance.pattern and look.name is None
        a = look.appearance

        def differs_in_one(b):  # same category; other colours or another pattern, not both
            same_pattern, same_colours = b.pattern == a.pattern, (b.fill, b.second) == (a.fill, a.second)
            return b.category == a.category and same_pattern != same_colours

        assert any(differs_in_one(o.appearance) and o.name is None for o in scene.objects)
        assert 2 <= len(scene.objects) <= 3
        assert mixed.other_cover[i].sum() > 0  # the second photo shows it


def test_look_alike_photos_swap_only_the_shared_object():
    """The CLIP stage's third view: the anchor photo with its shared object replaced by one of the same
    category that differs in colours, pattern or detail; everything else in the scene is kept."""
    from myvlm.toyworld.pretrain import object_pairs

    anchor, other, swapped = object_pairs(8, seed=5, look_alikes=True)
    for a, b, c in zip(anchor.scenes, other.scenes, swapped.scenes):
        shared = [k for k, o in enumerate(a.objects) if o.concept == "pair"]
        assert len(shared) == 1 and any(o.appearance == a.objects[shared[0]].appearance for o in b.objects)
        k = shared[0]
        assert c.background == a.background and c.seed == a.seed and len(c.objects) == len(a.objects)
        assert c.objects[k].appearance.category == a.objects[k].appearance.category
        assert c.objects[k].appearance != a.objects[k].appearance and c.objects[k].name is None
        assert all(c.objects[j] == a.objects[j] for j in range(len(a.objects)) if j != k)


def test_object_crops_zoom_on_the_shared_object():
    """The CLIP's crop views: a 24-40 px square holding the pair's object, zoomed back to 64 px; the look-alike
    view is cut with its anchor's box, so the two crops differ only where the object differs."""
    from PIL import Image

    from myvlm.toyworld.pretrain import crop_boxes, object_crops, object_pairs

    pairs = object_pairs(6, seed=5, look_alikes=True)
    boxes, crops = crop_boxes(pairs, seed=1), object_crops(pairs, seed=1)
    assert [c.shape for c in crops] == [(6, 64, 64, 3)] * 3 and boxes[2] == boxes[0]
    for view, view_boxes, view_crops in zip(pairs, boxes, crops):
        for scene, pixels, (left, top, right, bottom), crop in zip(view.scenes, view.pixels, view_boxes, view_crops):
            cx, cy = next(o.centre for o in scene.objects if o.concept == "pair")
            assert 24 <= right - left == bottom - top <= 40 and 0 <= left and right <= 64 and 0 <= top and bottom <= 64
            assert left <= cx <= right and top <= cy <= bottom
            zoomed = Image.fromarray(pixels).crop((left, top, right, bottom)).resize((64, 64), Image.BICUBIC)
            assert np.array_equal(crop, np.asarray(zoomed))
    changed = np.abs(crops[0].astype(int) - crops[2].astype(int)).sum(-1) > 60  # (6, 64, 64): anchor vs look-alike
    assert all(0 < frame.mean() < 0.9 for frame in changed)


def test_experimental_clip_objectives_train_and_reload_with_their_pooling(tmp_path):
    """Every CLIP objective runs; a CLIP saved with mean pooling is rebuilt with it by the head's extractor."""
    from safetensors.torch import save_file

    from myvlm.toyworld.models import toyworld_clip
    from myvlm.toyworld.pretrain import ClipObjectives, StageConfig, object_crops, object_pairs, train_clip

    data, pairs = make_data(16, seed=1, details=0.5), object_pairs(16, seed=2, look_alikes=True)
    objectives = ClipObjectives(conjunctions=True, pairs=1.0, objects=1.0, look_alikes=1.0, crops=1.0)
    with pytest.raises(ValueError, match="object_crops"):
        train_clip(data, StageConfig(steps=2, batch_size=8), pairs, objectives)
    clip, losses = train_clip(data, StageConfig(steps=2, batch_size=8), pairs, objectives, pooling="avg",
                              crops=object_crops(pairs, seed=3))
    assert len(losses) == 2 and all(np.isfinite(losses))
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items() if k.startswith("visual.")}, str(path),
              metadata={"pool_type": "avg"})
    extractor = toyworld_clip(str(path))
    assert extractor.model.pool_type == "avg"
    images = [im for im, _ in concept_photos(CONCEPTS[0], "val", 2)]
    expected = clip.encode_image(torch.stack([extractor.preprocess(im) for im in images]))  # (2, D)
    assert torch.allclose(extractor(images), expected, atol=1e-5)


# ---- the shipped pretrained models ----------------------------------------------------------------


def _shipped():
    from myvlm.toyworld.models import BLIP2_DIR, CLIP_FILE

    if not (BLIP2_DIR / "config.json").is_file() or not CLIP_FILE.is_file():
        pytest.skip("no shipped toy-world checkpoints (run scripts/pretrain_toyworld.py)")


@pytest.fixture(scope="module")
def toy_backbone():
    _shipped()
    from myvlm import BackboneConfig, load_backbone
    from myvlm.toyworld.models import toyworld_blip2

    return load_backbone(BackboneConfig(str(toyworld_blip2()), device="cpu", dtype="float32"))


def test_shipped_blip2_captions_fresh_scenes(toy_backbone):
    from myvlm.toyworld.evaluate import caption_accuracy

    report = caption_accuracy(toy_backbone, n=30, seed=123)
    summary, several = report["summary"], report["by_count"]["2 objects"]
    # measured on 300 fresh scenes: background 100%, count 98%, relation 94%, category 93% (chance 25%), look 94%,
    # name 97%; two-object scenes category 94% (54% before the query slots). On these 30: background 100%, count
    # 97%, relation 87%, category 96%, look 94%; two-object scenes: category 96%, look 88% (the BLIP-2 before its ViT
    # read its encoder output: 89% / 81%, 83% / 71%)
    assert summary["background"] >= 0.9 and summary["count"] >= 0.85 and summary["relation"] >= 0.7, summary
    assert summary["category"] >= 0.8 and summary["look"] >= 0.8, summary
    assert several["category"] >= 0.75 and several["look"] >= 0.75, several


def test_personalization_recalls_the_concept(toy_backbone, tmp_path):
    """The fast benchmark: one concept, few steps; the embedding must name it in unseen photos, MyVLM must
    name it wherever its head fires, and stay silent on look-alikes and other scenes."""
    from myvlm import load_concept
    from myvlm.toyworld.bench import BenchConfig, evaluation_sets, measure, personalize_concept
    from myvlm.toyworld.concepts import BY_NAME
    from myvlm.toyworld.demo import DEFAULT_CONCEPT

    concept = BY_NAME[DEFAULT_CONCEPT]
    cfg = BenchConfig(train={"steps": 60}, eval_positives=20, eval_negatives=6, eval_pool="val")
    trained = personalize_concept(toy_backbone, concept, 0, cfg)
    sets = evaluation_sets(concept, cfg)
    metrics, _ = measure(toy_backbone, concept, trained, sets)
    # measured (toy_04, the shipped BLIP-2, TOY_TRAIN): the embedding alone names it in 20/20 (94.7% over the 36-run
    # test benchmark), the head fires on 20/20 and on no negative, recall 20/20. Before, on toy_11 (the head's
    # hardest concept) with the 20000-scene BLIP-2: 20/20, 15/20, recall 15/20.
    assert metrics["oracle_recall"] >= 0.85, metrics
    assert metrics["recall"] >= 0.6 and metrics["recall"] >= metrics["positive_head"] - 0.125, metrics
    assert metrics["negative_identifier"] <= 0.1, metrics
    # the identifier stands in its object's place in most photos with several objects, and there the other objects
    # are described about as the frozen model describes them (measured: in place in all 10, context 0.80 vs 0.83;
    # the BLIP-2 before the ViT read its encoder output: 9 of 10, 0.91 vs 0.86, 0.63 on the misplaced one; toy_11
    # with the 20000-scene BLIP-2: 5 of 9, 0.90 vs 0.90, 0.47). Placed vs misplaced over many photos: the benchmark.
    assert metrics["oracle_slot"] >= 0.7, metrics
    assert metrics["placed_context"] >= metrics["placed_context_base"] - 0.1, metrics
    trained.save(tmp_path / "toy")  # the head's toy-world CLIP is rebuilt from the concept file
    loaded = load_concept(tmp_path / "toy")
    images = [im for im, _ in sets["positive"][:3] + sets["hard_negative"][:3]]
    assert torch.allclose(loaded.head.score(images), trained.head.score(images))


def test_head_alone_fires_on_the_concept_more_than_on_other_scenes():
    """``bench_toyworld.py --head-only``: the toy-world probe fitted on 4 photos, scored on unseen ones."""
    _shipped()
    from myvlm.toyworld.bench import BenchConfig, head_only

    rates = head_only(CONCEPTS[11], BenchConfig(eval_pool="val", eval_positives=10, eval_negatives=10))
    assert set(rates) == {"positive_head", "hard_negative_head", "unrelated_head"}
    # measured: 6/10 positives, 0/10 look-alikes, 0/10 other scenes (93% / 3.8% / 1.3% over 12 concepts x 20;
    # 57% / 15% / 9% before the head scored crops)
    assert rates["positive_head"] >= 0.5 and rates["unrelated_head"] <= 0.1, rates
    assert rates["hard_negative_head"] <= 0.1, rates
    assert rates["positive_head"] > max(rates["hard_negative_head"], rates["unrelated_head"]), rates


@pytest.fixture(scope="module")
def toy_llava():
    from myvlm.toyworld.models import LLAVA_DIR

    if not (LLAVA_DIR / "config.json").is_file():
        pytest.skip("no shipped toy-world LLaVA (run scripts/pretrain_toyworld.py --llava)")
    from myvlm import BackboneConfig, load_backbone

    return load_backbone(BackboneConfig(str(LLAVA_DIR), device="cpu", dtype="float32"))


def test_shipped_llava_captions_and_answers(toy_llava):
    from myvlm.toyworld.evaluate import caption_accuracy, vqa_accuracy

    summary = caption_accuracy(toy_llava, n=30, seed=123)["summary"]
    # measured on 300 fresh scenes: category 91%, look 93%, background 100%, count 99%; VQA 93%
    # (on these 30: category 96%, background 100%, count 100%; VQA 93%)
    assert summary["category"] >= 0.7 and summary["background"] >= 0.85 and summary["count"] >= 0.8, summary
    assert vqa_accuracy(toy_llava, n=30, seed=321)["all"] >= 0.75


def test_llava_personalization_answers_questions_about_the_concept(toy_llava):
    """The fast LLaVA benchmark: with the concept embedding (head forced on), the identifier is named in
    captions and questions about it are answered (measured here: recall 6/6, VQA 12/12 vs 6/12 frozen; over the
    36-run test benchmark of 12 concepts the embedding alone names them in 99.6%, and VQA is 93.3% with the head)."""
    from myvlm.toyworld.bench import BenchConfig, evaluation_sets, measure, personalize_concept

    concept = CONCEPTS[6]
    cfg = BenchConfig(train={"steps": 60}, eval_positives=6, eval_negatives=3, eval_pool="val", head="always",
                      task="vqa")
    trained = personalize_concept(toy_llava, concept, 0, cfg)
    metrics, _ = measure(toy_llava, concept, trained, evaluation_sets(concept, cfg), task="vqa")
    assert metrics["oracle_recall"] >= 0.8 and metrics["vqa_after"] >= 0.8, metrics
    assert metrics["vqa_after"] > metrics["vqa_base"], metrics


def test_pretraining_is_deterministic(tmp_path):
    """Two runs of the pretraining script (a few steps of every stage) write bit-identical weights, whether
    the three parts run one after another in one process (--jobs 1) or two at a time in children (--jobs 2)."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    def run(out, jobs):
        subprocess.run([sys.executable, "scripts/pretrain_toyworld.py", "--out", str(out), "--n-train", "64",
                        "--llava-n-train", "64", "--clip-scenes", "21", "--vision-steps", "3", "--language-steps", "3",
                        "--clip-steps", "2", "--batch-size", "8",
                        "--eval-n", "4", "--threads", "1", "--llava", "--llava-vision-steps", "2",
                        "--llava-language-steps", "2", "--jobs", str(jobs)], check=True, capture_output=True,
                       cwd=Path(__file__).resolve().parents[1])
        return {name: load_file(str(out / name)) for name in ("blip2/model.safetensors", "clip.safetensors",
                                                              "llava/model.safetensors")}

    first, second = run(tmp_path / "a", jobs=1), run(tmp_path / "b", jobs=2)
    for name, tensors in first.items():
        assert tensors.keys() == second[name].keys()
        assert all(torch.equal(tensors[k], second[name][k]) for k in tensors), name
    merged = json.loads((tmp_path / "b" / "pretrain_report.json").read_text())  # the children's reports, merged
    assert {"blip2_caption_accuracy", "llava_caption_accuracy", "clip_loss"} <= merged.keys()
    assert set(merged["seconds"]) == {"blip2", "llava", "clip", "total"}
    assert sorted(path.name for path in (tmp_path / "b").iterdir()) == [
        "blip2", "clip.safetensors", "llava", "pretrain_report.json"]  # no part reports left behind


def test_pretraining_reports_a_failed_part_and_keeps_the_others(tmp_path):
    """--jobs 2 with a part that fails (a BLIP-2 Q-Former dropout above 1): the script exits non-zero naming
    the part, and the part that succeeded (the CLIP) has written its weights and its report."""
    import json

    import subprocess
    import sys

    result = subprocess.run([sys.executable, "scripts/pretrain_toyworld.py", "--out", str(tmp_path), "--n-train", "24",
                             "--llava-n-train", "24", "--clip-scenes", "8", "--clip-steps", "1", "--clip-batch", "8",
                             "--eval-n", "2", "--threads", "1",
                             "--jobs", "2", "--qformer-dropout", "2"],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode != 0
    assert "pretraining failed for blip2" in result.stderr
    assert "[blip2]" in result.stderr and "dropout" in result.stderr  # the child's own error, relayed
    assert (tmp_path / "clip.safetensors").exists() and not (tmp_path / "blip2").exists()
    report = json.loads((tmp_path / "pretrain_report.json").read_text())
    assert report["failed"] == ["blip2"] and "clip_loss" in report and "blip2_caption_accuracy" not in report


def test_concept_slot_checks_where_the_identifier_stands():
    from myvlm.toyworld.bench import concept_slot

    concept = CONCEPTS[0]
    photos = [scene for _, scene in concept_photos(concept, "val", 20)]
    several = next(s for s in photos if len(s.objects) >= 2)
    single = next(s for s in photos if len(s.objects) == 1)
    right = target_caption(several)
    parsed = parse_caption(right)
    index = parsed["objects"].index(concept.identifier)
    swapped = list(parsed["objects"])
    swapped[index], swapped[(index + 1) % len(swapped)] = swapped[(index + 1) % len(swapped)], swapped[index]
    joiner = f" {several.relation} " if len(swapped) == 2 else None
    body = joiner.join(swapped) if joiner else f"{swapped[0]}, {swapped[1]} and {swapped[2]}"
    assert concept_slot(right, several, concept.identifier) is True
    assert concept_slot(f"{body} on a {several.background} background", several, concept.identifier) is False
    assert concept_slot("gibberish", several, concept.identifier) is False
    assert concept_slot(target_caption(single), single, concept.identifier) is None


def test_placement_weights_and_prior_slot_accuracy():
    """The naming prior's placement measure: a caption putting the name in the renamed object's place
    counts, the same caption with the name elsewhere does not; weights single out those scenes."""
    from dataclasses import replace

    from myvlm.toyworld.pretrain import NamingPrior, placement_weights, prior_slot_accuracy

    data = make_data(40, seed=1, others=1.0)
    one = next(s for s in data.scenes if len(s.objects) == 1)
    two = next(s for s in data.scenes if len(s.objects) == 2)
    weights = placement_weights([(two, 3), (two, -1), (one, 3)], 5.0)
    assert weights.tolist() == [5.0, 1.0, 1.0] and placement_weights([(two, 3)], 1.0) is None

    prior = NamingPrior(8, 1.0, seed=0)
    features = lambda pixels: torch.zeros(len(pixels), 16, 8)  # noqa: E731 - the looks do not matter here
    seen = {}

    def truthful(images, names):  # the ground-truth caption with the renamed object called by its name
        rows = seen.setdefault("rows", [i for i, s in enumerate(data.scenes) if len(s.objects) >= 2
                                        and not s.objects[data.other_object[i]].name])
        out = []
        for i, n in zip(rows[seen.get("at", 0):], names):
            scene = data.scenes[i]
            k = int(data.other_object[i])
            objects = [replace(o, name=NAMES[n]) if j == k else o for j, o in enumerate(scene.objects)]
            out.append(caption(replace(scene, objects=objects)))
        seen["at"] = seen.get("at", 0) + len(names)
        return out

    assert prior_slot_accuracy(prior, truthful, features, data, same_photo=1.0) == 1.0
    seen.clear()

    def first_place(images, names):  # the name always first
        return [f"{NAMES[n]} above a red circle on a plain background" for n in names]

    score = prior_slot_accuracy(prior, first_place, features, data, same_photo=0.0)
    assert 0.0 < score < 1.0 and prior.names is None


def test_naming_prior_name_noise_only_in_training():
    """``name_noise``: each training forward draws a fresh direction into the name part of the token (same
    norm, image-token scale); in eval mode, and with no noise, the token is the plain look + name."""
    from myvlm.toyworld.pretrain import NamingPrior

    data = make_data(20, seed=3, others=1.0)
    idx = np.arange(20)
    features = lambda pixels: torch.randn(len(pixels), 16, 8, generator=torch.Generator().manual_seed(0))  # noqa: E731
    image_tokens = torch.full((20, 16, 8), 0.5)
    tokens = {}
    for noise in (0.0, 1.0):
        torch.manual_seed(0)  # the same name table
        prior = NamingPrior(8, 1.0, seed=0, name_noise=noise)
        names = [prior.plan(data, int(i))[1] for i in idx]
        prior.prepare(features, data, idx, names)
        tokens[noise] = [prior.tokens(image_tokens), prior.tokens(image_tokens), prior.eval().tokens(image_tokens)]
    chosen = torch.tensor(names) >= 0
    assert chosen.any() and (~chosen).any()
    plain, noisy = tokens[0.0], tokens[1.0]
    assert torch.equal(plain[0], plain[1]) and torch.equal(plain[0], plain[2])
    assert not torch.allclose(noisy[0][chosen], noisy[1][chosen])  # fresh noise per forward
    assert torch.allclose(noisy[2], plain[0])  # eval: no noise
    assert torch.allclose(noisy[0].norm(dim=-1)[chosen], image_tokens.norm(dim=-1).mean(1)[chosen])
    assert (noisy[0][~chosen] == 0).all()


def test_llava_locator_reads_the_concept_slot(toy_llava):
    """The locate objective reads the LLM's hidden state at the concept slot, after the chosen layer."""
    from PIL import Image

    from myvlm.toyworld.pretrain import NamingPrior, PriorInjector, llava_slot_locator

    data = make_data(3, seed=2, others=1.0)
    prior = NamingPrior(toy_llava.concept_dim, 1.0, seed=0)
    vision = toy_llava.model.model.vision_tower
    prior.prepare(lambda px: vision(pixel_values=px, output_hidden_states=True).hidden_states[-1][:, 1:], data,
                  np.arange(3), [0, -1, 2])
    locator = llava_slot_locator(toy_llava, 1, data.cover.shape[-1])
    captured = {}
    layer = toy_llava.model.model.language_model.layers[1]
    handle = layer.register_forward_hook(lambda m, a, out: captured.update(h=out[0] if isinstance(out, tuple) else out))
    injector = PriorInjector(toy_llava, prior)
    images = [Image.fromarray(p) for p in data.pixels]
    try:
        with injector, injector.activate([[0], [], [0]]), torch.no_grad():
            batch = toy_llava.prepare_batch(images, data.captions)
            _, slots = toy_llava.with_concept_slots(batch)
            toy_llava.sequence_loss(batch)
    finally:
        locator.remove()
        handle.remove()
    expected = captured["h"][torch.arange(3), slots.positions[:, 0]]
    assert torch.equal(locator.states[[0, 2]], expected[[0, 2]])
    chosen = torch.tensor([True, False, True])
    cover = torch.from_numpy(data.cover[np.arange(3), np.maximum(data.other_object, 0)])
    assert 0.0 <= locator.accuracy(cover, chosen) <= 1.0 and locator.loss(cover, chosen) > 0


def test_blip2_locator_reads_the_first_text_state(toy_backbone):
    """The BLIP-2 locate objective reads OPT's hidden state at the BOS after the queries, after the chosen layer,
    and a language stage with the placement objectives adds the locator's loss to the caption loss."""
    from myvlm.toyworld.pretrain import (StageConfig, blip2_locator, caption_batch, train_language)
    from myvlm.toyworld.models import Blip2Sizes, PixelNormaliser, new_blip2

    model = toy_backbone.model
    data = make_data(3, seed=2, others=1.0)
    locator = blip2_locator(model, 1, data.cover.shape[-1])
    captured = {}
    layer = model.language_model.model.decoder.layers[1]
    handle = layer.register_forward_hook(lambda m, a, out: captured.update(h=out[0] if isinstance(out, tuple) else out))
    batch = caption_batch(toy_backbone.tokenizer, model.config.num_query_tokens, model.config.image_token_index,
                          data.captions)
    try:
        with torch.no_grad():
            model(pixel_values=PixelNormaliser()(data.pixels), input_ids=batch["input_ids"],
                  attention_mask=batch["attention_mask"])
    finally:
        locator.remove()
        handle.remove()
    assert torch.equal(locator.states, captured["h"][:, model.config.num_query_tokens])

    sizes = Blip2Sizes(vision_layers=1, qformer_layers=1, text_layers=2, num_query_tokens=4)
    train = make_data(16, seed=3, others=1.0)

    def first_losses(**placement):
        fresh, processor = new_blip2(sizes)
        # from scratch every part starts at std 0.02 (transformers' ViT default, 1e-10, would start it at ~0)
        assert fresh.vision_model.embeddings.patch_embedding.weight.std() > 0.01
        losses = train_language(fresh, processor, train, StageConfig(steps=2, batch_size=8), naming=1.0, **placement)
        assert not any(m._forward_hooks for m in fresh.language_model.model.decoder.layers)  # the locator's hook is gone
        return losses

    placement: dict = {}
    plain, placed = first_losses(), first_losses(locate=0.3, named_weight=5.0, held_out=train, placement=placement)
    assert set(placement) == {"same_photo", "other_photo"}  # measured at the end of the stage, whatever its length
    assert all(np.isfinite(placed))
    assert placed[0] > plain[0] + 0.3 * 0.5  # the locator's loss (about log 16 patches at the start) is in the sum


def test_query_slots_name_the_objects_in_caption_order():
    """The BLIP-2's query slots: slot k's targets are the caption's k-th object; an object the naming prior
    renamed carries the prior's name (only its token can tell it), the others keep their own labels."""
    from myvlm.toyworld.pretrain import NAME_FIELD, NamingPrior, _object_labels, slot_labels
    from myvlm.toyworld.scenes import parse_caption

    data = make_data(30, seed=2, others=1.0)
    idx = np.arange(30)
    prior = NamingPrior(8, 1.0, seed=0)
    plans = [prior.plan(data, int(i)) for i in idx]
    labels = slot_labels(data, idx, plans)
    renamed = [i for i, (_, name) in enumerate(plans) if name >= 0]
    assert renamed and len(renamed) < 30  # objects with a name of their own are never renamed
    for i, (scene, name) in enumerate(plans):
        objects = data.scenes[i].objects
        phrases = parse_caption(caption(scene))["objects"]
        assert len(phrases) == len(objects) and (labels[i, len(objects):] == -1).all()
        for k, obj in enumerate(objects):
            expected = _object_labels(obj)
            if name >= 0 and k == data.other_object[i]:
                expected[NAME_FIELD] = name + 1
                assert phrases[k] == NAMES[name]  # the caption's k-th phrase is that object, by the prior's name
            assert labels[i, k].tolist() == expected
    assert torch.equal(slot_labels(data, idx), torch.from_numpy(data.objects))  # no prior: the scenes' own labels


def test_toy_train_settings_merge_the_augmentation():
    """The toy world's BLIP-2 trains without rotations; overriding another augmentation key keeps that."""
    from myvlm.config import TrainConfig
    from myvlm.toyworld.bench import toy_train

    blip2 = TrainConfig.from_dict(toy_train("blip2", {"steps": 7, "augment": {"hflip_p": 0.0}}))
    assert blip2.steps == 7 and blip2.augment.rotation_degrees == 0.0 and blip2.augment.hflip_p == 0.0
    assert blip2.checkpoint_every == 0 and blip2.lr == TrainConfig().lr
    llava = TrainConfig.from_dict(toy_train("llava"))
    assert llava.init == "look" and llava.augment.rotation_degrees == TrainConfig().augment.rotation_degrees
    rotated = TrainConfig.from_dict(toy_train("blip2", {"augment": {"rotation_degrees": 10.0}}))
    assert rotated.augment.rotation_degrees == 10.0  # an explicit override wins


def test_llava_language_stage_tunes_its_vit_only_when_asked():
    """``train_llava_language``: the vision tower stays frozen by default and is tuned, with its object
    objective, at ``vision_lr_scale``."""
    from myvlm.toyworld.models import LlavaSizes, new_llava
    from myvlm.toyworld.pretrain import ObjectHeads, StageConfig, train_llava_language

    data = make_data(16, seed=3, others=1.0)
    for scale in (0.0, 1.0):
        model, processor = new_llava(LlavaSizes(text_layers=1, vision_layers=1), seed=0)
        vision = model.model.vision_tower
        before = [p.detach().clone() for p in vision.parameters()]
        heads = ObjectHeads(vision.config.hidden_size)
        losses = train_llava_language(model, processor, data, StageConfig(steps=2, batch_size=4), naming=0.5,
                                      heads=heads, vision_lr_scale=scale)
        changed = any(not torch.equal(a, b) for a, b in zip(before, vision.parameters()))
        assert changed == (scale > 0) and len(losses) == 2 and all(np.isfinite(losses))
        assert not any(p.requires_grad for p in model.parameters())  # frozen again afterwards


def test_blip2_vit_starts_with_clips_depth_scaled_init():
    from myvlm.toyworld.models import Blip2Sizes, new_blip2

    vision = new_blip2(Blip2Sizes(vision_layers=2, vision_hidden=64), seed=0)[0].vision_model
    width, depth = 64, 2
    want = {"self_attn.qkv": width ** -0.5 * (2 * depth) ** -0.5, "self_attn.projection": width ** -0.5,
            "mlp.fc1": (2 * width) ** -0.5, "mlp.fc2": width ** -0.5 * (2 * depth) ** -0.5}
    for layer in vision.encoder.layers:
        for name, std in want.items():
            weight = layer.get_submodule(name).weight
            assert abs(weight.std().item() / std - 1) < 0.1, name
    assert abs(vision.embeddings.patch_embedding.weight.std().item() / 0.02 - 1) < 0.1  # the config's 0.02


def test_object_heads_read_the_vision_encoder_before_its_final_norm():
    """The object objective reads each ViT's encoder output: the BLIP-2's tokens before ``post_layernorm``
    (which normalises every token), the LLaVA's CLIP tokens as they are (no final norm on them); the language
    stage's auxiliary objective reads the same tokens from the model's own forward."""
    from myvlm.toyworld.models import Blip2Sizes, LlavaSizes, PixelNormaliser, new_blip2, new_llava
    from myvlm.toyworld.pretrain import ObjectHeads, TunedVision, object_tokens

    pixels = PixelNormaliser()(make_data(2, seed=5).pixels)
    blip2 = new_blip2(Blip2Sizes(vision_layers=1, qformer_layers=1, text_layers=1), seed=0)[0].eval()
    vision = blip2.vision_model
    with torch.no_grad():
        vision.post_layernorm.weight.uniform_(0.5, 2.0)
        tokens = object_tokens(vision, pixels)
        final = vision(pixel_values=pixels).last_hidden_state
    assert tokens.shape == final.shape and not torch.allclose(tokens, final, atol=1e-3)
    torch.testing.assert_close(vision.post_layernorm(tokens), final)

    tower = new_llava(LlavaSizes(vision_layers=1, text_layers=1), seed=0)[0].model.vision_tower.eval()
    with torch.no_grad():
        torch.testing.assert_close(object_tokens(tower, pixels), tower(pixel_values=pixels).last_hidden_state)

    tuned = TunedVision(vision, ObjectHeads(vision.config.hidden_size), lr_scale=1.0)
    try:
        vision.eval()  # TunedVision sets train mode; compare without dropout
        with torch.no_grad():
            vision(pixel_values=pixels)
        torch.testing.assert_close(tuned.tokens, tokens)
    finally:
        tuned.remove()


def test_mirrored_captions_name_the_objects_as_the_mirror_image_shows_them():
    from myvlm.toyworld.scenes import mirrored_caption

    rng = np.random.default_rng(3)
    for _ in range(60):
        scene = sample_scene(rng)
        mirror = [replace(o, centre=(SIZE - o.centre[0], o.centre[1])) for o in scene.objects]
        by_place = sorted(mirror, key=lambda o: o.centre[1] if scene.relation == "above" else o.centre[0])
        assert mirrored_caption(scene) == caption(replace(scene, objects=by_place))
        assert mirrored_caption(scene, names=False) == caption(replace(scene, objects=by_place), names=False)
