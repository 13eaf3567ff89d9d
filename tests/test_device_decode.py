"""decode_on_device against the CPU path (decode_image + preprocess): the same rows, the same errors, and
crops within a measured tolerance. Every check runs with device="cpu" (torchvision's libjpeg-turbo
decoder, the same code path as on a GPU) and, on a CUDA machine, with device="cuda" (nvjpeg)."""

import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from perceptclip.core.metrics import srcc
from perceptclip.model.artifact import ArtifactMeta
from perceptclip.model.debug import tiny_model
from perceptclip.model.device_decode import decode_on_device
from perceptclip.model.preprocess import ImageError, PreprocessConfig, decode_image, preprocess
from perceptclip.model.scorer import Scorer
from support.images import image_bytes, make_image

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

# Largest pixel difference from the CPU path allowed per image: (max or None, mean) absolute uint8 levels.
# "cpu": libjpeg-turbo through torchvision decodes to PIL's pixels exactly; torchvision's uint8 resize
# differs from PIL's by 1 level at most in test_resize_over_random_sizes (mean at most 0.25, on portrait
# images) and by 2 where an image is scaled up (96 x 64 to 224).
# "cuda": nvjpeg's IDCT and chroma upsampling are not libjpeg's, so single pixels may differ a lot at
# sharp colour edges and only the mean is bounded, by torchvision's own bound for nvjpeg against
# libjpeg (mean < 2, its test_decode_jpegs_cuda). Not yet measured on a GPU here: tighten it when one is.
DECODE_TOLERANCE = {"cpu": (0, 0.0), "cuda": (None, 2.0)}
RESIZE_TOLERANCE = {"cpu": (2, 0.3), "cuda": (None, 2.0)}

CENTER = PreprocessConfig(kind="resize_center_crop", size=32)
MULTI = PreprocessConfig(kind="multi_crop", size=32, crops=3, max_side=128)


def cpu_path(data: bytes, cfg: PreprocessConfig) -> torch.Tensor:
    return torch.from_numpy(preprocess(decode_image(data), cfg))


def cpu_error(data: bytes, **kwargs) -> str:
    with pytest.raises(ImageError) as e:
        decode_image(data, **kwargs)
    return str(e.value)


def pixel_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    d = (a.cpu().int() - b.cpu().int()).abs()
    return int(d.max()), float(d.float().mean())


def within(difference: tuple[int, float], tolerance: tuple[int | None, float]) -> bool:
    return (tolerance[0] is None or difference[0] <= tolerance[0]) and difference[1] <= tolerance[1]


def with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return image_bytes(img, "JPEG", exif=exif)


def declared_size(data: bytes, width: int, height: int) -> bytes:
    """A JPEG whose frame header (SOF0) claims another size: what a decompression bomb looks like."""
    sof = data.index(b"\xff\xc0")
    return data[:sof + 5] + struct.pack(">HH", height, width) + data[sof + 9:]


def mpo(*images: Image.Image) -> bytes:
    """A camera's multi-picture JPEG: the first picture is the image."""
    buf = io.BytesIO()
    images[0].save(buf, "MPO", save_all=True, append_images=list(images[1:]))
    return buf.getvalue()


GOOD_JPEGS = {
    "96x64": image_bytes(make_image(1, (96, 64))),
    "300x200 q95": image_bytes(make_image(2, (300, 200)), quality=95),
    "200x300 q60": image_bytes(make_image(3, (200, 300)), quality=60),
    "512x384 4:4:4": image_bytes(make_image(4, (512, 384)), subsampling=0),
    "1000x600 progressive": image_bytes(make_image(5, (1000, 600)), progressive=True),
    "20x50 upscaled": image_bytes(make_image(6, (20, 50))),
    "grey 120x90": image_bytes(make_image(7, (120, 90), mode="L")),
    "strip 400x24": image_bytes(make_image(8, (400, 24))),
    "mpo 160x120": mpo(make_image(9, (160, 120)), make_image(10, (160, 120))),
}


