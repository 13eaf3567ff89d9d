"""Converters: public perceptual datasets and generic manifests -> WebDataset shards for training.

Each sample becomes ``<key>.<ext>`` (the original image bytes, never re-encoded) and ``<key>.json``
(``label`` plus where the sample came from). A converter only lists records (key, image location,
label, metadata) from the dataset's label files; ``write_shards`` reads the images and writes tars.

    koniq     SOURCE/koniq10k_scores_and_distributions.csv (image_name, MOS), images in SOURCE/1024x768/
    lamem     SOURCE/splits/{train,val,test}_{1..5}.txt ("image_name score" per line), images in SOURCE/images/
    emoset    SOURCE/{train,val,test}.json ([emotion, image_path, annotation_path] entries), paths under SOURCE
    manifest  a CSV or Parquet file with ``path`` (or ``url``) and ``label`` (a number or a class name);
              relative paths are resolved against the manifest's folder, any fsspec URL works

KonIQ and manifests have no official split: a seeded hash of each image's location assigns it to
one of ``fractions``' splits.
Output is deterministic: the same source and options give byte-identical shards (fixed tar mtime,
source order kept). A malformed line or a missing image becomes a ``Problem`` naming its file and
line; the other samples are still written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from perceptclip.shards import parse_json
from perceptclip.tasks import EMOSET_LABELS

KONIQ_CSV = "koniq10k_scores_and_distributions.csv"
KONIQ_IMAGES = "1024x768"
LAMEM_SPLITS = tuple(f"{part}_{i}" for part in ("train", "val", "test") for i in range(1, 6))
EMOSET_SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm"}


@dataclass
class Record:
    key: str
    image: str          # path or URL the image bytes are read from
    label: float | str  # a number (regression) or a class name
    where: str          # "file:line" of the label that listed it, for error messages
    meta: dict = field(default_factory=dict)
    name: str = ""      # the image as the label file names it: what a random split hashes


@dataclass
class Problem:
    where: str          # "file:line" (or "file row N" for Parquet)
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class ConvertReport:
    split: str
    written: int = 0
    shards: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"split": self.split, "written": self.written, "shards": self.shards,
                "problems": len(self.problems)}


# ---------------------------------------------------------------------------------------------- helpers

def _join(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/"), *parts)


def _open_text(path: str):
    import fsspec

    return fsspec.open(path, "r", encoding="utf-8", newline="")


def make_key(name: str) -> str:
    """A WebDataset key from an image name: no extension, and no dots (WebDataset splits the key at the
    first dot of the file name) or slashes."""
    stem = name.rsplit("/", 1)[-1]
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "sample"


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
    its name in the label file (not where the dataset is stored), so a record's split does not change when other rows are added, fixed or removed; the
    splits never overlap, and their sizes follow ``fractions`` up to sampling noise."""
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


