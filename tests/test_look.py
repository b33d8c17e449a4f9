"""Starting a concept vector from the concept's look: which tokens, which box, and personalize(init="look")."""

from __future__ import annotations

import pytest
import torch

import myvlm
from myvlm.config import TrainConfig
from myvlm.heads import AlwaysOnHead, Detection
from myvlm.look import WHOLE, box_mask, head_boxes, image_tokens, look_vector, look_vectors, seen_box

from conftest import random_image

CAPTIONS = [["sks on the grass"], ["sks on the sofa"], ["sks in snow"], ["sks at home"]]


def test_box_mask_picks_the_patches_whose_centres_lie_in_the_box():
    top_left = box_mask(16, (0.0, 0.0, 0.5, 0.5))  # 4 x 4 grid
    assert top_left.reshape(4, 4)[:2, :2].all() and top_left.sum() == 4
    with_class = box_mask(17, (0.5, 0.0, 1.0, 0.25))  # class token first, then 4 x 4
    assert not with_class[0] and with_class[1:].reshape(4, 4)[0, 2:].all() and with_class.sum() == 2
    thin = box_mask(16, (0.3, 0.3, 0.32, 0.32))  # narrower than a patch: the patch its centre is in
    assert thin.sum() == 1 and thin.reshape(4, 4)[1, 1]
    assert box_mask(16, WHOLE).all()
    assert box_mask(11, WHOLE) is None  # neither g*g nor 1 + g*g tokens: not a grid


def test_image_tokens_are_the_encoder_output_the_qformer_reads(backbone):
    images = [random_image(0), random_image(1)]
    tokens = image_tokens(backbone, images)
    pixels = backbone.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = backbone.model.vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(tokens, expected)
    # whole images: the mean patch token (class token left out), averaged over the images
    torch.testing.assert_close(look_vector(backbone, images), expected[:, 1:].mean(dim=1).mean(dim=0))
    half = look_vector(backbone, images, [(0.0, 0.0, 1.0, 0.5)] * 2)
    grid = int((expected.shape[1] - 1) ** 0.5)
    top = expected[:, 1:].reshape(2, grid, grid, -1)[:, : grid // 2]
    torch.testing.assert_close(half, top.mean(dim=(1, 2)).mean(dim=0))
    with pytest.raises(ValueError, match="boxes"):
        look_vector(backbone, images, [WHOLE])
    # one row per image, each inside its own box: the top half of the first, the whole second
    rows = look_vectors(backbone, images, [(0.0, 0.0, 1.0, 0.5), WHOLE])
    torch.testing.assert_close(rows, torch.stack([top[0].mean(dim=(0, 1)), expected[1, 1:].mean(dim=0)]))


def test_seen_box_follows_the_processors_centre_crop(backbone):
    from transformers import CLIPImageProcessor

    clip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    wide = (200, 100)  # resized to 64 x 32, then the middle 32 x 32: x from 50 to 150 of the photo
    assert seen_box(clip, (0.25, 0.0, 0.75, 1.0), wide) == (0.0, 0.0, 1.0, 1.0)
    assert seen_box(clip, (0.5, 0.5, 1.0, 1.0), wide) == (0.5, 0.5, 1.0, 1.0)  # the right half is cut at 150
    assert seen_box(clip, (0.0, 0.0, 0.2, 1.0), wide) is None  # x 0-40: cropped away
    assert seen_box(clip, (0.0, 0.25, 0.5, 0.75), (100, 100)) == (0.0, 0.25, 0.5, 0.75)  # square: nothing cropped
    assert seen_box(backbone.processor, (0.0, 0.0, 0.2, 1.0), wide) == (0.0, 0.0, 0.2, 1.0)  # BLIP-2 resizes it all


def test_seen_box_keeps_llava_next_boxes_as_its_base_view_is_the_whole_photo():
    from PIL import Image
    from transformers import LlavaNextImageProcessor

    processor = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    wide = Image.new("RGB", (200, 100), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 40, 100))  # the left fifth is red
    assert seen_box(processor, (0.0, 0.0, 0.2, 1.0), wide.size) == (0.0, 0.0, 0.2, 1.0)
    base = processor(images=[wide], return_tensors="pt")["pixel_values"][0, 0]  # (3, 32, 32): the base view
    red = base[0] > base[2]  # (32, 32)
    assert red[:, :5].all() and not red[:, 8:].any()  # the red fifth is still the left fifth: squashed, not cropped