@pytest.mark.parametrize("device", DEVICES)
def test_good_jpegs_match_the_cpu_path_within_tolerance(device):
    batch = decode_on_device(list(GOOD_JPEGS.values()), [CENTER, MULTI], device)
    assert batch.status == ["ok"] * len(GOOD_JPEGS) and batch.decoded_on == ["device"] * len(GOOD_JPEGS)
    assert all(c.device.type == device for c in batch.crops)
    assert batch.crops[0].shape == (len(GOOD_JPEGS), 1, 3, 32, 32) and batch.crops[0].dtype == torch.uint8
    assert batch.crops[1].shape == (len(GOOD_JPEGS), 3, 3, 32, 32)
    for i, (name, data) in enumerate(GOOD_JPEGS.items()):
        assert (batch.width[i], batch.height[i]) == decode_image(data).size, name
        for out, cfg, tolerance in ((batch.crops[0], CENTER, RESIZE_TOLERANCE[device]),
                                    (batch.crops[1], MULTI, DECODE_TOLERANCE[device])):
            difference = pixel_difference(out[i], cpu_path(data, cfg))
            assert within(difference, tolerance), f"{name} {cfg.kind}: (max, mean) {difference}"


@pytest.mark.parametrize("device", DEVICES)
def test_resize_over_random_sizes(device):
    rng = np.random.default_rng(0)
    sizes = [(int(w), int(h)) for w, h in rng.integers(16, 900, size=(40, 2))]
    datas = [image_bytes(make_image(i, size), quality=int(q)) for i, (size, q) in
             enumerate(zip(sizes, rng.integers(50, 98, size=40)))]
    configs = [PreprocessConfig(size=32), PreprocessConfig(size=224)]
    batch = decode_on_device(datas, configs, device)
    assert batch.decoded_on == ["device"] * len(datas)
    for out, cfg in zip(batch.crops, configs):
        for i, data in enumerate(datas):
            difference = pixel_difference(out[i], cpu_path(data, cfg))
            assert within(difference, RESIZE_TOLERANCE[device]), f"{sizes[i]} at {cfg.size}: {difference}"


@pytest.mark.parametrize("device", DEVICES)
def test_exif_orientation_matches_pil(device):
    img = make_image(8, (64, 40))        # not square, not symmetric: every orientation gives other pixels
    datas = [with_orientation(img, o) for o in range(1, 9)]
    crop = PreprocessConfig(kind="multi_crop", size=24, crops=4, max_side=64)   # unscaled: raw pixels
    batch = decode_on_device(datas, [crop], device)
    assert batch.decoded_on == ["device"] * 8
    for i, data in enumerate(datas):
        upright = decode_image(data)
        assert (batch.width[i], batch.height[i]) == upright.size == ((64, 40) if i < 4 else (40, 64))
        difference = pixel_difference(batch.crops[0][i], torch.from_numpy(preprocess(upright, crop)))
        assert within(difference, DECODE_TOLERANCE[device]), f"orientation {i + 1}: {difference}"


