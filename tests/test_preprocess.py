import io

import numpy as np
import pytest
import torch
from PIL import Image

from perceptclip.model.preprocess import (
    ImageError,
    PreprocessConfig,
    crop_positions,
    decode_image,
    normalize,
    preprocess,
)
from support.images import image_bytes, make_image


def test_resize_center_crop_matches_torchvision_reference():
    from torchvision import transforms as T

    img = make_image(5, (300, 200))
    reference = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    cfg = PreprocessConfig()
    ours = normalize(torch.from_numpy(preprocess(img, cfg)), cfg.mean, cfg.std)
    assert ours.shape == (1, 3, 224, 224)
    torch.testing.assert_close(ours[0], reference(img), rtol=0, atol=1e-5)


def test_multi_crop_is_deterministic_and_unresized():
    img = make_image(7, (400, 300))
    cfg = PreprocessConfig(kind="multi_crop", size=224, crops=4)
    a, b = preprocess(img, cfg), preprocess(img, cfg)
    assert a.shape == (4, 3, 224, 224) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    x, y = crop_positions(400, 300, 224, 4, 0)[0]
    expected = np.asarray(img)[y:y + 224, x:x + 224].transpose(2, 0, 1)
    np.testing.assert_array_equal(a[0], expected)                                 # pixels straight from the image


def test_multi_crop_scales_small_and_huge_images():
    cfg = PreprocessConfig(kind="multi_crop", size=64, crops=2, max_side=128)
    assert preprocess(make_image(1, (40, 30)), cfg).shape == (2, 3, 64, 64)
    assert preprocess(make_image(1, (1000, 200)), cfg).shape == (2, 3, 64, 64)


def test_bad_preprocess_config_names_the_problem():
    with pytest.raises(ValueError, match="^kind: must be one of resize_center_crop, multi_crop, got 'squash'"):
        PreprocessConfig(kind="squash")
    with pytest.raises(ValueError, match=r"^max_side: must be >= size \(224\), got 100"):
        PreprocessConfig(size=224, max_side=100)
    with pytest.raises(ValueError, match="^preprocess.crops: must be an integer >= 1, got 0"):
        PreprocessConfig.from_mapping({"kind": "multi_crop", "crops": 0}, "preprocess.")


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA", "1"])
def test_every_mode_becomes_rgb(mode):
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    img = decode_image(image_bytes(make_image(2, (40, 30), mode=mode), fmt))
    assert img.mode == "RGB" and img.size == (40, 30)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))                    # fully transparent red
    assert decode_image(image_bytes(rgba, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    assert decode_image(image_bytes(pal, "PNG", transparency=0)).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_images_are_scaled_not_clipped():
    arr = np.full((8, 8), 32768, dtype=np.uint16)                       # mid grey in 16 bits
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    r, g, b = decode_image(image_bytes(img, "PNG")).getpixel((0, 0))
    assert r == g == b and 120 <= r <= 135


def test_exif_orientation_is_applied():
    img = make_image(3, (60, 20))
    exif = Image.Exif()
    exif[0x0112] = 6                                                    # rotate 90 degrees clockwise
    assert decode_image(image_bytes(img, "JPEG", exif=exif)).size == (20, 60)


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"this is text, not an image", "not_an_image"),
])
def test_undecodable_bytes_raise_image_error(data, reason):
    with pytest.raises(ImageError) as err:
        decode_image(data)
    assert err.value.reason == reason


def test_truncated_and_oversized_images():
    data = image_bytes(make_image(4, (200, 200)))
    with pytest.raises(ImageError) as err:
        decode_image(data[: len(data) // 2])
    assert err.value.reason == "corrupt"
    with pytest.raises(ImageError) as err:
        decode_image(data, max_pixels=100 * 100)
    assert err.value.reason == "too_large"


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    r, g, b = decode_image(buf.getvalue()).getpixel((5, 5))
    assert r > 200 and b < 50


QUADRANTS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255))   # top-left, -right, bottom-left, -right


