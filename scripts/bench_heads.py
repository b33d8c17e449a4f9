"""Benchmark the concept heads on real photos (layout of ../shared/data).

    python scripts/bench_heads.py ../shared/data                 # objects (LiteRT MobileNet) + faces (dlib)
    python scripts/bench_heads.py ../shared/data --only faces --face-detector hog

Objects: for each subject, a clip_probe head (the real frozen MobileNet from ../shared/models as
the feature extractor) trains on 3 of its photos against the photos of half of the other
subjects (+ the generic drawn set) and is measured on its other photos and on the other half of
the subjects, which it never saw. The halves alternate through the subjects sorted by class, so
same-class hard negatives (the other dogs, the other toys) fall on both sides.

Faces: for each person, a face head takes its references from 3 photos and is measured on the
person's other photos, on every other person's photos and on the group photos. Group photos are
matched jointly (``detect_concepts``): the people in a group photo must fire, nobody else, each
through one face.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from myvlm.heads import ClipProbeHead, FaceHead, detect_concepts, generic_negatives, get_face_backend
from myvlm.heads.features import CachedFeatures, LiteRTFeatures
from myvlm.images import list_images, load_image

logger = logging.getLogger("bench_heads")

# Who is in each group photo. data/README.md names person_obama in the two Obama photos; the
# others were identified by looking at the photos (Biden beside Obama; person_00 with her
# husband in couple.jpg and in the selfie). People not in the benchmark are not listed.
DEFAULT_GROUPS = {
    "two_people.jpg": ["person_obama", "person_biden"],
    "obama_and_biden.jpg": ["person_obama", "person_biden"],
    "couple.jpg": ["person_00"],
    "selfie-many-people.jpg": ["person_00"],
}
ENCODER = "models/mobilenet_v1_embedding/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"


@dataclass
class Row:
    """One concept's results."""

    name: str  # concept
    n_train: int  # training photos (references for faces)
    n_pos: int  # held-out positive images
    hits: int  # held-out positives that fired
    n_neg: int  # negative images
    false_pos: int  # negatives that fired
    note: str = ""  # misses / false positives, by file name


def split_others(subject: str, classes: dict[str, str]) -> tuple[list[str], list[str]]:
    """The other subjects, sorted by class, alternated into (train negatives, test negatives)."""
    others = sorted((cls, name) for name, cls in classes.items() if name != subject)
    return [name for _, name in others[0::2]], [name for _, name in others[1::2]]


def bench_objects(data: Path, encoder: Path, args: argparse.Namespace) -> list[Row]:
    """Train on ``n_train`` photos + half the other subjects; test on the rest and the other half.

    With ``--validate`` the test images are never touched: each training photo is held out in
    turn and the training half of the subjects is split again (for choosing probe settings).
    """
    classes = json.loads((data / "objects" / "classes.json").read_text())
    photos = {s: [(p.name, load_image(p)) for p in list_images(data / "objects" / s)] for s in sorted(classes)}
    extractor = CachedFeatures(LiteRTFeatures(encoder, num_threads=args.threads))  # shared: each photo encoded once
    drawn = generic_negatives(args.generic)
    rows = []
    for subject in tqdm(sorted(classes), desc="object heads"):
        train_subjects, test_subjects = split_others(subject, classes)
        if args.validate:
            train_subjects, test_subjects = train_subjects[0::2], train_subjects[1::2]
        if args.negative_subjects >= 0:
            train_subjects = train_subjects[: args.negative_subjects]
        train_negs = [im for s in train_subjects for _, im in photos[s]] + drawn
        test_negs = [(f"{s}/{n}", im) for s in test_subjects for n, im in photos[s]]
        own = photos[subject][: args.train_photos]
        folds = [(own[:i] + own[i + 1:], own[i:i + 1]) for i in range(len(own))] if args.validate else \
            [(own, photos[subject][args.train_photos:])]
        row = Row(subject, len(folds[0][0]), 0, 0, 0, 0)
        for train, held_out in folds:
            head = ClipProbeHead(extractor, training=args.probe, crops=args.crops)
            head.fit([im for _, im in train], train_negs)
            _score(row, head.detect([im for _, im in held_out]), head.detect([im for _, im in test_negs]),
                   held_out, test_negs)
        rows.append(row)
    return rows


def _score(row: Row, pos, neg, held_out, negatives) -> None:
    misses = [n for (n, _), d in zip(held_out, pos) if not d.fired]
    fps = [n for (n, _), d in zip(negatives, neg) if d.fired]
    row.n_pos, row.hits = row.n_pos + len(pos), row.hits + len(pos) - len(misses)
    row.n_neg, row.false_pos = row.n_neg + len(neg), row.false_pos + len(fps)
    row.note += " " + " ".join([f"miss:{m}" for m in misses] + [f"fp:{f}" for f in fps])