def _number(text: str) -> float:
    value = float(text)
    if not np.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _label(value) -> float | str:
    """A manifest label: a number if it parses as one, else a class name."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return _number(str(value))
    text = str(value).strip()
    if not text:
        raise ValueError("empty label")
    try:
        return _number(text)
    except ValueError:
        return text


# ---------------------------------------------------------------------------------------------- datasets

def koniq_records(source: str) -> tuple[list[Record], list[Problem]]:
    path = _join(source, KONIQ_CSV)
    records, problems = [], []
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        missing = {"image_name", "MOS"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            try:
                name = (row["image_name"] or "").strip()
                if not name:
                    raise ValueError("empty image_name")
                meta = {"dataset": "koniq10k", "image_name": name, "mos": _number(row["MOS"])}
                if row.get("MOS_zscore"):
                    meta["mos_zscore"] = _number(row["MOS_zscore"])
            except (ValueError, TypeError) as e:
                problems.append(Problem(where, f"malformed row: {e}"))
                continue
            records.append(Record(make_key(name), _join(source, KONIQ_IMAGES, name), meta["mos"], where, meta, name))
    return records, problems


def lamem_records(source: str, split: str) -> tuple[list[Record], list[Problem]]:
    if split not in LAMEM_SPLITS:
        raise ValueError(f"LaMem split must be one of {', '.join(LAMEM_SPLITS)}, not {split!r}")
    path = _join(source, "splits", f"{split}.txt")
    records, problems = [], []
    with _open_text(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError(f"expected 'image_name score', got {line.strip()!r}")
                score = _number(parts[1])
            except ValueError as e:
                problems.append(Problem(where, f"malformed line: {e}"))
                continue
            meta = {"dataset": "lamem", "image_name": parts[0], "split": split}
            records.append(Record(make_key(parts[0]), _join(source, "images", parts[0]), score, where, meta))
    return records, problems


def emoset_records(source: str, split: str) -> tuple[list[Record], list[Problem]]:
    if split not in EMOSET_SPLITS:
        raise ValueError(f"EmoSet split must be one of {', '.join(EMOSET_SPLITS)}, not {split!r}")
    path = _join(source, f"{split}.json")
    with _open_text(path) as f:
        text = f.read()
    try:
        entries = parse_json(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except ValueError as e:                         # parse_json: nested too deeply
        raise ValueError(f"{path}: not an EmoSet split file ({e})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of [emotion, image_path, annotation_path]")
    # JSON lists are usually one entry per line; find each entry's line so errors point at it
    lines = _entry_lines(text, len(entries))
    records, problems = [], []
    for i, entry in enumerate(entries):
        where = f"{path}:{lines[i]}" if lines else f"{path} entry {i + 1}"
        if not (isinstance(entry, list) and len(entry) >= 2 and all(isinstance(x, str) for x in entry[:3])):
            problems.append(Problem(where, f"malformed entry {entry!r}: expected [emotion, image_path, annotation_path]"))
            continue
        emotion, image = entry[0], entry[1]
        if emotion not in EMOSET_LABELS:
            problems.append(Problem(where, f"unknown emotion {emotion!r}; EmoSet's are {', '.join(EMOSET_LABELS)}"))
            continue
        meta = {"dataset": "emoset", "image_path": image, "split": split}
        if len(entry) > 2:
            meta["annotation_path"] = entry[2]
        records.append(Record(make_key(image), _join(source, image), emotion, where, meta))
    return records, problems


def _entry_lines(text: str, count: int) -> list[int] | None:
    """1-based line of each top-level list entry, when the file puts one entry per line."""
    starts = [n for n, line in enumerate(text.splitlines(), start=1) if line.lstrip().startswith("[")
              and line.strip() not in ("[", "[[")]
    if len(starts) == count:
        return starts
    return None


def manifest_records(manifest: str) -> tuple[list[Record], list[Problem]]:
    base = manifest.rsplit("/", 1)[0] if "/" in manifest else "."
    rows = _read_manifest(manifest)
    records, problems = [], []
    for where, row in rows:
        image = row.get("path") if row.get("path") not in (None, "") else row.get("url")
        try:
            if image in (None, ""):
                raise ValueError("no path or url")
            label = _label(row.get("label") if row.get("label") is not None else "")
        except ValueError as e:
            problems.append(Problem(where, f"malformed row: {e}"))
            continue
        image = str(image).strip()
        location = image if "://" in image or image.startswith("/") else _join(base, image)
        meta = {"dataset": "manifest", "manifest": manifest, "path": image}
        records.append(Record(make_key(image), location, label, where, meta, image))
    return records, problems


def _read_manifest(manifest: str) -> list[tuple[str, dict]]:
    import fsspec

    if manifest.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        with fsspec.open(manifest, "rb") as f:
            table = pq.read_table(f)
        columns = set(table.column_names)
        if "label" not in columns or not columns & {"path", "url"}:
            raise ValueError(f"{manifest}: needs a 'label' column and a 'path' or 'url' column")
        return [(f"{manifest} row {i + 1}", row) for i, row in enumerate(table.to_pylist())]
    with _open_text(manifest) as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or ())
        if "label" not in columns or not columns & {"path", "url"}:
            raise ValueError(f"{manifest}: needs a 'label' column and a 'path' or 'url' column")
        return [(f"{manifest}:{reader.line_num}", row) for row in reader]


# ---------------------------------------------------------------------------------------------- writing

def _read_image(record: Record) -> tuple[bytes | None, str | None]:
    import fsspec

    try:
        with fsspec.open(record.image, "rb") as f:
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
    if ext in IMAGE_EXTS:
        return ext
    from PIL import Image

    try:
        return Image.open(io.BytesIO(data)).format.lower()
    except Exception:   # the bytes are no image PIL knows: report, do not guess
        return None


def write_shards(records: list[Record], output: str, split: str, shard_size: int = 1000,
                 threads: int = 16) -> ConvertReport:
    """Read each record's image and write ``output/<split>-NNNNNN.tar`` shards of ``shard_size`` samples."""
    import fsspec
    from webdataset import TarWriter

    report = ConvertReport(split=split)
    _unique_keys(records)
    fs, root = fsspec.core.url_to_fs(output)
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
                stream = fs.open(_join(root, name), "wb")
                writer = TarWriter(stream, encoder=False, mtime=0.0)
                report.shards.append(_join(output, name))
                written_in_shard = 0
            sample = {"label": record.label, **record.meta, "source": record.where}
            writer.write({"__key__": record.key, ext: data,
                          "json": json.dumps(sample, sort_keys=True).encode("utf-8")})
            written_in_shard += 1
            report.written += 1
    close()
    return report


def convert(dataset: str, source: str, output: str, split: str | None = None, shard_size: int = 1000,
            fractions: dict[str, float] | None = None, seed: int = 0) -> ConvertReport:
    """List ``dataset``'s records for ``split`` and write them as shards under ``output``.

    ``split``: LaMem ``train_1`` .. ``test_5`` (default ``train_1``); EmoSet ``train``/``val``/``test``
    (default ``train``); KonIQ and manifests a name in ``fractions`` or ``all`` (the default)."""
    if shard_size <= 0:
        raise ValueError("shard_size must be positive")
    if dataset == "koniq":
        split = split or "all"
        records, problems = koniq_records(source)
        records = random_split(records, split, fractions or DEFAULT_FRACTIONS, seed)
    elif dataset == "lamem":
        split = split or "train_1"
        records, problems = lamem_records(source, split)
    elif dataset == "emoset":
        split = split or "train"
        records, problems = emoset_records(source, split)
    elif dataset == "manifest":
        split = split or "all"
        records, problems = manifest_records(source)
        records = random_split(records, split, fractions or DEFAULT_FRACTIONS, seed)
    else:
        raise ValueError(f"unknown dataset {dataset!r}: koniq, lamem, emoset or manifest")
    report = write_shards(records, output, split, shard_size)
    report.problems[:0] = problems
    return report
