"""JPEG decoding and preprocessing on the model's device, with a per-image fallback to the CPU path.

On a GPU, nvjpeg (through ``torchvision.io.decode_jpeg``) decodes a batch of JPEGs and the resize and
crops run there too, so the CPU only reads headers. Every image that the device path cannot take goes
through the CPU path of ``perceptclip.model.preprocess`` on its own, so one bad image never fails the batch:

    probe each header on the CPU (PIL reads the header and EXIF, not the pixels)
      RGB or grey JPEG within max_pixels -> device path
      anything else (PNG, WebP, CMYK, too large, empty, not an image) -> CPU path
    device path: one batched decode; if that raises, each image alone; an image that still fails -> CPU path
      EXIF orientation applied to the decoded tensor (the CUDA decoder ignores EXIF)
      resize_center_crop: torchvision resize (bilinear, antialiased) + center crop, on the device
      multi_crop: crops sliced from the decoded tensor at ``crop_positions``, on the device
      rare shapes (multi_crop images that must be scaled first, strips): ``preprocess`` itself on the
        decoded pixels, on the CPU
    CPU path: ``decode_image`` + ``preprocess``, as the CPU stage does; a failure there is an error row
      with the CPU path's own reason

Same results as the CPU path: with device="cpu" the decoder is libjpeg-turbo, like PIL's, and its
pixels are identical; resize_center_crop then differs from PIL's resize by at most 2 levels (mean at
most 0.25), and multi_crop crops are identical. nvjpeg decodes slightly differently from libjpeg. The
tolerances are checked in ``tests/test_device_decode.py``; ``benchmarks/decode_throughput.py`` prints
the difference on any device.
"""

from __future__ import annotations

import io
import warnings
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from perceptclip.model.preprocess import (
    DEFAULT_MAX_PIXELS,
    MAX_RESIZE_ASPECT,
    ImageError,
    PreprocessConfig,
    crop_positions,
    decode_image,
    preprocess,
)

# EXIF orientation tag (0x0112) -> how to turn the stored (C, H, W) pixels upright: the same
# transposes, in tensor terms, as PIL's ImageOps.exif_transpose applies on the CPU path.
UPRIGHT = {
    2: lambda x: x.flip(-1),                              # mirrored left-right
    3: lambda x: x.flip(-2, -1),                          # rotated 180
    4: lambda x: x.flip(-2),                              # mirrored top-bottom
    5: lambda x: x.transpose(-2, -1),                     # transposed
    6: lambda x: x.rot90(-1, (-2, -1)),                   # turned 90 clockwise to be upright
    7: lambda x: x.transpose(-2, -1).flip(-2, -1),        # transversed
    8: lambda x: x.rot90(1, (-2, -1)),                    # turned 90 counter-clockwise to be upright
}


class DecodedBatch(NamedTuple):
    """One entry per input image, in input order, except ``crops``: one tensor per preprocessing."""

    crops: list[torch.Tensor]        # uint8 (n, crops, 3, S, S) on the device; zeros in error rows
    status: list[str]                # "ok" | "error"
    error: list[str | None]          # "reason: message" as the CPU path words it; None when ok
    width: list[int]                 # the upright full-size image's; -1 in error rows
    height: list[int]
    decoded_on: list[str]            # "device" | "cpu": which path produced the row (fallbacks, counted)