def bench_faces(data: Path, n_train: int, detector: str, groups: dict[str, list[str]]) -> tuple[list[Row], list[str]]:
    faces = data / "faces"
    people = sorted(p.name for p in faces.iterdir() if p.is_dir() and p.name != "groups")
    photos = {p: [(f"{p}/{f.name}", load_image(f)) for f in list_images(faces / p)] for p in people}
    group_photos = [(f"groups/{f.name}", load_image(f)) for f in list_images(faces / "groups")]
    backend = get_face_backend("dlib", detector=detector)
    heads, refs = {}, {}
    for person in tqdm(people, desc="face heads"):
        refs[person] = min(n_train, len(photos[person]))
        heads[person] = FaceHead(backend)
        heads[person].fit([im for _, im in photos[person][: refs[person]]])
    rows = []
    for person in tqdm(people, desc="face tests"):
        held_out = photos[person][refs[person]:]
        negatives = [item for other in people if other != person for item in photos[other]]
        pos = heads[person].detect([im for _, im in held_out])
        neg = heads[person].detect([im for _, im in negatives])
        misses = [n for (n, _), d in zip(held_out, pos) if not d.fired]
        fps = [n for (n, _), d in zip(negatives, neg) if d.fired]
        rows.append(Row(person, refs[person], len(pos), len(pos) - len(misses), len(neg), len(fps),
                        " ".join([f"miss:{m}" for m in misses] + [f"fp:{f}" for f in fps])))
    group_lines = []
    results = detect_concepts([im for _, im in group_photos], heads)  # joint matching, one face per person
    for (name, image), result in zip(group_photos, results):
        expected = set(groups.get(Path(name).name, []))
        for person, row in zip(people, rows):
            fired = result[person].fired
            row.n_pos += person in expected
            row.hits += person in expected and fired
            row.n_neg += person not in expected
            row.false_pos += person not in expected and fired
            if fired != (person in expected):
                row.note += f" {'miss' if fired is False else 'fp'}:{name}"
        group_lines.append(_group_line(name, image, heads, result, expected))
    return rows, group_lines


def _group_line(name, image, heads, result, expected) -> str:
    fired = sorted(p for p, d in result.items() if d.fired)
    # faces within each fired person's threshold when the person is matched alone (must be exactly one)
    n_close = {p: int((heads[p].face_distances(image)[1] <= heads[p].threshold).sum()) for p in fired}
    n_faces = len(heads[next(iter(heads))].backend.faces(image))
    ok = set(fired) == expected and all(n == 1 for n in n_close.values())
    detail = ", ".join(f"{p} (d={result[p].score:.3f}, faces under threshold: {n_close[p]})" for p in fired)
    verdict = "OK" if ok else "WRONG"
    return f"{name:<28} faces {n_faces}  expected {sorted(expected)}  fired: {detail or 'nobody'}  {verdict}"


def table(title: str, rows: list[Row]) -> str:
    lines = [title, f"{'concept':<18} {'train':>5} {'n_pos':>5} {'recall':>7} {'n_neg':>5} {'FPR':>7}  errors"]
    for r in rows:
        recall = r.hits / r.n_pos if r.n_pos else float("nan")
        fpr = r.false_pos / r.n_neg if r.n_neg else float("nan")
        errors = r.note.split()
        note = " ".join(errors[:6]) + (f" (+{len(errors) - 6} more)" if len(errors) > 6 else "")
        lines.append(f"{r.name:<18} {r.n_train:>5} {r.n_pos:>5} {recall:>7.1%} {r.n_neg:>5} {fpr:>7.1%}  {note}")
    pos, hits = sum(r.n_pos for r in rows), sum(r.hits for r in rows)
    neg, fps = sum(r.n_neg for r in rows), sum(r.false_pos for r in rows)
    lines.append(f"{'OVERALL':<18} {'':>5} {pos:>5} {hits / pos:>7.1%} {neg:>5} {fps / neg:>7.1%}  "
                 f"({hits}/{pos} positives found, {fps}/{neg} negatives fired)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="folder with objects/ and faces/ (layout of ../shared/data)")
    parser.add_argument("--only", choices=["objects", "faces"], help="run one benchmark")
    parser.add_argument("--encoder", type=Path, help=f"LiteRT encoder (default: DATA_DIR/../{ENCODER})")
    parser.add_argument("--train-photos", type=int, default=3, help="training photos per concept")
    parser.add_argument("--generic", type=int, default=40, help="drawn generic negatives added to each probe")
    parser.add_argument("--negative-subjects", type=int, default=-1,
                        help="use only the first K subjects of the training half as negatives (0: generic only; "
                             "default -1: the whole half)")
    parser.add_argument("--probe", type=json.loads, default=None,
                        help='probe training options as JSON, e.g. \'{"steps": 1000, "feature_scale": 1}\'')
    parser.add_argument("--crops", type=json.loads, default=[],
                        help="objects: also score zoomed-in crops, e.g. '[[0.5, 0.25]]' (ClipProbeHead crops)")
    parser.add_argument("--validate", action="store_true",
                        help="objects: measure on training-side data only (leave-one-out), to choose settings")
    parser.add_argument("--face-detector", choices=["mtcnn", "hog"], default="mtcnn")
    parser.add_argument("--groups", type=Path, help="JSON {group photo: [people in it]} (default: built in)")
    parser.add_argument("--threads", type=int, default=2, help="LiteRT threads")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not (args.data_dir / "objects").is_dir() or not (args.data_dir / "faces").is_dir():
        parser.error(f"{args.data_dir} must contain objects/ and faces/ (see ../shared/data/README.md)")
    start = time.perf_counter()
    if args.only in (None, "objects"):
        encoder = args.encoder or args.data_dir.resolve().parent / ENCODER
        rows = bench_objects(args.data_dir, encoder, args)
        subjects = "half of the other subjects" if args.negative_subjects < 0 else f"{args.negative_subjects} subjects"
        mode = " (VALIDATION, training side only)" if args.validate else ""
        title = f"Objects{mode}: clip_probe on {encoder.name}, " \
                f"negatives: {subjects} + {args.generic} drawn, probe options {args.probe or 'default'}"
        print(table(title, rows), "\n")
    if args.only in (None, "faces"):
        groups = json.loads(args.groups.read_text()) if args.groups else DEFAULT_GROUPS
        rows, group_lines = bench_faces(args.data_dir, args.train_photos, args.face_detector, groups)
        print(table(f"Faces: dlib backend, {args.face_detector} detector", rows))
        print("Group photos (joint matching):\n  " + "\n  ".join(group_lines), "\n")
    print(f"total time {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
