"""personalize() and MyVLM end to end on a tiny random BLIP-2, plus the bad-input contract."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import pytest
import torch
from PIL import Image

import myvlm
from myvlm import BackboneNotFoundError, ConceptError, MyVLM, load_concept
from myvlm.config import TrainConfig
from myvlm.heads import AlwaysOnHead, ConceptHead, Detection, register_head
from myvlm.injection import ConceptInjector
from myvlm.images import ImageError

from conftest import random_image, solid_image

QUICK = TrainConfig(steps=4, checkpoint_every=2)
CAPTIONS = [["my_dog is lying on the beach"], ["my_dog on the grass"], ["my_dog on the sofa"], ["my_dog in snow"]]


@register_head("test_redness")
class RednessHead(ConceptHead):
    """Fires on mostly-red images: a stand-in recogniser with a known answer."""

    def __init__(self, threshold: float = 0.5):
        super().__init__(threshold)

    def fit(self, positives: Sequence[Image.Image], negatives: Sequence[Image.Image] = ()) -> None:
        self.fitted = True

    def score(self, images: Sequence[Image.Image]) -> torch.Tensor:
        means = [torch.tensor(list(im.resize((8, 8)).getdata()), dtype=torch.float).mean(0) for im in images]
        return torch.stack([m[0] / (m.sum() + 1e-6) for m in means])

    def config(self) -> dict[str, Any]:
        return {"type": self.head_type, "threshold": self.threshold}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def from_state(cls, config, tensors, **runtime):
        return cls(config["threshold"])


def test_personalize_trains_saves_and_captions(backbone, photos, tmp_path):
    weights = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    concept = myvlm.personalize(photos, name="my_dog", captions=CAPTIONS, backbone=backbone, head="test_redness",
                                train=QUICK, output_dir=tmp_path / "my_dog", progress=False)
    assert concept.embedding.shape == (backbone.concept_dim,)
    assert concept.training["steps"] == 4 and concept.training["config"]["lr"] == 1.0
    assert all(torch.equal(weights[k], v) for k, v in backbone.model.state_dict().items())
    loaded = load_concept(tmp_path / "my_dog")
    assert torch.equal(loaded.embedding, concept.embedding)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".my_dog.run", "my_dog"]  # checkpoints kept beside it

    vlm = MyVLM(backbone, [loaded])
    red, blue = solid_image((250, 10, 10)), solid_image((10, 10, 250))
    results = vlm.caption([red, blue], progress=False)
    assert [r.active for r in results] == [["my_dog"], []]
    assert results[0].detections["my_dog"].fired and not results[1].detections["my_dog"].fired
    vanilla = backbone.generate([red, blue])
    assert results[1].text == vanilla[1]  # no active concept: exactly the vanilla caption
    forced = vlm.caption([blue], force=["my_dog"], progress=False)[0]
    assert forced.active == ["my_dog"]


def test_without_captions_the_vlm_captions_become_targets(backbone, photos, caplog):
    vanilla = backbone.generate(photos)
    word = vanilla[0].split()[0]
    caplog.set_level(logging.INFO, logger="myvlm")
    concept = myvlm.personalize(photos, name="thing", class_word=word, backbone=backbone, head=AlwaysOnHead(),
                                train=QUICK, progress=False)
    assert "frozen VLM's own captions" in caplog.text
    assert concept.class_word == word
    assert f"target {vanilla[0].replace(word, 'sks', 1)!r}" in caplog.text


def test_caption_of_a_concept_free_batch_equals_vanilla(backbone, photos):
    concept = myvlm.Concept(name="c", identifier="sks", kind="object", embedding=torch.randn(backbone.concept_dim),
                            backbone=backbone.describe(), head=RednessHead(threshold=2.0))  # never fires
    results = MyVLM(backbone, [concept]).caption(photos, progress=False)
    assert [r.text for r in results] == backbone.generate(photos)
    assert all(r.active == [] for r in results)


def test_missing_and_empty_image_folders(backbone, tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        myvlm.personalize(tmp_path / "nope", name="x", class_word="dog", backbone=backbone, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="no images in"):
        myvlm.personalize(tmp_path / "empty", name="x", class_word="dog", backbone=backbone, progress=False)


def test_unreadable_image_is_named(backbone, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    random_image(0).save(folder / "good.jpg")
    (folder / "broken.jpg").write_bytes(b"this is no jpeg")
    with pytest.raises(ImageError, match="broken.jpg"):
        myvlm.personalize(folder, name="x", class_word="dog", backbone=backbone, progress=False)


def test_captions_that_never_name_the_concept(backbone, photos, tmp_path):
    bad = [["a dog on the beach"]] + CAPTIONS[1:]
    with pytest.raises(ValueError, match="image #0.*names the concept"):
        myvlm.personalize(photos, name="my_dog", captions=bad, backbone=backbone, head=AlwaysOnHead(),
                          train=QUICK, output_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_identifier_checks(backbone, photos, caplog):
    with pytest.raises(ValueError, match="one word"):
        myvlm.personalize(photos, name="x", identifier="two words", captions=CAPTIONS, backbone=backbone,
                          head=AlwaysOnHead(), train=QUICK, progress=False)
    caplog.set_level(logging.WARNING)
    myvlm.personalize(photos, name="my_dog", identifier="qqzxvbwkjyy", captions=CAPTIONS, backbone=backbone,
                      head=AlwaysOnHead(), train=QUICK, progress=False)
    assert "splits into" in caplog.text and "'sks'" in caplog.text


def test_failed_training_writes_no_concept(backbone, photos, tmp_path, monkeypatch):
    monkeypatch.setattr(backbone, "sequence_loss", lambda batch: torch.tensor([float("nan")] * 4))
    with pytest.raises(FloatingPointError, match="learning rate"):
        myvlm.personalize(photos, name="my_dog", captions=CAPTIONS, backbone=backbone, head=AlwaysOnHead(),
                          train=QUICK, output_dir=tmp_path / "my_dog", progress=False)
    assert not (tmp_path / "my_dog").exists()


def test_offline_hub_id_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneNotFoundError) as info:
        myvlm.load_backbone("Salesforce/blip2-opt-2.7b")
    message = str(info.value)
    assert "Salesforce/blip2-opt-2.7b" in message and "local folder" in message
    with pytest.raises(BackboneNotFoundError, match="does not exist"):
        myvlm.load_backbone("/no/such/folder/blip2")


def test_unknown_forced_concept(backbone):
    with pytest.raises(ConceptError, match="unknown concept"):
        MyVLM(backbone).caption([solid_image((0, 0, 0))], force=["ghost"], progress=False)


def test_same_seed_same_concept_whatever_ran_before(backbone, photos):
    """The initial vector is seeded by TrainConfig.seed, not by the global generator's history."""
    runs = []
    for noise in (1, 5):
        torch.randn(noise * 100)  # other work (e.g. fitting a head) consuming the global generator
        concept = myvlm.personalize(photos, name="my_dog", captions=CAPTIONS, backbone=backbone,
                                    head=AlwaysOnHead(), train=QUICK, progress=False)
        runs.append(concept.embedding)
    assert torch.equal(runs[0], runs[1])
    other = myvlm.personalize(photos, name="my_dog", captions=CAPTIONS, backbone=backbone, head=AlwaysOnHead(),
                              train=TrainConfig(steps=4, checkpoint_every=2, seed=1), progress=False)
    assert not torch.equal(other.embedding, runs[0])


