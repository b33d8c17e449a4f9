"""Training the concept embedding: the loss falls, the VLM does not change, checkpoints work."""

from __future__ import annotations

import random

import pytest
import torch

from myvlm.config import AugmentConfig, TrainConfig
from myvlm.data import make_examples
from myvlm.injection import ConceptBank, ConceptInjector
from myvlm.training import check_only_concepts_train, train_concepts

CAPTIONS = [["sks is lying on the beach"], ["sks is on the grass"], ["sks sitting on the sofa"], ["sks in the snow"]]


def caption_loss(backbone, bank, examples):
    batch = backbone.prepare_batch([e.image for e in examples], [e.captions[0] for e in examples])
    with torch.no_grad(), ConceptInjector(backbone, bank) as injector:
        with injector.activate([e.concepts for e in examples]):
            return backbone.sequence_loss(batch).mean().item()


def test_training_lowers_caption_loss_and_freezes_backbone(backbone, photos, tmp_path):
    examples = make_examples(photos, CAPTIONS, name="dog", identifier="sks")
    weights = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    bank = ConceptBank(["dog"], backbone.concept_dim)
    before = caption_loss(backbone, bank, examples)
    config = TrainConfig(steps=30, checkpoint_every=10, augment=AugmentConfig(enabled=False))
    result = train_concepts(backbone, bank, examples, config, output_dir=tmp_path, progress=False)
    after = caption_loss(backbone, bank, examples)
    assert after < before - 0.02, (before, after)
    assert result.steps == 30 and len(result.losses) == 30
    assert all(torch.equal(weights[k], v) for k, v in backbone.model.state_dict().items())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_000010.safetensors", "step_000020.safetensors", "step_000030.safetensors"]


def test_resume_continues_from_checkpoint(backbone, photos, tmp_path):
    examples = make_examples(photos, CAPTIONS, name="dog", identifier="sks")
    config = TrainConfig(steps=4, checkpoint_every=2)
    bank = ConceptBank(["dog"], backbone.concept_dim)
    train_concepts(backbone, bank, examples, config, output_dir=tmp_path, progress=False)
    resumed = ConceptBank(["dog"], backbone.concept_dim)
    result = train_concepts(backbone, resumed, examples, TrainConfig(steps=6), progress=False,
                            resume_from=tmp_path / "checkpoints" / "step_000004.safetensors")
    assert result.steps == 6 and len(result.losses) == 2  # only the two missing steps ran
    cats = make_examples(photos, [["zzk on the sofa"]] * 4, name="cat", identifier="zzk")
    with pytest.raises(ValueError, match="holds concepts"):
        train_concepts(backbone, ConceptBank(["cat"], backbone.concept_dim), cats, config, progress=False,
                       resume_from=tmp_path / "checkpoints" / "step_000004.safetensors")


def test_resume_restores_an_anchored_bank(backbone, photos, tmp_path):
    """An anchored concept's checkpoint holds its anchor too; resuming it into a bank without one fails."""
    examples = make_examples(photos, CAPTIONS, name="dog", identifier="sks")
    anchor = torch.randn(1, backbone.concept_dim)
    bank = ConceptBank(["dog"], backbone.concept_dim, anchors=anchor)
    train_concepts(backbone, bank, examples, TrainConfig(steps=2, checkpoint_every=2), output_dir=tmp_path,
                   progress=False)
    saved = tmp_path / "checkpoints" / "step_000002.safetensors"
    resumed = ConceptBank(["dog"], backbone.concept_dim, anchors=torch.zeros(1, backbone.concept_dim))
    result = train_concepts(backbone, resumed, examples, TrainConfig(steps=2), progress=False, resume_from=saved)
    assert result.steps == 2 and not result.losses
    torch.testing.assert_close(resumed.anchors, anchor)
    torch.testing.assert_close(resumed.token_values(), bank.token_values())
    with pytest.raises(ValueError, match="anchors"):
        train_concepts(backbone, ConceptBank(["dog"], backbone.concept_dim), examples, TrainConfig(steps=2),
                       progress=False, resume_from=saved)