@pytest.mark.parametrize("device", DEVICES)
def test_bad_images_fall_back_one_by_one_with_the_cpu_paths_reasons(device):
    good = image_bytes(make_image(10, (80, 60)))
    cmyk = image_bytes(make_image(11, (80, 60), mode="CMYK"))
    png = image_bytes(make_image(12, (80, 60)), "PNG")
    truncated = good[:len(good) // 2]
    huge = declared_size(good, 60_000, 60_000)
    datas = [good, truncated, png, b"", cmyk, huge, b"not an image at all", good]
    batch = decode_on_device(datas, [CENTER, MULTI], device)

    # the truncated JPEG passes the header probe, fails the batched decode and then its own: CPU path
    assert batch.decoded_on == ["device", "cpu", "cpu", "cpu", "cpu", "cpu", "cpu", "device"]
    assert batch.status == ["ok", "error", "ok", "error", "ok", "error", "error", "ok"]
    for i in (1, 3, 5, 6):
        assert batch.error[i] == cpu_error(datas[i])
        assert (batch.width[i], batch.height[i]) == (-1, -1)
        assert all(not c[i].any() for c in batch.crops)
    assert [batch.error[i].split(":")[0] for i in (1, 3, 5, 6)] == ["corrupt", "empty", "too_large", "not_an_image"]
    for i in (2, 4):                      # what the CPU path decodes, it decodes exactly as the CPU stage
        assert batch.error[i] is None and (batch.width[i], batch.height[i]) == (80, 60)
        for out, cfg in zip(batch.crops, (CENTER, MULTI)):
            assert torch.equal(out[i].cpu(), cpu_path(datas[i], cfg))
    assert torch.equal(batch.crops[0][0], batch.crops[0][7]) and batch.crops[0][0].any()


@pytest.mark.parametrize("device", DEVICES)
def test_max_pixels_is_checked_from_the_header_with_the_cpu_paths_error(device):
    data = image_bytes(make_image(13, (300, 200)))
    batch = decode_on_device([data, image_bytes(make_image(14, (100, 100)))], [CENTER], device, max_pixels=20_000)
    assert batch.status == ["error", "ok"] and batch.decoded_on == ["cpu", "device"]
    assert batch.error[0] == cpu_error(data, max_pixels=20_000)
    assert batch.error[0].startswith("too_large: 300x200 exceeds the limit of 20000 pixels")


@pytest.mark.parametrize("device", DEVICES)
def test_an_empty_batch_has_no_rows(device):
    batch = decode_on_device([], [CENTER, MULTI], device)
    assert batch.status == [] and [c.shape[0] for c in batch.crops] == [0, 0]


@pytest.mark.parametrize("device", DEVICES)
def test_scores_rank_like_the_cpu_path(device):
    """Through a tiny model on the CPU, the scores of 24 JPEGs rank as the CPU path's (SRCC >= 0.999).
    multi_crop crops (unscaled here) are the decoded pixels themselves, so where decoding is the same
    computation (device="cpu") the scores meet the fp32 rule: within 1e-4 relative error (measured: 0).
    resize_center_crop is a different resize: its scores are within 1e-3 (measured: 1.2e-4)."""
    sizes = [(64 + 37 * i, 48 + 23 * (i % 7)) for i in range(24)]
    datas = [image_bytes(make_image(100 + i, size), quality=70 + i) for i, size in enumerate(sizes)]
    memorability = tiny_model("memorability", seed=4)
    iqa = tiny_model("iqa", seed=5)
    center_scorer = Scorer(memorability, ArtifactMeta.for_task("memorability", memorability.cfg), device="cpu")
    multi_scorer = Scorer(iqa, ArtifactMeta.for_task("iqa", iqa.cfg, crops=3, max_side=1024), device="cpu")
    # on "cuda" nvjpeg's pixels differ too: a looser bound, not yet measured on a GPU here
    relative_tolerance = {"cpu": {"resize_center_crop": 1e-3, "multi_crop": 1e-4},
                          "cuda": {"resize_center_crop": 5e-2, "multi_crop": 5e-2}}[device]
    configs = [center_scorer.meta.preprocess, multi_scorer.meta.preprocess]
    batch = decode_on_device(datas, configs, device)
    assert batch.status == ["ok"] * len(datas)

    for scorer, out in ((center_scorer, batch.crops[0]), (multi_scorer, batch.crops[1])):
        kind = scorer.meta.preprocess.kind
        ours = scorer.score(list(out.cpu()))[:, 0]
        reference = scorer.score([cpu_path(d, scorer.meta.preprocess) for d in datas])[:, 0]
        assert np.ptp(reference) > 1e-2                       # the images do score differently
        assert srcc(ours, reference) >= 0.999, kind
        relative = np.abs(ours - reference) / np.abs(reference)
        assert relative.max() <= relative_tolerance[kind], f"{kind}: {relative.max():.2e}"
