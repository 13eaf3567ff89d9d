"""Converters: public perceptual datasets and generic manifests -> WebDataset shards for training.

    label file (perceptclip.training.datasets) -> the split's records -> each image read -> OUTPUT/<split>-NNNNNN.tar

Each sample becomes ``<key>.<ext>`` (the original image bytes, never re-encoded) and ``<key>.json``
(``label`` plus where the sample came from). KonIQ and manifests have no official split: a seeded hash
of each image's name assigns it to one of ``fractions``' splits. Output is deterministic: the same
source and options give byte-identical shards (fixed tar mtime, source order kept). A malformed line or
a missing image becomes a ``Problem`` naming its file and line; the other samples are still written.

What a conversion wrote, and with which settings, is recorded in ``OUTPUT/_conversions/<split>.json``.
A second conversion of the same split into the same OUTPUT would leave the first one's shards beside
its own, and a glob of OUTPUT would read both: it is refused, naming the first one's settings, unless
``overwrite``, which removes the first one's shards before writing. Shards named like the split's that
no conversion recorded are never touched. OUTPUT must hold neither the label file nor an image.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from perceptclip.core.storage import filesystem, join
from perceptclip.core.tasks import Task
from perceptclip.inputs.shards import IMAGE_EXTENSIONS
from perceptclip.output.destination import Destination, OutputRefused
from perceptclip.output.layout import CONVERSIONS_DIR
from perceptclip.training.datasets import (
    Problem,
    Record,
    emoset_records,
    koniq_records,
    label_file,
    lamem_records,
    manifest_records,
)

DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


@dataclass
class ConvertReport:
    split: str
    written: int = 0
    shards: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"split": self.split, "written": self.written, "shards": self.shards,
                "problems": len(self.problems)}


# ---------------------------------------------------------------------------------------------- splits

def _unique_keys(records: list[Record]) -> None:
    """Two images with the same file name in different folders would collide: number the later ones."""
    seen: dict[str, int] = {}
    for r in records:
        n = seen.get(r.key, 0)
        seen[r.key] = n + 1
        if n:
            r.key = f"{r.key}-{n + 1}"


def parse_fractions(text: str) -> dict[str, float]:
    """``"train=0.8,val=0.1,test=0.1"`` -> {name: fraction}; fractions must be positive and sum to 1."""
    fractions: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            fractions[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"fractions: expected name=number, got {part!r}") from None
        if not sep or not name.strip():
            raise ValueError(f"fractions: expected name=number, got {part!r}")
    if any(f <= 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
        raise ValueError(f"fractions must be positive and sum to 1, got {fractions}")
    return fractions


def random_split(records: list[Record], split: str, fractions: dict[str, float], seed: int) -> list[Record]:
    """The records of ``split`` ("all" for every record). Each image goes to a split by a seeded hash of
    its name in the label file (not where the dataset is stored), so a record's split does not change when
    other rows are added, fixed or removed; the splits never overlap, and their sizes follow ``fractions`` up
    to sampling noise."""
    if split == "all":
        return records
    if split not in fractions:
        raise ValueError(f"split {split!r} is not one of {', '.join(fractions)} (or all)")
    bounds = np.cumsum(list(fractions.values()))
    index = list(fractions).index(split)
    chosen = []
    for r in records:
        digest = hashlib.sha256(f"{seed}:{r.name or r.image}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2 ** 64          # uniform in [0, 1)
        if min(int(np.searchsorted(bounds, u, side="right")), len(bounds) - 1) == index:
            r.meta["split"] = split
            chosen.append(r)
    return chosen


# ---------------------------------------------------------------------------------------------- writing

def _read_image(record: Record) -> tuple[bytes | None, str | None]:
    try:
        fs, path = filesystem(record.image, {})
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, f"image not found: {record.image}"
    except OSError as e:
        return None, f"cannot read image {record.image}: {e}"
    if not data:
        return None, f"empty image file: {record.image}"
    return data, None


def _image_ext(record: Record, data: bytes) -> str | None:
    ext = record.image.rsplit("/", 1)[-1].rpartition(".")[2].lower()
    if ext in IMAGE_EXTENSIONS:
        return ext
    from PIL import Image

    try:
        return Image.open(io.BytesIO(data)).format.lower()
    except Exception:   # the bytes are no image PIL knows: report, do not guess
        return None


def write_shards(records: list[Record], output: str, split: str, shard_size: int = 1000,
                 threads: int = 16) -> ConvertReport:
    """Read each record's image and write ``output/<split>-NNNNNN.tar`` shards of ``shard_size`` samples."""
    from webdataset import TarWriter

    report = ConvertReport(split=split)
    _unique_keys(records)
    fs, root = filesystem(output, {})
    fs.makedirs(root, exist_ok=True)
    writer, stream = None, None

    def close():
        nonlocal writer, stream
        if writer is not None:
            writer.close()
            stream.close()
            writer, stream = None, None

    written_in_shard = 0
    # images are read in threads (object stores are latency-bound); map keeps the source order
    with ThreadPoolExecutor(threads) as pool:
        for record, (data, error) in zip(records, pool.map(_read_image, records)):
            ext = _image_ext(record, data) if data is not None else None
            if data is not None and ext is None:
                error = f"not a recognised image: {record.image}"
            if error:
                report.problems.append(Problem(record.where, error))
                continue
            if writer is None or written_in_shard == shard_size:
                close()
                name = f"{split}-{len(report.shards):06d}.tar"
                stream = fs.open(join(root, name), "wb")
                writer = TarWriter(stream, encoder=False, mtime=0.0)
                report.shards.append(join(output, name))
                written_in_shard = 0
            sample = {"label": record.label, **record.meta, "source": record.where}
            writer.write({"__key__": record.key, ext: data,
                          "json": json.dumps(sample, sort_keys=True, allow_nan=False).encode("utf-8")})
            written_in_shard += 1
            report.written += 1
    close()
    return report


