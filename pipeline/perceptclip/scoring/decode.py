"""The scoring job's decode stage: the CPU tasks that read shards and turn their samples into blocks of rows.

    read_and_decode    the Ray Data stage, one task per shard: its samples in blocks of ``block_rows``,
                       then its control row
    decode_samples     ``decode: cpu``: bytes -> image -> uint8 crops, once per distinct preprocessing
    encoded_samples    ``decode: device``: the encoded bytes; the model actors decode them on their device
                       (``device_decode.decode_block``)
    shard_row          the control row: how many samples the shard holds, or why it could not be read

A sample that cannot be read or decoded is an error row with its reason: one row per sample, whatever
it holds. What a shard holds, whatever its kind, comes from its reader (``perceptclip.inputs.kinds``).
Every task process imports this module, so it imports neither torch nor the model code (seconds of
start-up per process).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from perceptclip.core.schema import SHARD_ROW
from perceptclip.inputs.base import InputSpec, carried_text
from perceptclip.inputs.kinds import open_shard
from perceptclip.inputs.shards import ShardError, image_member, sample_info
from perceptclip.model.preprocess import DEFAULT_MAX_PIXELS, ImageError, PreprocessConfig, decode_image, preprocess


def decode_samples(shard: str, samples: list[dict], start: int, preprocessing: list[PreprocessConfig],
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, np.ndarray]:
    """One block of rows: sample metadata, status and, per preprocessing ``i``, uint8 crops ``crops_i``
    (n, crops, 3, S, S). A sample that cannot be decoded, or that the reader refused (``__error__``:
    a link, a duplicated key), is an error row with zero crops: one row per sample, whatever it holds."""
    block, images = sample_block(shard, samples, start)
    n = len(samples)
    crops = [np.zeros((n, p.crops if p.kind == "multi_crop" else 1, 3, p.size, p.size), np.uint8)
             for p in preprocessing]
    status, error, width, height = block["status"], block["error"], block["width"], block["height"]
    for i, data in enumerate(images):
        if data is None:
            continue
        try:
            img = decode_image(data, max_pixels=max_pixels)
            width[i], height[i] = img.info.get("source_size", img.size)
            for out, p in zip(crops, preprocessing):
                out[i] = preprocess(img, p)
        except ImageError as e:
            status[i], error[i] = "error", str(e)
        except Exception as e:  # a preprocessing bug on one odd image must not fail the whole run
            status[i], error[i] = "error", f"preprocess_failed: {type(e).__name__}: {e}"
    block.update({f"crops_{i}": c for i, c in enumerate(crops)})
    return block


def encoded_samples(shard: str, samples: list[dict], start: int) -> dict[str, np.ndarray]:
    """One block of rows for ``decode: device``: sample metadata and each image's encoded bytes in
    ``data`` (empty in error rows); the model actor decodes them on its device."""
    block, images = sample_block(shard, samples, start)
    # never None: a block whose column holds no bytes at all would reach Arrow as another type
    data = np.empty(len(images), dtype=object)
    data[:] = [b"" if d is None else d for d in images]
    block["data"] = data
    return block


def sample_block(shard: str, samples: list[dict], start: int) -> tuple[dict[str, np.ndarray], list[bytes | None]]:
    """The columns every row has, and each sample's image bytes. A sample that the reader refused
    (``__error__``: a link, a duplicated key, a null image) or that holds no image is already an error
    row (None)."""
    n = len(samples)
    status, error = np.full(n, "ok", dtype=object), np.full(n, None, dtype=object)
    images: list[bytes | None] = []
    for i, sample in enumerate(samples):
        ext = "__image__" if "__image__" in sample else image_member(sample)
        if "__error__" in sample:
            status[i], error[i] = "error", sample["__error__"]
        elif ext is None:
            status[i], error[i] = "error", str(ImageError(
                "no_image", f"no image file among {sorted(k for k in sample if k != '__key__')}"))
        images.append(sample[ext] if status[i] == "ok" else None)
    info = [sample_info(s) for s in samples]
    block = {
        "shard": np.full(n, shard, dtype=object),
        "ordinal": np.arange(start, start + n, dtype=np.int64),
        "key": np.array([s["__key__"] for s in samples], dtype=object),
        "status": status, "error": error,
        "width": np.full(n, -1, np.int32), "height": np.full(n, -1, np.int32),
        "url": np.array([s.get("__url__", x["url"]) for s, x in zip(samples, info)], dtype=object),
        "caption": np.array([x["caption"] for x in info], dtype=object),
        "carried": np.array([carried_text(s.get("__carry__")) for s in samples], dtype=object),
        "shard_rows": np.full(n, -1, np.int64),
    }
    return block, images


def shard_row(shard: str, rows: int, error: ShardError | None, preprocessing: list[PreprocessConfig],
              decode: str = "cpu") -> dict:
    """The control row: how many samples the shard holds, or why it could not be read."""
    # the block schema, zero rows: Ray Data batches blocks together, so every block has the same columns
    empty = decode_samples(shard, [], 0, preprocessing) if decode == "cpu" else encoded_samples(shard, [], 0)
    row = {name: np.zeros((1, *col.shape[1:]), col.dtype) for name, col in empty.items()}
    row.update(shard=np.array([shard], dtype=object), ordinal=np.array([-1]), key=np.array([None], dtype=object),
               status=np.array([SHARD_ROW], dtype=object), error=np.array([str(error) if error else None], dtype=object),
               width=np.array([-1], np.int32), height=np.array([-1], np.int32), url=np.array([None], dtype=object),
               caption=np.array([None], dtype=object), carried=np.array([None], dtype=object),
               shard_rows=np.array([rows]))
    if "data" in row:
        row["data"] = np.array([b""], dtype=object)
    return row


def read_and_decode(batch: dict[str, np.ndarray], preprocessing: list[PreprocessConfig], options: dict,
                    block_rows: int, max_pixels: int, decode: str = "cpu",
                    inputs: InputSpec | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data stage: a batch naming shards -> blocks of each shard's samples, then its control row.
    ``decode: cpu`` decodes and crops here; ``device`` sends the encoded images to the model actors.
    ``inputs``: what kind of shards they are (default: told by their names)."""
    for shard in batch["shard"]:
        shard = str(shard)
        try:
            reader = open_shard(shard, inputs or InputSpec(), options)
        except ShardError as e:
            yield shard_row(shard, 0, e, preprocessing, decode)
            continue
        rows = 0
        with reader:
            for part in reader.blocks(block_rows):
                yield decode_samples(shard, part, rows, preprocessing, max_pixels) if decode == "cpu" \
                    else encoded_samples(shard, part, rows)
                rows += len(part)
        yield shard_row(shard, rows, None, preprocessing, decode)