def test_head_boxes_follow_the_crops_the_head_learned():
    class Report:
        regions = ["id", "crop0.5@0:0", "crop0.5@1:1"]

    class Head:
        fit_report = Report()

        def detect(self, images):  # what it finds in other photos: no box said
            return [Detection(1.0, 0.5, True) for _ in images]

    images = [random_image(i, (40, 40)) for i in range(3)]
    assert head_boxes(Head(), images) == [WHOLE, (0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)]
    assert head_boxes(AlwaysOnHead(), images) == [WHOLE] * 3  # no regions: the whole photos
    assert head_boxes(Head(), images[:2]) == [WHOLE] * 2  # regions of other photos are not used


def test_personalize_starts_from_the_look(backbone, photos):
    concept = myvlm.personalize(photos, name="thing", captions=CAPTIONS, backbone=backbone, head=AlwaysOnHead(),
                                train={"steps": 0, "init": "look"}, progress=False)
    torch.testing.assert_close(concept.embedding, look_vector(backbone, photos))
    random = myvlm.personalize(photos, name="thing", captions=CAPTIONS, backbone=backbone, head=AlwaysOnHead(),
                               train={"steps": 0}, progress=False)
    assert not torch.allclose(random.embedding, concept.embedding)
    with pytest.raises(ValueError, match="init"):
        TrainConfig(init="zeros")


def test_anchored_concept_keeps_its_look_and_saves_the_token_it_trained(backbone, photos):
    """init="anchor": the look is fixed and a random vector learns beside it; the saved embedding is the
    sum of both normalised, which gives the very tokens training saw, with no anchor needed to use it."""
    import torch.nn.functional as F

    from myvlm.injection import ConceptBank, ConceptInjector

    look = F.normalize(look_vector(backbone, photos), dim=0)
    start = myvlm.personalize(photos, name="thing", captions=CAPTIONS, backbone=backbone, head=AlwaysOnHead(),
                              train={"steps": 0, "init": "anchor"}, progress=False)
    seeded = ConceptBank(["thing"], backbone.concept_dim, seed=TrainConfig().seed).values[0]
    torch.testing.assert_close(start.embedding, look + F.normalize(seeded, dim=0))
    trained = myvlm.personalize(photos, name="thing", captions=CAPTIONS, backbone=backbone, head=AlwaysOnHead(),
                                train={"steps": 3, "init": "anchor", "augment": {"enabled": False}}, progress=False)
    learned = trained.embedding - look
    assert not torch.allclose(trained.embedding, start.embedding)
    torch.testing.assert_close(learned.norm(), torch.tensor(1.0))  # the look stayed, the unit vector moved

    anchored = ConceptBank(["a", "b"], backbone.concept_dim, seed=1,
                           anchors=torch.stack([look, torch.zeros_like(look)]))  # b: a zero row, no anchor
    plain = ConceptBank(["a", "b"], backbone.concept_dim, values=anchored.token_values().detach())
    torch.testing.assert_close(anchored.token_values()[1], anchored.values[1])
    image_tokens = torch.randn(2, 5, backbone.concept_dim)
    made = []
    for bank in (anchored, plain):
        injector = ConceptInjector(backbone, bank).attach()
        try:
            with injector.activate([["a"], ["b"]]):
                made.append(injector.concept_tokens(image_tokens)[0])
        finally:
            injector.detach()
    torch.testing.assert_close(made[0], made[1])
    with pytest.raises(ValueError, match="anchors have shape"):
        ConceptBank(["a"], backbone.concept_dim, anchors=torch.zeros(2, backbone.concept_dim))