# ---------------------------------------------------------------------------------------------- the record

def _shard_name(split: str) -> re.Pattern:
    return re.compile(re.escape(split) + r"-\d{6}\.tar")


def _describe(record: dict) -> str:
    """An earlier conversion's settings, for a person: what to compare with the command just typed."""
    parts = [f"dataset {record['dataset']}", f"source {record['source']}", f"shard_size {record['shard_size']}"]
    if record.get("fractions"):
        parts += [f"fractions {','.join(f'{k}={v:g}' for k, v in record['fractions'].items())}",
                  f"seed {record['seed']}"]
    if record.get("complete"):
        parts.append(f"{record['written']} samples in {len(record['shards'])} shards")
    else:
        parts.append("never finished")
    return ", ".join(parts)


def _claim(fs, root: str, output: str, settings: dict, overwrite: bool) -> str:
    """Make ``output`` ready for the split's shards and record the conversion as started; returns the
    record's path. Refuses to write beside another conversion's shards of the split, or beside shards of
    its name that no conversion recorded."""
    split = settings["split"]
    path = posixpath.join(root, CONVERSIONS_DIR, f"{split}.json")
    earlier = json.loads(fs.cat_file(path)) if fs.exists(path) else None
    existing = sorted(p for p in fs.glob(posixpath.join(root, f"{split}-*.tar"))
                      if _shard_name(split).fullmatch(posixpath.basename(p)))
    if earlier is None and existing:
        names = ", ".join(posixpath.basename(p) for p in existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise ValueError(f"--output: {output} already holds shards of split {split!r} ({names}) that no conversion "
                         f"recorded; they are never overwritten: move them, or choose another --output")
    if earlier is not None and not overwrite:
        raise ValueError(f"--output: {output} already holds split {split!r} of an earlier conversion "
                         f"({_describe(earlier)}); pass --overwrite to replace its shards, or choose another --output")
    for p in existing:
        fs.rm_file(p)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, json.dumps({**settings, "complete": False}, indent=1).encode())
    return path


def partition(settings: dict) -> dict:
    """What decides which split a sample falls in. Splits converted into one output must share it, so
    that no sample is in two: KonIQ's and a manifest's fractions and seed (or ``all``, every sample);
    LaMem's split set (``train_1``, ``val_1`` and ``test_1`` are one); EmoSet's official split."""
    dataset, split = settings["dataset"], settings["split"]
    if dataset in ("koniq", "manifest"):
        return {"split": "all"} if split == "all" else {"fractions": settings["fractions"], "seed": settings["seed"]}
    if dataset == "lamem":
        return {"split_set": split.rsplit("_", 1)[-1]}
    return {"split": "official"}


