"""Command-line inputs: image files, folders and globs, mixed with Hydra ``key=value`` overrides.

    paths, overrides = split_overrides(["a.jpg", "trip/", "train.steps=5"])
    expand_images(["a.jpg", "trip/", "'more/*.png'"])   # -> [Path('a.jpg'), Path('trip/1.jpg'), ...]
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Sequence

from myvlm.images import IMAGE_SUFFIXES, ImageError, list_images

_GLOB_CHARS = set("*?[")


def split_overrides(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``key=value`` overrides from paths (an existing file whose name has '=' stays a path)."""
    paths, overrides = [], []
    for item in items:
        is_override = "=" in item and not Path(item).exists() and not item.startswith(("/", "./", "../"))
        (overrides if is_override else paths).append(item)
    return paths, overrides


def expand_images(items: Sequence[str]) -> list[Path]:
    """Image files, the images directly inside folders, and glob matches, in order, without repeats."""
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found.extend(list_images(path))
        elif path.is_file():
            found.append(path)
        elif _GLOB_CHARS & set(item):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            images = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
            if not images:
                raise ImageError(f"no image matches {item!r}")
            found.extend(images)
        else:
            raise ImageError(f"image not found: {item}")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise ImageError("no images were given")
    return unique
