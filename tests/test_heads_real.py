"""Concept heads on real photos (../shared/data) with real frozen encoders; skipped when absent.

The full numbers come from ``scripts/bench_heads.py``; these are quick checks on a few concepts.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from PIL import Image

from myvlm.heads import (
    CachedFeatures,
    ClipProbeHead,
    FaceHead,
    LiteRTFeatures,
    detect_concepts,
    generic_negatives,
    load_head,
)
from myvlm.images import list_images, load_image

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"
ENCODER = SHARED / "models/mobilenet_v1_embedding/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"

pytestmark = [
    pytest.mark.shared_data,
    pytest.mark.skipif(not DATA.is_dir() or not ENCODER.is_file(), reason=f"real photos not found in {SHARED}"),
]


@functools.lru_cache(maxsize=None)
def _load(*parts: str) -> tuple[Image.Image, ...]:
    images = []
    for path in list_images(DATA.joinpath(*parts)):
        image = load_image(path)
        image.info["source"] = str(path)
        images.append(image)
    return tuple(images)


def photos(*parts: str) -> list[Image.Image]:
    """The photos of one folder, in name order, each knowing its file name (for error messages)."""
    return list(_load(*parts))


@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("ai_edge_litert")
    return CachedFeatures(LiteRTFeatures(ENCODER, num_threads=2))  # shared: each photo is encoded once


@pytest.fixture(scope="module")
def face_backend():
    pytest.importorskip("dlib")
    pytest.importorskip("facenet_pytorch")
    return FaceHead("dlib").backend


def test_probe_recognises_real_objects_and_rejects_unseen_ones(encoder):
    """Two dogs (the other's hard negative), a teapot and a backpack; test negatives never seen."""
    subjects = ["dog2", "dog3", "teapot", "backpack"]
    train_negatives = [im for s in ("dog", "dog5", "cat", "vase", "can", "candle") for im in photos("objects", s)]
    unseen = [im for s in ("dog7", "clock", "berry_bowl", "robot_toy") for im in photos("objects", s)]
    hits = positives = false_positives = negatives = 0
    for subject in subjects:
        own = photos("objects", subject)
        others = [im for s in subjects if s != subject for im in photos("objects", s)[:3]]  # their training photos
        head = ClipProbeHead(encoder)
        head.fit(own[:3], train_negatives + others + generic_negatives())
        hits += sum(d.fired for d in head.detect(own[3:]))
        positives += len(own) - 3
        false_positives += sum(d.fired for d in head.detect(unseen))
        negatives += len(unseen)
    assert hits / positives >= 0.9, f"recall {hits}/{positives}"
    assert false_positives / negatives <= 0.05, f"false positives {false_positives}/{negatives}"


def test_probe_round_trip_with_the_real_encoder(encoder, tmp_path):
    head = ClipProbeHead(encoder)
    head.fit(photos("objects", "teapot")[:3], photos("objects", "vase") + photos("objects", "can"))
    loaded = load_head(head.config(), head.state_dict())  # the LiteRT extractor is rebuilt from the config
    images = photos("objects", "teapot")[3:] + photos("objects", "clock")[:2]
    assert loaded.score(images).tolist() == pytest.approx(head.score(images).tolist(), abs=1e-6)


def test_face_head_recognises_a_person_and_rejects_others(face_backend):
    head = FaceHead(face_backend)
    head.fit(photos("faces", "person_01")[:3])
    assert all(d.fired for d in head.detect(photos("faces", "person_01")[3:]))
    others = [im for p in ("person_00", "person_03", "person_05") for im in photos("faces", p)]
    assert not any(d.fired for d in head.detect(others))


def test_group_photos_fire_for_the_people_in_them_only(face_backend):
    people = {"obama": "person_obama", "biden": "person_biden", "p00": "person_00", "p03": "person_03"}
    heads = {}
    for name, folder in people.items():
        heads[name] = FaceHead(face_backend)
        heads[name].fit(photos("faces", folder)[:3])
    groups = {p.name: load_image(p) for p in list_images(DATA / "faces" / "groups")}
    results = detect_concepts([groups["two_people.jpg"], groups["couple.jpg"]], heads)
    assert [n for n, d in results[0].items() if d.fired] == ["obama", "biden"]
    assert [n for n, d in results[1].items() if d.fired] == ["p00"]
    faces, distances = heads["obama"].face_distances(groups["two_people.jpg"])
    assert len(faces) >= 2 and int((distances <= heads["obama"].threshold).sum()) == 1  # one face only
    obama, biden = results[0]["obama"].box, results[0]["biden"].box  # each person's own face, a small part
    for box in (obama, biden):
        assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1 and (box[2] - box[0]) * (box[3] - box[1]) < 0.25
    assert obama[2] <= biden[0] or biden[2] <= obama[0] or obama[3] <= biden[1] or biden[3] <= obama[1]  # apart


def test_training_photos_are_cleaned_and_bad_ones_named(face_backend):
    group = load_image(DATA / "faces/groups/obama_and_biden.jpg")
    group.info["source"] = "obama_and_biden.jpg"
    obama = photos("faces", "person_obama")
    head = FaceHead(face_backend)
    head.fit(obama[1:3] + [group])  # obama1, obama2 + a photo of him with Biden and a child
    assert head.references.shape[0] == 3 and head.kept[-1].startswith("obama_and_biden.jpg")
    assert head.detect(obama[3:])[0].fired
    biden = photos("faces", "person_biden")
    with pytest.raises(ValueError, match=r"biden\.jpg .*matches none of the other photos"):
        FaceHead(face_backend).fit(obama[1:4] + biden[:1])
    with pytest.raises(ValueError, match="no face found in .*08.jpg"):
        FaceHead(face_backend).fit(obama[1:3] + [_named(photos("objects", "teapot")[0], "08.jpg")])


def test_rotated_gray_and_cmyk_photos_of_a_person_are_recognised(face_backend, tmp_path):
    upright = photos("faces", "person_01")[3]
    exif = Image.Exif()
    exif[0x0112] = 8  # the pixels are stored turned 90 degrees clockwise; viewers turn them back
    upright.rotate(-90, expand=True).save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    upright.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    head = FaceHead(face_backend)
    head.fit(photos("faces", "person_01")[:3])
    raw = Image.open(tmp_path / "sideways.jpg")  # the head must honour the EXIF orientation itself
    found = head.detect([raw, Image.open(tmp_path / "cmyk.jpg"), upright.convert("L")])
    assert [d.fired for d in found] == [True, True, True]
    seen = head.detect([upright])[0].box  # the face where it is seen, not where the stored pixels put it
    assert found[0].box == pytest.approx(seen, abs=0.03) and found[2].box == pytest.approx(seen, abs=0.03)


def _named(image: Image.Image, name: str) -> Image.Image:
    image.info["source"] = name
    return image
