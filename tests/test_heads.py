"""Concept heads on synthetic images: registry round-trips, probe training, face matching, bad input."""

from __future__ import annotations

import json
import logging
import math
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from myvlm.heads import (
    CachedFeatures,
    ClipProbeHead,
    FaceHead,
    available_heads,
    build_feature_extractor,
    build_head,
    detect_concepts,
    explain,
    generic_negatives,
    load_head,
    match_faces,
    tiny_clip_features,
)
from myvlm.heads.face import Face, FaceBackend, register_face_backend
from myvlm.heads.features import (
    VIEWS, CallableFeatures, LiteRTFeatures, OpenClipFeatures, apply_view, crop_box, crop_grid, crop_view, ensure_rgb,
    fraction_box,
)
from myvlm.heads.negatives import collect_negatives, count_real
from myvlm.images import ImageError, load_image



# --- synthetic images ---------------------------------------------------------------------------

def scene(color, shape: str, seed: int, size: int = 96) -> Image.Image:
    """A `color` `shape` at a random place on a noisy gray background of random brightness."""
    rng = np.random.default_rng(seed)
    pixels = np.full((size, size, 3), rng.integers(60, 200), dtype=np.uint8)
    pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    from PIL import ImageDraw

    x, y = rng.integers(0, size // 2, size=2)
    box = [int(x), int(y), int(x + size // 2), int(y + size // 2)]
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
    return image


def grid_colors(image: Image.Image) -> np.ndarray:
    """A plain callable feature extractor: the mean colour of each cell of a 4x4 grid (48-d)."""
    return (np.asarray(image.convert("RGB").resize((4, 4), Image.BOX), dtype=np.float32) / 255 - 0.5).ravel()


@pytest.fixture(scope="module")
def red_circles():
    return [scene((220, 20, 20), "circle", seed) for seed in range(6)]


@pytest.fixture(scope="module")
def blue_squares():
    return [scene((20, 40, 220), "square", seed) for seed in range(100, 112)]


@pytest.fixture(scope="module")
def tiny():
    return tiny_clip_features(seed=0)


# --- registry, round trip, probe ----------------------------------------------------------------

def test_heads_are_registered_by_importing_the_package():
    assert {"always", "clip_probe", "face"} <= set(available_heads())


def test_probe_separates_two_concepts_with_a_plain_callable(red_circles, blue_squares):
    head = build_head("clip_probe", feature_extractor=grid_colors)
    head.fit(red_circles[:3], blue_squares[:8])
    found = head.detect(red_circles[3:] + blue_squares[8:])
    assert [d.fired for d in found] == [True] * 3 + [False] * 4
    assert all(0.0 <= d.score <= 1.0 and d.threshold == 0.5 for d in found)


def test_probe_round_trips_through_json_and_safetensors(tmp_path, tiny, red_circles, blue_squares):
    head = ClipProbeHead(tiny, threshold=0.7)
    head.fit(red_circles[:3], blue_squares[:8])
    config = json.loads(json.dumps(head.config()))
    save_file(head.state_dict(), tmp_path / "head.safetensors")
    loaded = load_head(config, load_file(tmp_path / "head.safetensors"))  # extractor rebuilt from the config
    images = red_circles[3:] + blue_squares[8:]
    assert torch.equal(loaded.score(images), head.score(images))
    assert loaded.threshold == 0.7 and config["extractor"]["type"] == "open_clip"
    assert [d.fired for d in loaded.detect(images)] == [d.fired for d in head.detect(images)]


def test_probe_fit_is_deterministic_and_reuses_cached_features(red_circles, blue_squares):
    calls = []

    def counting(image):
        calls.append(1)
        return grid_colors(image)

    extractor = CachedFeatures(counting)
    first, second = ClipProbeHead(extractor), ClipProbeHead(extractor)
    first.fit(red_circles[:3], blue_squares[:8])
    encoded = len(calls)
    second.fit(red_circles[:3], blue_squares[:8])
    assert encoded == 3 * len(first.training.positive_views) + 8 * len(first.training.negative_views)
    assert len(calls) == encoded  # the refit never ran the encoder
    assert torch.equal(first.state_dict()["weight"], second.state_dict()["weight"])


def test_threshold_is_overridable_and_saved(red_circles, blue_squares):
    head = ClipProbeHead(grid_colors)
    head.fit(red_circles[:3], blue_squares[:8])
    score = float(head.score(red_circles[3:4])[0])
    head.threshold = score + 1e-3
    assert not head.detect(red_circles[3:4])[0].fired
    head.threshold = score - 1e-3
    assert head.detect(red_circles[3:4])[0].fired
    reloaded = load_head(head.config(), head.state_dict(), feature_extractor=grid_colors)
    assert reloaded.threshold == pytest.approx(score - 1e-3)


def test_probe_refuses_bad_input(red_circles):
    head = ClipProbeHead(grid_colors)
    with pytest.raises(ValueError, match="at least one positive"):
        head.fit([], red_circles)
    with pytest.raises(RuntimeError, match="not fitted"):
        head.score(red_circles)
    with pytest.raises(RuntimeError, match="unfitted"):
        head.config()
    with pytest.raises(ValueError, match="unknown probe training options"):
        ClipProbeHead(grid_colors, training={"stpes": 3})  # sic: a typo must not pass silently


def test_probe_without_negatives_uses_the_drawn_set_and_warns(red_circles, caplog):
    head = ClipProbeHead(grid_colors)
    with caplog.at_level(logging.WARNING):
        head.fit(red_circles[:3])
    assert "real negative photos" in caplog.text
    assert head.config()["fit"]["n_negatives"] == len(generic_negatives())
    assert head.detect(red_circles[3:4])[0].fired


def test_probe_scores_loaded_images_upright_and_rgb(tmp_path, red_circles, blue_squares):
    """Grayscale, CMYK, palette and EXIF-rotated files score like the RGB upright original."""
    head = ClipProbeHead(grid_colors)
    head.fit(red_circles[:3], blue_squares[:8])
    original = red_circles[4]
    rotated = original.rotate(90, expand=True)  # stored sideways, EXIF orientation 6 says "rotate back"
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(tmp_path / "sideways.jpg", exif=exif, quality=100)
    original.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    original.convert("L").save(tmp_path / "gray.png")
    loaded = {name: load_image(tmp_path / name) for name in ("sideways.jpg", "cmyk.jpg", "gray.png")}
    assert loaded["sideways.jpg"].size == original.size and all(im.mode == "RGB" for im in loaded.values())
    raw_exif = Image.open(tmp_path / "sideways.jpg")  # not transposed yet: the head must do it
    scores = head.score([original, loaded["sideways.jpg"], raw_exif, loaded["cmyk.jpg"]])
    assert scores[1:3].tolist() == pytest.approx([float(scores[0])] * 2, abs=0.05)
    assert head.detect([loaded["cmyk.jpg"]])[0].fired
    assert ensure_rgb([Image.open(tmp_path / "gray.png")])[0].mode == "RGB"


def test_huge_images_are_refused_by_name_and_large_ones_work(tmp_path, monkeypatch, red_circles, blue_squares):
    from myvlm import images

    big = red_circles[0].resize((4000, 3000))
    big.save(tmp_path / "big.jpg")
    head = ClipProbeHead(grid_colors)
    head.fit(red_circles[:3], blue_squares[:8])
    assert head.detect([load_image(tmp_path / "big.jpg")])[0].fired
    monkeypatch.setattr(images, "MAX_PIXELS", 1_000_000)
    with pytest.raises(ImageError, match="big.jpg"):
        load_image(tmp_path / "big.jpg")


def test_rotated_views_have_no_empty_corners():
    white = Image.new("RGB", (120, 80), (255, 255, 255))
    for name in list(VIEWS) + list(ClipProbeHead(grid_colors).training.positive_views):
        pixels = np.asarray(apply_view(white, name))
        assert pixels.min() >= 250, name


def test_crop_views_zoom_into_the_named_square_and_compose():
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[16:32, 32:48] = (255, 0, 0)  # a red square filling the crop at (left 32, top 16, side 16)
    image = Image.fromarray(pixels)
    crop = np.asarray(apply_view(image, crop_view(0.25, 0.5, 0.25)))
    assert crop.shape == (64, 64, 3) and crop[..., 0].min() > 200 and crop[..., 2].max() < 30
    grid = crop_grid(0.5, 0.25)  # 32 px every 16 px: 3 x 3 crops
    assert len(grid) == 9 and grid[0] == crop_view(0.5, 0, 0) and grid[-1] == crop_view(0.5, 0.5, 0.5)
    flipped = apply_view(image, crop_view(0.5, 0.5, 0) + ",flip")  # the square's crop, mirrored
    flipped = np.asarray(flipped)[..., 0]  # the square was at the crop's bottom left: now bottom right
    assert flipped[36:, 36:].min() > 200 and flipped[:, :28].max() < 30 and flipped[:28].max() < 30
    wide = np.zeros((100, 200, 3), np.uint8)
    wide[:, 150:] = 255  # the right quarter is white: the grid's last crop (right column) must reach it
    corners = [np.asarray(apply_view(Image.fromarray(wide), view)) for view in crop_grid(0.5, 0.5)]
    assert [c.shape for c in corners] == [(100, 100, 3)] * 4 and corners[1].min() == 255 and corners[0].max() == 0
    with pytest.raises(ValueError, match="unknown augmentation view 'spin'"):
        apply_view(image, "flip,spin")
    with pytest.raises(ValueError, match="bad crop view"):
        apply_view(image, "crop0.5@x")
    with pytest.raises(ValueError, match="fractions of the image"):
        crop_grid(1.5, 0.25)


def colour_histogram(image: Image.Image) -> np.ndarray:
    """A plain callable extractor that ignores where things are: the share of pixels in each of 27 colour bins."""
    levels = np.asarray(image.convert("RGB"), dtype=np.int64) * 3 // 256  # (H, W, 3) in {0, 1, 2}
    bins = np.bincount((levels * [9, 3, 1]).sum(-1).ravel(), minlength=27)
    return (bins / bins.sum()).astype(np.float32)


def cluttered(seed: int, concept: tuple, size: int = 96) -> tuple[Image.Image, tuple[int, int]]:
    """Three 20-px two-colour squares on a noisy gray background, one of them ``concept`` (left half,
    right half colours), in distinct cells of a 4 x 4 grid; returns the image and the concept's centre.
    The others are never red, but may be blue or white."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.integers(90, 160) + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)
    cells = rng.choice(16, size=3, replace=False)
    palette = [(230, 230, 40), (40, 200, 60), (30, 40, 230), (245, 245, 245), (250, 140, 30), (40, 200, 220)]
    looks = [concept] + [tuple(palette[i] for i in rng.choice(len(palette), 2, replace=False)) for _ in range(2)]
    centres = []
    for cell, (left, right) in zip(cells, looks):
        cx, cy = 24 * (cell % 4) + 12 + int(rng.integers(-2, 3)), 24 * (cell // 4) + 12 + int(rng.integers(-2, 3))
        pixels[cy - 10 : cy + 10, cx - 10 : cx] = left
        pixels[cy - 10 : cy + 10, cx : cx + 10] = right
        centres.append((cx, cy))
    return Image.fromarray(pixels), centres[0]


def test_crops_find_a_small_concept_among_others_and_round_trip():
    """A red|blue square among other squares (blue and white ones among them); look-alikes are red|white.
    The whole image's colours cannot tell the two apart; the probe with crops learns which crop of each
    training photo holds the concept and then tells it from its look-alikes."""
    mine, look_alike = ((220, 30, 30), (30, 40, 230)), ((220, 30, 30), (245, 245, 245))
    train = [cluttered(seed, mine) for seed in range(4)]
    negatives = [cluttered(100 + seed, look_alike)[0] for seed in range(30)]
    unseen = [cluttered(200 + seed, mine)[0] for seed in range(12)]
    unseen_look_alikes = [cluttered(300 + seed, look_alike)[0] for seed in range(12)]
    accuracy = {}
    for crops in ([], [[0.25, 0.125], [0.5, 0.25]]):
        head = ClipProbeHead(colour_histogram, crops=crops, training={"lr": 0.1})
        head.fit([image for image, _ in train], negatives)
        detections = head.detect(unseen + unseen_look_alikes)
        fired = [d.fired for d in detections]
        accuracy[len(crops)] = (sum(fired[:12]) + 12 - sum(fired[12:])) / 24
        if not crops:  # a probe on the whole image says nothing of where
            assert all(d.box is None for d in detections)
    assert accuracy[2] >= 0.95 and accuracy[0] <= accuracy[2] - 0.15, accuracy
    assert len(head.regions) == 1 + 49 + 9
    # each detection says where the concept was found: the best crop, as fractions of the image
    found = [cluttered(200 + seed, mine) for seed in range(12)]
    for detection, (_, (cx, cy)) in zip(head.detect([image for image, _ in found]), found):
        left, top, right, bottom = detection.box
        assert left * 96 <= cx <= right * 96 and top * 96 <= cy <= bottom * 96, (detection.box, cx, cy)
    for region, (_, (cx, cy)) in zip(head.fit_report.regions, train):  # the picked crop shows the concept
        left, top, right, bottom = crop_box(region, 96, 96)
        overlap = max(0, min(right, cx + 10) - max(left, cx - 10)) * max(0, min(bottom, cy + 10) - max(top, cy - 10))
        assert overlap >= 0.25 * 20 * 20, (region, cx, cy)  # a quarter of it at least (the blue half is enough)
    config = json.loads(json.dumps(head.config()))
    assert config["crops"] == [[0.25, 0.125], [0.5, 0.25]] and len(config["fit"]["regions"]) == 4
    loaded = load_head(config, head.state_dict(), feature_extractor=colour_histogram)
    assert torch.equal(loaded.score(unseen), head.score(unseen))


# --- negatives ----------------------------------------------------------------------------------

def test_generic_negatives_are_deterministic_varied_and_tagged():
    first, again = generic_negatives(10, seed=3), generic_negatives(10, seed=3)
    assert [np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in zip(first, again)] == [True] * 10
    assert len({np.asarray(im).tobytes() for im in first}) == 10
    assert all(im.mode == "RGB" for im in first) and count_real(first) == 0


def test_negatives_folder_errors_name_the_folder(tmp_path, blue_squares):
    empty = tmp_path / "not_my_mug"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ImageError, match="not_my_mug"):
        collect_negatives(empty)
    with pytest.raises(ImageError, match="not found"):
        collect_negatives(tmp_path / "missing")
    blue_squares[0].save(empty / "a.png")
    assert count_real(collect_negatives(empty, generic=5)) == 1
    library = {"mine": [blue_squares[1]], "other": blue_squares[2:4]}
    assert count_real(collect_negatives(library_concepts=library, exclude=["mine"], generic=0)) == 2
    with pytest.raises(ValueError, match="no negatives"):
        collect_negatives(library_concepts={}, generic=0)


# --- extractors ---------------------------------------------------------------------------------

def test_tiny_open_clip_is_rebuilt_identically_from_its_description(tiny, red_circles):
    rebuilt = build_feature_extractor(json.loads(json.dumps(tiny.describe())))
    features = tiny(red_circles[:2])
    assert features.shape == (2, 64)
    assert torch.equal(rebuilt(red_circles[:2]), features)


def test_extractor_errors_say_what_to_do(tmp_path):
    with pytest.raises(RuntimeError, match=r"pretrained='/path/to/open_clip_model.safetensors'"):
        OpenClipFeatures("ViT-B-32", pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match="missing.tflite"):
        LiteRTFeatures(tmp_path / "missing.tflite")
    with pytest.raises(ValueError, match="feature_extractor="):
        build_feature_extractor({"type": "callable", "name": "grid_colors"})
    assert CallableFeatures(grid_colors).describe() == {"type": "callable", "name": "grid_colors"}


def test_probe_separates_two_concepts_with_a_random_weight_clip(tiny, red_circles, blue_squares):
    head = ClipProbeHead(tiny)
    head.fit(red_circles[:3], blue_squares[:8])
    assert [d.fired for d in head.detect(red_circles[3:] + blue_squares[8:])] == [True] * 3 + [False] * 4


# --- faces with a fake backend: a 2x2 grid, each non-gray cell is a face, its colour the identity ---

@register_face_backend("grid")
class GridFaces(FaceBackend):
    metric = "euclidean"
    default_threshold = 0.2

    def _find_faces(self, image):
        pixels = np.asarray(image.resize((2, 2), Image.BOX), dtype=np.float32) / 255  # (2, 2, 3) cell means
        faces = []
        for row in range(2):
            for col in range(2):
                if np.abs(pixels[row, col] - 0.5).max() > 0.05:
                    box = (col * 64.0, row * 64.0, col * 64.0 + 64, row * 64.0 + 64)
                    faces.append(Face(box, 1.0, torch.tensor(pixels[row, col])))
        return faces


PEOPLE = {"ann": (230, 30, 30), "ann_twin": (200, 50, 50), "bob": (30, 30, 230), "cy": (30, 200, 30)}


def grid(*cells, source=None):
    """A photo with the people in `cells` (names or None, row-major 2x2 grid)."""
    image = Image.new("RGB", (128, 128), (128, 128, 128))
    for index, person in enumerate(cells):
        if person:
            jitter = (index * 3) % 7
            color = tuple(min(255, c + jitter) for c in PEOPLE[person])
            image.paste(color, (index % 2 * 64, index // 2 * 64, index % 2 * 64 + 64, index // 2 * 64 + 64))
    if source:
        image.info["source"] = source
    return image


def test_face_head_recognises_the_person_and_round_trips():
    head = FaceHead("grid")
    head.fit([grid("ann"), grid(None, "ann"), grid(None, None, "ann")])
    assert head.threshold == 0.2 and not head.higher_is_present
    found = head.detect([grid(None, None, None, "ann"), grid("bob"), grid()])
    assert [d.fired for d in found] == [True, False, False]
    assert math.isinf(found[2].score)  # no face at all
    loaded = load_head(json.loads(json.dumps(head.config())), head.state_dict())
    assert torch.equal(loaded.score([grid("bob", "ann")]), head.score([grid("bob", "ann")]))
    assert load_head(head.config(), head.state_dict(), face_backend=head.backend).backend is head.backend


def test_training_group_photo_keeps_only_the_matching_face():
    head = FaceHead("grid")
    head.fit([grid("ann"), grid(None, "ann"), grid("bob", None, "ann", source="/photos/party.jpg")])
    assert head.references.shape == (3, 3)
    assert head.kept[-1].startswith("party.jpg")
    assert torch.allclose(head.references[-1], head.references[0], atol=0.05)  # ann's face, not bob's


@pytest.mark.parametrize(
    "photos, message",
    [
        ([grid("ann"), grid("ann"), grid(source="empty.jpg")], r"no face found in empty\.jpg"),
        ([grid("ann"), grid("ann"), grid("bob", "cy", source="x.jpg")], r"x\.jpg \(photo #2\): none of its 2 faces"),
        ([grid("ann"), grid("ann"), grid("ann", "ann", source="x.jpg")], r"x\.jpg \(photo #2\): 2 of its 2 faces"),
        ([grid("ann"), grid("ann"), grid("bob", source="x.jpg")], r"x\.jpg \(photo #2\): its face matches none"),
        ([grid("ann", "bob"), grid("cy", "bob")], "single face"),
        ([grid("ann"), grid("bob")], "all differ"),
    ],
)
def test_bad_training_photos_are_named(photos, message):
    with pytest.raises(ValueError, match=message):
        FaceHead("grid").fit(photos)


def test_lenient_face_head_skips_bad_photos_and_stays_valid(caplog):
    head = FaceHead("grid", strict=False)
    with caplog.at_level(logging.WARNING):
        head.fit([grid("ann"), grid("ann"), grid("bob", "cy", source="others.jpg")])
    assert "others.jpg" in caplog.text and head.references.shape[0] == 2


def test_several_people_in_one_image_each_fire_and_one_face_fires_one_person():
    backend = FaceHead("grid").backend
    heads = {}
    for name in ("ann", "ann_twin", "bob", "cy"):
        heads[name] = FaceHead(backend, threshold=0.25)
        heads[name].fit([grid(name), grid(None, name)])
    group = grid("bob", None, "ann", "cy")
    results = detect_concepts([group, grid("ann")], heads)
    assert [n for n, d in results[0].items() if d.fired] == ["ann", "bob", "cy"]
    alone = {n: d.fired for n, d in results[1].items()}
    assert alone == {"ann": True, "ann_twin": False, "bob": False, "cy": False}
    assert heads["ann_twin"].detect([grid("ann")])[0].fired  # alone, the twin's head would also fire
    matches = match_faces(group, heads)
    assert len({matches[n].face_index for n in ("ann", "bob", "cy")}) == 3
    assert matches["bob"].box == (0.0, 0.0, 64.0, 64.0)
    text = explain(results, names=["group.jpg", "ann.jpg"], heads=heads)
    assert "group.jpg" in text and "FIRED" in text and "<= 0.25" in text


def test_face_detections_say_where_the_face_is():
    from myvlm.look import WHOLE, head_boxes

    head = FaceHead("grid")
    head.fit([grid("ann"), grid(None, "ann")])
    alone, crowd, nobody = head.detect([grid(None, None, None, "ann"), grid("bob", None, "ann"), grid()])
    assert alone.fired and alone.box == (0.5, 0.5, 1.0, 1.0)  # the bottom-right cell of the 128 px photo
    assert crowd.fired and crowd.box == (0.0, 0.5, 0.5, 1.0)  # ann's face, not bob's (closer to her references)
    assert not nobody.fired and nobody.box is None
    assert fraction_box((-8.0, 16.0, 70.0, 64.0), (64, 64)) == (0.0, 0.25, 1.0, 1.0)  # clipped to the image
    bob = FaceHead(head.backend)
    bob.fit([grid("bob")])
    jointly = detect_concepts([grid("bob", None, "ann")], {"ann": head, "bob": bob})[0]
    assert jointly["ann"].box == (0.0, 0.5, 0.5, 1.0) and jointly["bob"].box == (0.0, 0.0, 0.5, 0.5)
    # what a concept's look and routing take from the training photos: each photo's face
    assert head_boxes(head, [grid("ann"), grid(None, "ann"), grid()]) == [(0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5),
                                                                          WHOLE]


def test_detect_concepts_mixes_probes_and_faces(red_circles, blue_squares):
    probe = ClipProbeHead(grid_colors)
    probe.fit(red_circles[:3], blue_squares[:8])
    person = FaceHead("grid")
    person.fit([grid("bob"), grid(None, "bob")])
    results = detect_concepts([red_circles[5], grid("bob")], {"red": probe, "bob": person})
    assert {n: d.fired for n, d in results[0].items()} == {"red": True, "bob": False}
    assert results[1]["bob"].fired and list(results[1]) == ["red", "bob"]


def test_facenet_without_weights_offline_says_how_to_fix(monkeypatch, tmp_path):
    from facenet_pytorch.models import inception_resnet_v1

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(inception_resnet_v1, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match="dlib"):
        FaceHead("facenet", backend_options={"weights": "vggface2"})


def test_heads_built_from_one_spec_share_the_encoder_and_its_cache():
    """A library of probes on the same extractor loads it once and encodes each image once."""
    from myvlm.heads import build_head, load_head
    from myvlm.heads.features import CallableFeatures, register_extractor

    encoded = []

    def mean_colour(image):
        encoded.append(image.size)
        return np.asarray(image.resize((4, 4)), dtype=np.float32).reshape(-1, 3).mean(0)

    @register_extractor("test_mean_colour_shared")
    def build(**_):
        return CallableFeatures(mean_colour, name="mean_colour")

    spec = {"type": "test_mean_colour_shared"}
    red = [Image.new("RGB", (20, 20), (200 + i, 10, 10)) for i in range(3)]
    blue = [Image.new("RGB", (20, 20), (10, 10, 200 + i)) for i in range(6)]
    first = build_head("clip_probe", feature_extractor=spec, training={"steps": 20})
    first.fit(red, blue)
    second = load_head(first.config(), first.state_dict())
    assert second.feature_extractor is first.feature_extractor
    before = len(encoded)
    assert second.detect(red[:1])[0].score == first.detect(red[:1])[0].score
    assert len(encoded) == before  # the fitted photo was already encoded: no encoder call at all
