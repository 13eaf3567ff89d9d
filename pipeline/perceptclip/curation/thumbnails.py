"""Thumbnails of chosen samples, read from where their images are: a shard (tar, Parquet) read once, only
up to its last wanted sample, or, for a table of locations or a folder of image files, only the wanted
images, fetched from where they were read. Each becomes a small JPEG as a ``data:`` URI; a sample that
cannot be shown gets the reason instead, so a page shows no broken images."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from perceptclip.inputs.shards import ShardError, expand_shards, image_member, shard_name
from perceptclip.model.preprocess import ImageError, decode_image

THUMB_SIZE = 128            # longest side of a thumbnail, in pixels


@dataclass
class Thumb:
    """A sample's thumbnail as a ``data:`` URI, or why there is none."""

    uri: str | None = None
    problem: str | None = None


def shard_locations(shards: list[str], spec: str | list[str] | None, options: dict) -> dict[str, str | None]:
    """Where to read each shard named in the tables: the recorded URL, or the shard of the same name
    among ``spec`` (None when it has none)."""
    if spec is None:
        return {s: s for s in shards}
    try:
        found = {shard_name(u): u for u in expand_shards(spec, options)}
    except ValueError as e:
        raise ValueError(f"--shards: {e}") from None
    return {s: found.get(shard_name(s)) for s in shards}


def fetch_thumbnails(wanted: dict[str, dict[str, str | None]], locations: dict[str, str | None], options: dict,
                     progress: Callable[[str], None] = lambda _: None, workers: int = 8,
                     sizes: dict[tuple[str, str], int] | None = None) -> dict[tuple[str, str], Thumb]:
    """A thumbnail per wanted (shard, key), ``sizes[(shard, key)]`` pixels on its longest side (by default
    ``THUMB_SIZE``). Each shard is read once, only up to its last wanted sample, several at a time (the
    time goes in waiting on storage)."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    sizes = sizes or {}
    thumbs: dict[tuple[str, str], Thumb] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(shard_thumbnails, shard, keys, locations.get(shard), options,
                               {key: sizes.get((shard, key), THUMB_SIZE) for key in keys}): shard
                   for shard, keys in sorted(wanted.items())}
        for i, future in enumerate(as_completed(futures), 1):
            shard = futures[future]
            found = future.result()
            progress(f"thumbnails [{i}/{len(futures)}] {shard_name(shard)}: {len(found)} samples")
            thumbs.update({(shard, key): thumb for key, thumb in found.items()})
    return thumbs


def shard_thumbnails(shard: str, keys: dict[str, str | None], url: str | None, options: dict,
                     sizes: dict[str, int] | None = None) -> dict[str, Thumb]:
    """One shard's wanted samples (key -> where the image was read from) as thumbnails, read from ``url``
    (None: the shard is nowhere to be found)."""
    if url is None:
        return {key: Thumb(problem=f"{shard_name(shard)} is not among --shards") for key in keys}
    sizes = sizes or {}
    thumbs: dict[str, Thumb] = {}
    try:
        for sample in shard_samples(url, keys, options):
            if sample["__key__"] in keys and sample["__key__"] not in thumbs:
                thumbs[sample["__key__"]] = thumbnail(sample, sizes.get(sample["__key__"], THUMB_SIZE))
                if len(thumbs) == len(keys):
                    break
    except ShardError as e:
        problem = f"{e}; point --shards at where the shards are now"
        return thumbs | {key: Thumb(problem=problem) for key in keys.keys() - thumbs.keys()}
    gone = Thumb(problem=f"not in {url}; was the shard rewritten?")
    return thumbs | {key: gone for key in keys.keys() - thumbs.keys()}


def shard_samples(url: str, keys: dict[str, str | None], options: dict) -> Iterator[dict]:
    """Where to look for the wanted samples: a tar's or a Parquet file's own samples, in order; for a table
    of locations or a folder of image files, only the wanted images, fetched from where they were read."""
    from perceptclip.inputs.base import InputSpec
    from perceptclip.inputs.files import FilesReader
    from perceptclip.inputs.kinds import open_shard
    from perceptclip.inputs.tables import TableReader, fetch_images, fetch_options

    with open_shard(url, InputSpec(), options, check=True) as reader:
        if isinstance(reader, (TableReader, FilesReader)):
            located = ({"__key__": key, "__url__": where} for key, where in keys.items() if where)
            yield from fetch_images(located, fetch_options(options, 60.0), workers=8, timeout=60.0)
            return
        for block in reader.blocks(64):
            yield from block


def thumbnail(sample: dict, size: int = THUMB_SIZE) -> Thumb:
    ext = "__image__" if "__image__" in sample else image_member(sample)
    if sample.get("__error__"):
        return Thumb(problem=sample["__error__"])
    if ext is None or sample.get(ext) is None:
        return Thumb(problem="the sample has no image")
    try:
        img = decode_image(sample[ext], draft_size=size)
    except ImageError as e:
        return Thumb(problem=str(e))
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80 if size >= THUMB_SIZE else 75)
    return Thumb(uri="data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))
