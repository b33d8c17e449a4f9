"""The HTML report: self-contained, every image and every record shown; it renders in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from myvlm.eval.records import META_FILE, RECORDS_FILE
from myvlm.eval.report import write_report

COLOURS = {"red": (230, 20, 20), "blue": (20, 20, 230), "green": (20, 200, 20)}


def record(method, role, image, output, task="caption", **extra):
    key = f"{method}|red|0|{role}|{image}|{task}"
    return {"type": "image", "key": key, "method": method, "concept": "red", "split": 0, "role": role,
            "image": image, "task": task, "identifier": "sks", "class_word": "toy", "prompt": None,
            "output": output, "vanilla": "a toy on the beach", "mentions_identifier": "sks" in output,
            "heads": {"red": {"score": 0.9 if role == "positive" else 0.1, "threshold": 0.5,
                              "fired": role == "positive"}} if method == "myvlm" else {},
            "head_fired": (role == "positive") if method == "myvlm" else None, **extra}


@pytest.fixture()
def eval_dir(tmp_path) -> Path:
    data = tmp_path / "data"
    for name, rgb in COLOURS.items():
        (data / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (64, 80), rgb).save(data / name / f"0{i}.png")
    out = tmp_path / "out"
    out.mkdir()
    records = [{"type": "run", "key": f"{m}|red|0|run", "method": m, "concept": "red", "split": 0,
                "train_images": ["red/00.png"], "train_seconds": 1.5, "saved_bytes": 2048} for m in ("myvlm", "lora")]
    for method in ("myvlm", "lora"):
        records += [
            record(method, "positive", "red/01.png", "sks is lying on the beach", text_similarity=0.7),
            record(method, "positive", "red/01.png", "sks is red", task="vqa", question="What color is sks?",
                   vanilla_question="What color is the toy?", answers=["red"], vqa_correct=True),
            record(method, "hard_negative", "blue/00.png", "sks on <script>alert(1)</script>"),
            record(method, "negative", "green/01.png", "a green toy"),
        ]
    (out / RECORDS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / META_FILE).write_text(json.dumps({"data_root": str(data), "backbone": {"name_or_path": "tiny"},
                                             "protocol": {"n_train": 1}, "methods": {}}))
    return out


class Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.keys, self.images, self.style, self._in_style = [], {}, "", False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._in_style = tag == "style"
        if "data-key" in attrs:
            self.keys.append(attrs["data-key"])
        if "data-image" in attrs:
            (cls,) = [c for c in attrs["class"].split() if c.startswith("img-")]
            self.images.setdefault(attrs["data-image"], set()).add(cls)

    def handle_data(self, data):
        if self._in_style:
            self.style += data


def test_report_shows_every_image_and_record_self_contained(eval_dir, tmp_path):
    page = write_report(eval_dir, tmp_path / "report.html").read_text()
    parsed = Collector()
    parsed.feed(page)
    records = [json.loads(line) for line in (eval_dir / RECORDS_FILE).read_text().splitlines()]
    assert sorted(parsed.keys) == sorted(r["key"] for r in records if r["type"] == "image")
    assert set(parsed.images) == {"red/00.png", "red/01.png", "blue/00.png", "green/01.png"}  # train strip included
    for image, classes in parsed.images.items():
        assert len(classes) == 1  # one thumbnail per image, however often it appears
        (cls,) = classes
        rule = rf"\.{cls} {{ background-image: url\(data:image/jpeg;base64,([A-Za-z0-9+/=]+)\)"
        match = re.search(rule, parsed.style)
        thumb = Image.open(io.BytesIO(base64.b64decode(match.group(1))))
        mean = np.asarray(thumb.convert("RGB"), dtype=float).reshape(-1, 3).mean(0)
        assert np.abs(mean - COLOURS[image.split("/")[0]]).max() < 10, (image, mean)
    assert "<script>" not in page and "&lt;script&gt;" in page  # outputs are escaped
    assert "<mark>sks</mark>" in page and "false positive" in page and "What color is the toy?" in page
    assert "src=\"http" not in page and "href=\"http" not in page  # nothing to fetch
    assert ">50.0<" in page  # FPR of 1 hit in 2 negatives


def test_report_renders_in_headless_chromium(eval_dir, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium): no screenshot check")
    html = write_report(eval_dir, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
               html.resolve().as_uri()]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (2000, 1200, 3)
    for name, rgb in COLOURS.items():  # each thumbnail was decoded and painted
        close = (np.abs(pixels - np.array(rgb)).max(axis=2) < 40).sum()
        assert close > 1000, (name, close)
    assert (pixels.sum(axis=2) < 200).sum() > 500  # dark text was drawn