def decode_on_device(datas: list[bytes], preprocessing: list[PreprocessConfig], device: str | torch.device,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedBatch:
    """Encoded images -> crops on ``device`` for every preprocessing; never raises for a bad image.

    Device memory: the whole batch is decoded at full size before it is cropped."""
    device = torch.device(device)
    n = len(datas)
    crops = [torch.zeros((n, p.crops if p.kind == "multi_crop" else 1, 3, p.size, p.size), dtype=torch.uint8,
                         device=device) for p in preprocessing]
    status, error = ["ok"] * n, [None] * n
    width, height, decoded_on = [-1] * n, [-1] * n, ["cpu"] * n

    orientation = [probe_jpeg(data, max_pixels) for data in datas]
    on_device = [i for i, o in enumerate(orientation) if o is not None]
    decoded = decode_jpegs([datas[i] for i in on_device], device)
    for i, image in zip(on_device, decoded):
        if image is None:
            continue
        try:
            if orientation[i] in UPRIGHT:
                image = UPRIGHT[orientation[i]](image)
            for out, p in zip(crops, preprocessing):
                out[i] = crops_on_device(image, p)
        except Exception:  # out of device memory, say: the CPU path may still manage this image
            continue
        height[i], width[i] = image.shape[-2:]
        decoded_on[i] = "device"

    for i in range(n):
        if decoded_on[i] == "device":
            continue
        try:
            img = decode_image(datas[i], max_pixels=max_pixels)
            width[i], height[i] = img.info.get("source_size", img.size)
            for out, p in zip(crops, preprocessing):
                out[i] = torch.from_numpy(preprocess(img, p)).to(device)
        except ImageError as e:
            status[i], error[i] = "error", str(e)
        except Exception as e:  # a preprocessing bug on one odd image must not fail the whole run
            status[i], error[i] = "error", f"preprocess_failed: {type(e).__name__}: {e}"
        if status[i] == "error":
            width[i] = height[i] = -1
            for out in crops:
                out[i] = 0          # an image may fail after its first preprocessing was written
    return DecodedBatch(crops, status, error, width, height, decoded_on)


def probe_jpeg(data: bytes, max_pixels: int) -> int | None:
    """The EXIF orientation of a JPEG the device decoder should take, from its header alone.

    None sends the image down the CPU path, which also words the error of every bad one (``too_large``
    from the same header check, before any pixel is decoded) exactly as the CPU stage does."""
    if not data:
        return None
    try:
        with warnings.catch_warnings():
            # as in decode_image: max_pixels is the limit; PIL still refuses images over its own
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # only the JPEG parser sees the bytes; MPO (cameras' multi-picture JPEG) is a JPEG whose
            # first picture is what the CPU path decodes too
            img = Image.open(io.BytesIO(data), formats=("JPEG",))
            width, height = img.size
            # CMYK and YCCK JPEGs: nvjpeg has no CMYK output, and PIL's conversion is the reference
            if img.mode not in ("RGB", "L") or width * height > max_pixels:
                return None
            return img.getexif().get(0x0112, 1)
    except Exception:
        return None


def decode_jpegs(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """JPEG bytes -> uint8 (3, H, W) tensors on ``device`` as stored (no EXIF); None where decoding failed."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    # bytearray: torch.frombuffer wants writable memory; the decoder reads from the CPU, whatever the device
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs (in favour of TorchCodec) with a warning on every call
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        except Exception:  # a batched decode returns nothing when one image fails: find which, one by one
            decoded = []
            for data in encoded:
                try:
                    decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except Exception:
                    decoded.append(None)
            return decoded


def crops_on_device(image: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """Upright uint8 (3, H, W) -> uint8 crops (n, 3, S, S) on its device, as ``preprocess`` makes them."""
    from torchvision.transforms.v2 import functional as TF

    size = cfg.size
    _, height, width = image.shape
    short, long = sorted((width, height))
    if cfg.kind == "multi_crop" and size <= short and long <= cfg.max_side:
        return torch.stack([image[:, y:y + size, x:x + size]
                            for x, y in crop_positions(width, height, size, cfg.crops, cfg.seed)])
    # a strip's two-step resize would build far more pixels than its one crop (1 x 20000 -> 224 x 4.5
    # million); the CPU code resizes only the region the crop covers, so strips are left to it
    if cfg.kind == "resize_center_crop" and long <= MAX_RESIZE_ASPECT * short:
        # the CPU path's torchvision Resize(S) + CenterCrop(S) on a tensor: the same sizes and offsets; on
        # the CPU, v2's uint8 kernel follows PIL's fixed-point filter (and is many times faster than float)
        resized = TF.resize(image, [size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return TF.center_crop(resized, [size, size]).unsqueeze(0)
    # The rest are rare: multi_crop images scaled before cropping (PIL's resampling, which tensors do not
    # reproduce exactly) and strips. These run the CPU code itself on the decoded pixels.
    img = Image.fromarray(image.permute(1, 2, 0).cpu().numpy(), "RGB")
    return torch.from_numpy(preprocess(img, cfg)).to(image.device)


def decode_block(batch: dict[str, np.ndarray], preprocessing: list[PreprocessConfig], device,
                 max_pixels: int) -> dict:
    """An ``encoded_samples`` block -> the same rows with their crops on ``device`` (``crops_i`` tensors),
    as ``decode_samples`` gives them on the CPU; an image that cannot be decoded becomes an error row."""
    todo = np.flatnonzero(batch["status"] == "ok")
    out = decode_on_device([bytes(batch["data"][i]) for i in todo], preprocessing, device, max_pixels)
    block = {name: col.copy() for name, col in batch.items() if name != "data"}
    for name in ("status", "error", "width", "height"):
        block[name][todo] = getattr(out, name)
    for i, crops in enumerate(out.crops):
        full = torch.zeros((len(block["status"]), *crops.shape[1:]), dtype=torch.uint8, device=crops.device)
        full[torch.as_tensor(todo, device=crops.device)] = crops
        block[f"crops_{i}"] = full
    return block