def upright() -> np.ndarray:
    """64 x 32 with four coloured quadrants: each of the 8 orientations moves them differently."""
    arr = np.zeros((32, 64, 3), np.uint8)
    for (row, col), colour in zip([(0, 0), (0, 1), (1, 0), (1, 1)], QUADRANTS):
        arr[16 * row:16 * (row + 1), 32 * col:32 * (col + 1)] = colour
    return arr


# How a camera stores the upright picture for each EXIF orientation (the tag says where the stored 0th
# row and 0th column are in the picture; TIFF 6.0 / EXIF 2.3), written here from the standard.
STORED = {
    1: lambda a: a,                                  # top, left
    2: lambda a: a[:, ::-1],                         # top, right: mirrored left-right
    3: lambda a: a[::-1, ::-1],                      # bottom, right: turned half a circle
    4: lambda a: a[::-1],                            # bottom, left: mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),               # left, top: transposed
    6: lambda a: np.rot90(a, 1),                     # right, top: turned a quarter anticlockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),  # right, bottom: transposed across the other diagonal
    8: lambda a: np.rot90(a, -1),                    # left, bottom: turned a quarter clockwise
}


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_every_exif_orientation_gives_the_upright_picture(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = Image.fromarray(np.ascontiguousarray(STORED[orientation](upright())))
    img = decode_image(image_bytes(stored, "JPEG", quality=95, exif=exif))
    assert img.size == (64, 32) and img.info["source_size"] == (64, 32)
    assert np.abs(np.asarray(img, dtype=np.int16) - upright()).mean() < 4


@pytest.mark.parametrize("width,height,max_pixels", [
    (6000, 6000, 16_000_000),          # over max_pixels: refused from the header
    (14000, 14000, 10**12),            # over PIL's own limit, whatever max_pixels says
])
def test_a_decompression_bomb_is_refused_before_any_pixel_is_decoded(width, height, max_pixels):
    from support.hostile import png_bomb

    data = png_bomb(width, height)
    assert len(data) < width * height // 500                    # kilobytes that would decode to megapixels
    before = Image.core.get_stats()["new_count"]                # images PIL has allocated so far
    with pytest.raises(ImageError) as err:
        decode_image(data, max_pixels=max_pixels)
    assert err.value.reason == "too_large"
    assert Image.core.get_stats()["new_count"] == before        # not one image allocated


@pytest.mark.parametrize("size", [(1, 4000), (4000, 1), (3, 200)])
def test_strips_are_cropped_without_building_a_huge_image(size):
    from torchvision.transforms import functional as TF

    img = make_image(8, size)
    before = Image.core.get_stats()["allocated_blocks"]           # PIL's 16 MiB memory blocks
    crops = preprocess(img, PreprocessConfig(size=224))
    assert Image.core.get_stats()["allocated_blocks"] - before <= 3
    # the two torchvision steps, for comparison: the same picture, within one level per pixel
    reference = np.asarray(TF.center_crop(TF.resize(img, 224), [224, 224]), dtype=np.int16)
    assert np.abs(crops[0].transpose(1, 2, 0).astype(np.int16) - reference).max() <= 1
    multi = preprocess(img, PreprocessConfig(kind="multi_crop", size=224, crops=2, max_side=512))
    assert multi.shape == (2, 3, 224, 224)


def test_only_the_listed_formats_are_opened():
    from perceptclip.inputs.shards import IMAGE_EXTENSIONS
    from perceptclip.model.preprocess import IMAGE_FORMATS

    registered = Image.registered_extensions()
    assert {registered[f".{ext}"] for ext in IMAGE_EXTENSIONS} == set(IMAGE_FORMATS)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"    # PIL would hand it to Ghostscript
    assert Image.open(io.BytesIO(eps)).format == "EPS"
    with pytest.raises(ImageError) as err:
        decode_image(eps)
    assert err.value.reason == "not_an_image"
    pcx = image_bytes(make_image(1, (8, 8)), "PCX")                           # a format PIL reads, not listed
    with pytest.raises(ImageError) as err:
        decode_image(pcx)
    assert err.value.reason == "not_an_image"
