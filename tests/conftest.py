"""Shared fixtures: tiny random BLIP-2 checkpoints written to disk and loaded like real ones."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

# Tiny models spend their time in thread hand-offs, not arithmetic: one thread is several
# times faster on 2 cores and keeps the suite fast.
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def tiny_blip2_path(tmp_path_factory) -> Path:
    from myvlm.tiny import build_tiny_blip2

    return build_tiny_blip2(tmp_path_factory.mktemp("tiny-blip2-opt"))


@pytest.fixture(scope="session")
def tiny_blip2_t5_path(tmp_path_factory) -> Path:
    from myvlm.tiny import build_tiny_blip2

    return build_tiny_blip2(tmp_path_factory.mktemp("tiny-blip2-t5"), language_model="t5")


@pytest.fixture()
def backbone(tiny_blip2_path):
    from myvlm import load_backbone

    return load_backbone(str(tiny_blip2_path))


def random_image(seed: int, size=(40, 48)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def solid_image(colour, size=(40, 48)) -> Image.Image:
    return Image.new("RGB", size, colour)


@pytest.fixture()
def photos() -> list[Image.Image]:
    return [random_image(i) for i in range(4)]