def test_interrupted_training_saves_its_state(backbone, photos, tmp_path, monkeypatch):
    examples = make_examples(photos, CAPTIONS, name="dog", identifier="sks")
    calls = {"n": 0}
    original = backbone.sequence_loss

    def failing(batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(batch)

    monkeypatch.setattr(backbone, "sequence_loss", failing)
    with pytest.raises(KeyboardInterrupt):
        train_concepts(backbone, ConceptBank(["dog"], backbone.concept_dim), examples,
                       TrainConfig(steps=10, checkpoint_every=0), output_dir=tmp_path, progress=False)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000003.safetensors"]


def test_two_concepts_train_in_one_batch(backbone, photos):
    """Each sample carries its own concept: a concept's vector only learns from its own photos."""
    dog = make_examples(photos[:2], CAPTIONS[:2], name="dog", identifier="sks")
    cat = make_examples(photos[2:], [["zzk on the sofa"], ["zzk in the snow"]], name="cat", identifier="zzk")
    bank = ConceptBank(["dog", "cat"], backbone.concept_dim)
    start = bank.values.detach().clone()
    train_concepts(backbone, bank, dog + cat, TrainConfig(steps=3), progress=False)
    assert not torch.equal(bank.values[0], start[0]) and not torch.equal(bank.values[1], start[1])
    only_dog = ConceptBank(["dog", "cat"], backbone.concept_dim, values=start)
    train_concepts(backbone, only_dog, dog, TrainConfig(steps=3, weight_decay=0.0), progress=False)
    assert torch.equal(only_dog.values[1], start[1])  # no photo of "cat": its vector is untouched


def test_only_concepts_may_train(backbone):
    bank = ConceptBank(["dog"], backbone.concept_dim)
    next(backbone.model.parameters()).requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen"):
        check_only_concepts_train(backbone, bank, torch.optim.AdamW([bank.values]))
    backbone.freeze()
    extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(RuntimeError, match="exactly the concept"):
        check_only_concepts_train(backbone, bank, torch.optim.AdamW([bank.values, extra]))


def test_flan_t5_variant_trains(tiny_blip2_t5_path, photos):
    from myvlm import load_backbone

    t5 = load_backbone(str(tiny_blip2_t5_path))
    assert not t5.decoder_only
    examples = make_examples(photos, CAPTIONS, name="dog", identifier="sks")
    bank = ConceptBank(["dog"], t5.concept_dim)
    before = caption_loss(t5, bank, examples)
    train_concepts(t5, bank, examples, TrainConfig(steps=20, augment=AugmentConfig(enabled=False)), progress=False)
    assert caption_loss(t5, bank, examples) < before
    assert all(isinstance(t, str) for t in t5.generate(photos[:2], max_new_tokens=5))


def test_prefetching_changes_nothing_but_timing(backbone, photos):
    """The background producer draws the same random numbers in the same order as the inline path."""
    examples = make_examples(photos, CAPTIONS, name="dog", identifier="sks")
    runs = []
    for prefetch in (False, True):
        torch.manual_seed(0)
        bank = ConceptBank(["dog"], backbone.concept_dim)
        result = train_concepts(backbone, bank, examples, TrainConfig(steps=6, prefetch=prefetch), progress=False)
        runs.append((result.losses, bank.values.detach().clone()))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def test_bfloat16_backbone_trains_with_its_fp32_qformer(tiny_blip2_path, photos):
    """Loaded in bf16, transformers keeps the Q-Former in fp32: injection and training must cope."""
    from myvlm import BackboneConfig, load_backbone

    bf16 = load_backbone(BackboneConfig(str(tiny_blip2_path), dtype="bfloat16"))
    assert bf16.pixel_dtype == torch.bfloat16
    examples = make_examples(photos, CAPTIONS, name="dog", identifier="sks")
    bank = ConceptBank(["dog"], bf16.concept_dim)
    start = bank.values.detach().clone()
    result = train_concepts(bf16, bank, examples, TrainConfig(steps=3), progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses))) and not torch.equal(bank.values.detach(), start)
    assert bank.values.dtype == torch.float32  # the concept itself stays fp32
    with ConceptInjector(bf16, bank) as injector, injector.activate([["dog"]] * 2):
        assert len(bf16.generate(photos[:2], max_new_tokens=3)) == 2


def test_augmentation_flips_as_before_and_says_which_photos_it_mirrored(photos):
    """The flip is drawn as torchvision's RandomHorizontalFlip draws it, so runs without mirrored captions are
    the same as before they existed; a mirrored photo trains on its mirrored captions."""
    from torchvision.transforms import v2

    from myvlm.data import Augmenter, sample_tasks

    config = AugmentConfig()
    reference = v2.Compose([v2.RandomHorizontalFlip(p=config.hflip_p), v2.ColorJitter(brightness=config.brightness),
                            v2.RandomRotation(degrees=config.rotation_degrees)])
    torch.manual_seed(0)
    expected = [reference(photos[0]) for _ in range(12)]
    torch.manual_seed(0)
    seen = [Augmenter(config).apply(photos[0]) for _ in range(12)]
    assert all(list(a.getdata()) == list(b.getdata()) for a, (b, _) in zip(expected, seen))
    assert 0 < sum(flipped for _, flipped in seen) < 12
    unflipped = Augmenter(AugmentConfig(hflip_p=0.0)).apply(photos[0])
    assert unflipped[1] is False

    examples = make_examples(photos[:2], [["sks left of a cat"], ["sks above a cat"]], name="dog", identifier="sks",
                             mirrored=[["a cat left of sks"], []])
    assert examples[0].mirrored_captions == ["a cat left of sks"] and examples[1].mirrored_captions == []
    _, targets = sample_tasks(examples, [0, 1, 0, 1], random.Random(0), mirrored=[True, True, False, False])
    assert targets == ["a cat left of sks", "sks above a cat", "sks left of a cat", "sks above a cat"]
    with pytest.raises(ValueError, match="mirrored"):
        make_examples(photos[:1], [["sks left of a cat"]], name="dog", identifier="sks", mirrored=[["a cat"]])
