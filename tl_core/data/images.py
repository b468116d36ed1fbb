"""Image loading rules: decode any image file (or uploaded bytes) the same way, everywhere.

EXIF orientation is applied; palette/LA/RGBA images are composited on white; grayscale, CMYK and
16-bit images become RGB; animated images give their first frame; images above
:data:`MAX_IMAGE_PIXELS` are refused with a clear message (decompression bombs).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from ..errors import DatasetError

__all__ = ["IMAGE_EXTENSIONS", "ARCHIVE_EXTENSIONS", "MAX_IMAGE_PIXELS", "load_image", "image_from_bytes",
           "file_sha256", "resize_shorter"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


ARCHIVE_EXTENSIONS = frozenset({".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar"})


#: Images above this many pixels are refused (a decompression bomb, or a photo far larger than needed).
MAX_IMAGE_PIXELS = 50_000_000


# Pillow's own bomb guard raises above 2x this; we check the size ourselves first for a clear message.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: alpha composited on white, 16-bit scaled, CMYK converted."""
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if (im.mode.startswith("I;16") or arr.max(initial=0) > 255) else 255.0
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if im.mode != "RGB":
        return im.convert("RGB")
    return im


def _open_checked(im: Image.Image, name: str) -> Image.Image:
    w, h = im.size
    if w < 1 or h < 1:
        raise DatasetError(f"{name}: the image has no pixels ({w}x{h}).")
    if w * h > MAX_IMAGE_PIXELS:
        raise DatasetError(
            f"{name}: {w}x{h} is {w * h / 1e6:.0f} megapixels, above the {MAX_IMAGE_PIXELS / 1e6:.0f} MP limit; "
            "downscale it before uploading."
        )
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)  # animated GIF/WebP: the first frame stands for the image
    im.load()
    im = ImageOps.exif_transpose(im) or im
    return _to_rgb(im)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as an RGB Pillow image following the project's loading rules.

    EXIF orientation is applied; palette/LA/RGBA images are composited on white; grayscale, CMYK and
    16-bit images become RGB; animated images give their first frame.

    Args:
        path: the image file.
    Returns:
        A loaded RGB image.
    Raises:
        DatasetError: the file is missing, not an image, truncated or too large, with the reason.
    """
    return _decode(path, Path(path).name)


def image_from_bytes(data: bytes, name: str = "upload") -> Image.Image:
    """Like :func:`load_image` for bytes in memory (an upload or a camera picture)."""
    return _decode(io.BytesIO(data), name)


def _decode(source: str | os.PathLike | io.BytesIO, name: str) -> Image.Image:
    """Open and convert with the loading rules; every failure becomes one DatasetError naming the file."""
    try:
        with Image.open(source) as im:
            return _open_checked(im, name)
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(f"{name}: file not found.") from None
    except Image.DecompressionBombError:
        raise DatasetError(f"{name}: the image is larger than the {MAX_IMAGE_PIXELS / 1e6:.0f} MP limit.") from None
    except Image.UnidentifiedImageError:
        raise DatasetError(f"{name}: not a readable image (unknown or damaged format).") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DatasetError(f"{name}: damaged or truncated image ({e}).") from None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (the key of every cache)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_INTERP = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
           "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def center_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred ``size`` square of a ``width`` x ``height`` image (torchvision
    ``CenterCrop``'s rounding)."""
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return left, top, left + size, top + size


def resize_shorter(img: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Resize so that the shorter side is ``size`` (torchvision ``Resize(int)`` semantics)."""
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nh, nw = size, int(size * w / h)
    if (nw, nh) == (w, h):
        return img
    return img.resize((nw, nh), _INTERP.get(interpolation, Image.BICUBIC))

