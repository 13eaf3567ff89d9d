"""Image decoding and per-task preprocessing.

Decoding turns bytes into a correct RGB ``PIL.Image`` (EXIF orientation applied, every mode handled)
or raises ``ImageError`` with a reason code; it never lets another exception escape, so a caller can
turn any bad image into an error row. Only the formats in ``IMAGE_FORMATS`` are opened, whatever the
file is named: the bytes are untrusted, and PIL's other decoders (EPS hands the file to Ghostscript)
have no business seeing them. An image with more than ``max_pixels`` pixels is refused from its header,
before any pixel is decoded.

Preprocessing turns an RGB image into uint8 crops, a numpy array of shape (n, 3, S, S): normalisation
happens on the model's device (``Scorer``), so what travels between processes is a quarter of float32's
size, and the decode tasks never import torch (seconds of start-up per worker process).

- ``resize_center_crop`` (memorability, emotion): torchvision ``Resize(S)`` on the shorter side with
  its default bilinear filter, then ``CenterCrop(S)``, as the released code does.
- ``multi_crop`` (iqa): ``crops`` S x S crops of the unresized image at positions drawn from a seeded
  generator (the same image always gets the same crops); the scores of the crops are averaged. Images
  longer than ``max_side`` are first scaled down to it; images shorter than S are scaled up to S.

Neither ever builds an image much larger than its output, whatever the aspect ratio: a 1 x 20000
strip would otherwise be scaled to 224 x 4.5 million pixels on the way to one 224 x 224 crop.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from perceptclip.core.config import Config, require, setting

if TYPE_CHECKING:
    import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own decompression-bomb threshold (2x MAX_IMAGE_PIXELS)
# The PIL formats behind shards.IMAGE_EXTENSIONS (MPO, the multi-picture JPEG of cameras, opens as JPEG).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "PPM", "JPEG2000", "AVIF", "TGA", "ICO")
# resize_center_crop: an aspect ratio above this takes the crop straight from the source region
MAX_RESIZE_ASPECT = 8


class ImageError(Exception):
    """An image that cannot be scored. ``reason`` is a short stable code for counting and filtering."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass
class PreprocessConfig(Config):
    kind: str = setting("resize_center_crop", choices=("resize_center_crop", "multi_crop"))
    size: int = setting(224, minimum=1)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    crops: int = setting(5, minimum=1)    # multi_crop only
    max_side: int = 2048                  # multi_crop only: longer images are scaled down first
    seed: int = 0                         # multi_crop only: crop positions

    def check(self):
        require(self.max_side >= self.size, "max_side", f"must be >= size ({self.size}), got {self.max_side}")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Bytes -> RGB image, upright. Raises ``ImageError`` for anything that is not a usable image.

    ``max_pixels``: larger images are refused (``too_large``) from the size in their header. PIL refuses
    images over its own limit (``2 * Image.MAX_IMAGE_PIXELS``, the default here) while opening them,
    also as ``too_large``, so a higher ``max_pixels`` changes nothing.
    ``draft_size``: let the JPEG decoder scale down in the DCT domain (1/2, 1/4, 1/8) while both sides
    stay >= draft_size; several times faster for large JPEGs, for preprocessing that resizes anyway.
    ``img.info["source_size"]`` keeps the full upright size either way."""
    if not data:
        raise ImageError("empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            # PIL warns from half its limit; max_pixels is the limit here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError("too_large", f"{width}x{height} exceeds the limit of {max_pixels} pixels")
            img.seek(0)                              # animations: the first frame
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):   # orientations that swap the sides
                width, height = height, width
            rgb = to_rgb(ImageOps.exif_transpose(img))
            rgb.info["source_size"] = (width, height)
            return rgb
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", str(e)) from None
    except UnidentifiedImageError:
        raise ImageError("not_an_image", "no image format recognised") from None
    except (OSError, SyntaxError, EOFError) as e:
        raise ImageError("corrupt", str(e) or type(e).__name__) from None
    except Exception as e:  # a decoder bug must still become an error row, not a crashed job
        raise ImageError("decode_failed", f"{type(e).__name__}: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited on white; high bit depths are scaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's convert("L") clips these to 0..255, turning 16-bit images white. Scale instead.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if img.mode in ("I", "F") and arr.max() <= 255 and arr.min() >= 0:
            top = 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _to_uint8_chw(img: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))  # (3, H, W)


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    width, height = img.size
    if max(width, height) > MAX_RESIZE_ASPECT * min(width, height):
        img = _resized_center_square(img, size)
    else:
        # torchvision's Resize(size) + CenterCrop(size) on a PIL image, done with PIL directly: the
        # same sizes, offsets and filter (bilinear, antialiased), without importing torch in decode tasks
        new_w, new_h, left, top = _resize_crop_geometry(width, height, size)
        img = img.resize((new_w, new_h), Image.BILINEAR).crop((left, top, left + size, top + size))
    return _to_uint8_chw(img)[None]                  # (1, 3, S, S)


def _resize_crop_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """The resized size and the crop's top-left corner, as torchvision computes them."""
    new_w, new_h = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    return new_w, new_h, int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))


def _resized_center_square(img: Image.Image, size: int) -> Image.Image:
    """``Resize(size)`` then ``CenterCrop(size)`` in one step: PIL resamples only the source region the
    crop covers. The same sampling positions as the two steps; pixels may differ by one level where
    PIL rounds between its passes, so this path is kept for strips, where the two steps cost most."""
    width, height = img.size
    new_w, new_h, left, top = _resize_crop_geometry(width, height, size)
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return img.resize((size, size), Image.BILINEAR, box=box)


def crop_positions(width: int, height: int, size: int, count: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    xs = rng.integers(0, width - size + 1, size=count)
    ys = rng.integers(0, height - size + 1, size=count)
    return [(int(x), int(y)) for x, y in zip(xs, ys)]


def multi_crop(img: Image.Image, size: int, crops: int, max_side: int, seed: int) -> np.ndarray:
    width, height = img.size
    if max(width, height) > max_side:
        scale = max_side / max(width, height)
        img = img.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    width, height = img.size
    if min(width, height) < size:
        # shorter side -> size as torchvision's Resize(size) does, the longer one no longer than max_side
        long = min(int(size * max(width, height) / min(width, height)), max_side)
        img = img.resize((size, long) if width <= height else (long, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)            # (H, W, 3)
    height, width = arr.shape[:2]
    out = np.stack([arr[y:y + size, x:x + size] for x, y in crop_positions(width, height, size, crops, seed)])
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))  # (crops, 3, S, S)


def preprocess(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """RGB image -> uint8 crops (n, 3, S, S): n = 1 for resize_center_crop, ``cfg.crops`` for multi_crop."""
    if cfg.kind == "multi_crop":
        return multi_crop(img, cfg.size, cfg.crops, cfg.max_side, cfg.seed)
    return resize_center_crop(img, cfg.size)


def normalize(crops: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (n, 3, S, S) -> float normalised with CLIP's statistics, on ``crops``' device."""
    import torch

    mean_t = torch.tensor(mean, device=crops.device, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=crops.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (crops.float() / 255.0 - mean_t) / std_t
