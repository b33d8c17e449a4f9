"""Reading user images with clear errors.

    from myvlm.images import load_image, list_images
    images = [load_image(p) for p in list_images("data/my_dog")]

Every image is EXIF-transposed and converted to RGB (grayscale, CMYK, palette and alpha
images included), so heads and backbones always see 3-channel images the right way up.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence, Union

from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_PIXELS = 64_000_000  # larger images are refused rather than decoded (decompression-bomb guard)

ImageLike = Union[str, Path, Image.Image]


class ImageError(ValueError):
    """An image the user gave cannot be used; the message names the file and the fix."""


def load_image(source: ImageLike) -> Image.Image:
    """Open ``source`` (a path or a PIL image) as an upright RGB image."""
    if isinstance(source, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(source))
    path = Path(source)
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ImageError(
                    f"{path} is {image.width}x{image.height} pixels; images above {MAX_PIXELS:,} pixels are "
                    "refused, downscale it first"
                )
            image.load()
            upright = _to_rgb(ImageOps.exif_transpose(image))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise ImageError(f"{path} is not a readable image ({error}); remove it or replace it") from error
    upright.info["source"] = str(path)  # lets later errors name the file
    return upright


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def list_images(folder: Union[str, Path]) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name; an error if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ImageError(f"no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return paths


def load_images(sources: Union[ImageLike, Sequence[ImageLike], Iterable[ImageLike]]) -> list[Image.Image]:
    """Load a folder, a single image, or a list of paths/images."""
    if isinstance(sources, (str, Path)) and Path(sources).is_dir():
        sources = list_images(sources)
    elif isinstance(sources, (str, Path, Image.Image)):
        sources = [sources]
    images = [load_image(s) for s in sources]
    if not images:
        raise ImageError("no images were given")
    return images