def open_output(output: str, dataset: str, source: str, split: str, settings: dict, images: list[str],
                overwrite: bool, fs, root: str) -> Destination:
    """The output, apart from the label file and the images, and partitioned as the splits already in it."""
    others = [p for p in _recorded_splits(fs, root) if p != split]
    identity = {"dataset": dataset, "source": source if "://" in source else os.path.abspath(source),
                "partition": partition(settings)}
    try:
        return Destination.open(output, "convert", {}, overwrite=overwrite and not others, compare_inputs=False,
                                settings=identity, earlier=lambda: _legacy_identity(fs, root),
                                inputs={"the label file": [label_file(dataset, source, split)], "the images": images},
                                made_from=[{"url": identity["source"], "kind": dataset}])
    except OutputRefused as e:
        if not others:
            raise
        raise OutputRefused(f"{e}".split("; choose another output")[0] + f"; it holds the splits {', '.join(others)}, "
                            f"so a sample would be in two splits: convert with the same settings, or into another "
                            f"output") from None


def _recorded_splits(fs, root: str) -> list[str]:
    try:
        names = fs.ls(posixpath.join(root, CONVERSIONS_DIR), detail=False)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(n).removesuffix(".json") for n in names if n.endswith(".json"))


def _legacy_identity(fs, root: str) -> dict | None:
    """An output converted before outputs had records: the identity its first split's record gives."""
    for split in _recorded_splits(fs, root):
        try:
            settings = json.loads(fs.cat_file(posixpath.join(root, CONVERSIONS_DIR, f"{split}.json")))
            source = settings["source"]
            return {"dataset": settings["dataset"], "source": source if "://" in source else os.path.abspath(source),
                    "partition": partition(settings)}
        except (ValueError, KeyError, OSError):
            continue
    return None


def convert(dataset: str, source: str, output: str, split: str | None = None, shard_size: int = 1000,
            fractions: dict[str, float] | None = None, seed: int = 0, overwrite: bool = False,
            task: Task | None = None) -> ConvertReport:
    """List ``dataset``'s records for ``split`` and write them as shards under ``output``.

    ``split``: LaMem ``train_1`` .. ``test_5`` (default ``train_1``); EmoSet ``train``/``val``/``test``
    (default ``train``); KonIQ and manifests a name in ``fractions`` or ``all`` (the default).
    ``overwrite``: replace an earlier conversion of the split in ``output`` (refused without it).
    ``task`` (manifests only): the labels must fit it (numbers, or its class names)."""
    if shard_size <= 0:
        raise ValueError("shard_size must be positive")
    if task is not None and dataset != "manifest":
        raise ValueError(f"--task: only for a manifest; {dataset}'s labels are its own")
    split, records, problems = _records(dataset, source, split, fractions or DEFAULT_FRACTIONS, seed, task)
    settings = {"dataset": dataset, "source": source, "split": split, "shard_size": shard_size}
    if task is not None:
        settings["task"] = task.definition()
    if dataset in ("koniq", "manifest") and split != "all":
        settings.update(fractions=fractions or DEFAULT_FRACTIONS, seed=seed)
    fs, root = filesystem(output, {})
    open_output(output, dataset, source, split, settings, [r.image for r in records], overwrite, fs, root).begin(
        remove=lambda: [])          # an earlier conversion of this split: its shards go in _claim, and only those
    path = _claim(fs, root, output, settings, overwrite)
    report = write_shards(records, output, split, shard_size)
    report.problems[:0] = problems
    fs.pipe_file(path, json.dumps({**settings, "complete": True, "written": report.written,
                                   "problems": len(report.problems), "shards": report.shards}, indent=1).encode())
    return report


def _records(dataset: str, source: str, split: str | None, fractions: dict[str, float],
             seed: int, task: Task | None = None) -> tuple[str, list[Record], list[Problem]]:
    """The split's name (its default filled in), its records and the problems of its label file."""
    if dataset == "koniq":
        split = split or "all"
        records, problems = koniq_records(source)
        return split, random_split(records, split, fractions, seed), problems
    if dataset == "lamem":
        split = split or "train_1"
        return (split, *lamem_records(source, split))
    if dataset == "emoset":
        split = split or "train"
        return (split, *emoset_records(source, split))
    if dataset == "manifest":
        split = split or "all"
        records, problems = manifest_records(source, task)
        return split, random_split(records, split, fractions, seed), problems
    raise ValueError(f"unknown dataset {dataset!r}: koniq, lamem, emoset or manifest")