def test_routed_concept_trains_saves_and_is_routed_when_used(backbone, photos, tmp_path):
    train = TrainConfig(steps=2, checkpoint_every=0, route=2.0, route_temperature=0.05)
    concept = myvlm.personalize(photos, name="my_dog", captions=CAPTIONS, backbone=backbone, head="test_redness",
                                train=train, output_dir=tmp_path / "my_dog", progress=False)
    assert concept.route is not None and concept.route.strength == 2.0 and concept.route.temperature == 0.05
    assert concept.route.look.shape == (backbone.concept_dim,)
    loaded = load_concept(tmp_path / "my_dog")
    assert torch.equal(loaded.route.look, concept.route.look) and loaded.route.strength == 2.0
    unrouted = dataclasses.replace(loaded, name="plain", route=None)
    blue = solid_image((10, 10, 250))
    seen = []
    attention = backbone.model.qformer.encoder.layer[0].crossattention.attention
    handle = attention.register_forward_hook(lambda module, args, output: seen.append(output[1][..., -1].clone()))
    try:
        for c in (loaded, unrouted):
            MyVLM(backbone, [c]).caption([blue], force=[c.name], progress=False)
    finally:
        handle.remove()
    # the routed concept's token is read less (a routing pass without it, then the routed pass, then the plain one)
    assert len(seen) == 3 and float(seen[1].sum()) < float(seen[2].sum())


def test_a_routed_concept_is_located_where_its_head_found_it(backbone, photos, monkeypatch):
    train = TrainConfig(steps=1, checkpoint_every=0, route=2.0)
    concept = myvlm.personalize(photos, name="my_dog", captions=CAPTIONS, backbone=backbone, head="test_redness",
                                train=train, progress=False)
    box = (0.5, 0.0, 1.0, 0.5)  # the head found it in the top-right quarter
    monkeypatch.setattr(concept.head, "detect", lambda images: [Detection(0.9, 0.5, True, box) for _ in images])
    seen = []
    located = ConceptInjector.route_weights

    def spy(injector, image_tokens):
        seen.append(injector._boxes)
        return located(injector, image_tokens)

    monkeypatch.setattr(ConceptInjector, "route_weights", spy)
    vlm = MyVLM(backbone, [concept])
    images = [solid_image((200, 20, 20)), solid_image((10, 10, 250))]
    results = vlm.caption(images, progress=False)
    assert seen[0] == [[box], [box]]  # the processor resizes the whole photo: the same fractions
    assert results[0].to_dict()["detections"]["my_dog"]["box"] == list(box)
    seen.clear()
    vlm.caption(images, concepts=[], force=["my_dog"], progress=False)  # forced, its head not run: nowhere known
    assert seen[0] is None
