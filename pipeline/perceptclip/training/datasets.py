"""The datasets ``perceptclip convert`` knows: each one's label file read into ``Record``s (key, where
the image is, label) and ``Problem``s (a line that cannot be used, named by its file and line).

    koniq     SOURCE/koniq10k_scores_and_distributions.csv (image_name, MOS), images in SOURCE/1024x768/
    lamem     SOURCE/splits/{train,val,test}_{1..5}.txt ("image_name score" per line), images in SOURCE/images/
    emoset    SOURCE/{train,val,test}.json ([emotion, image_path, annotation_path] entries), paths under SOURCE
    manifest  a CSV or Parquet file with ``path`` (or ``url``) and ``label``; relative paths are resolved
              against the manifest's folder, any fsspec URL works

A manifest's labels are numbers (a regression score) or class names, one kind per manifest: the kind
most of its rows hold (numbers on a tie). A row of the other kind is a problem, and so is a number that
is not finite (``nan``, ``inf``): no label is guessed into a class name. Integers stay integers.
"""

from __future__ import annotations

import csv
import json
import posixpath
import re
from dataclasses import dataclass, field

import numpy as np

from perceptclip.core.storage import filesystem, read_parquet
from perceptclip.core.tasks import EMOSET_LABELS, Task
from perceptclip.inputs.shards import parse_json

KONIQ_CSV = "koniq10k_scores_and_distributions.csv"
KONIQ_IMAGES = "1024x768"
LAMEM_SPLITS = tuple(f"{part}_{i}" for part in ("train", "val", "test") for i in range(1, 6))
EMOSET_SPLITS = ("train", "val", "test")


@dataclass
class Record:
    key: str
    image: str          # path or URL the image bytes are read from
    label: int | float | str   # a number (regression, or a class index) or a class name
    where: str          # "file:line" of the label that listed it, for error messages
    meta: dict = field(default_factory=dict)
    name: str = ""      # the image as the label file names it: what a random split hashes


@dataclass
class Problem:
    where: str          # "file:line" (or "file row N" for Parquet)
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


# ---------------------------------------------------------------------------------------------- helpers

def _join(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/"), *parts)


def _open_text(path: str):
    fs, where = filesystem(path, {})
    return fs.open(where, "r", encoding="utf-8", newline="")


def make_key(name: str) -> str:
    """A WebDataset key from an image name: no extension, and no dots (WebDataset splits the key at the
    first dot of the file name) or slashes."""
    stem = name.rsplit("/", 1)[-1]
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "sample"


def _number(text: str) -> float:
    value = float(text)
    if not np.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _label(value) -> int | float | str:
    """A manifest label as its file holds it: an integer, a finite number, or text (a class name)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    text = str(value).strip()
    if not text:
        raise ValueError("empty label")
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    if not np.isfinite(number):
        raise ValueError(f"label {text!r} is not a finite number")
    return number


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


def label_file(dataset: str, source: str, split: str) -> str:
    """The file that lists ``dataset``'s records of ``split``."""
    files = {"koniq": _join(source, KONIQ_CSV), "lamem": _join(source, "splits", f"{split}.txt"),
             "emoset": _join(source, f"{split}.json"), "manifest": source}
    return files[dataset]


def manifest_records(manifest: str, task: Task | None = None) -> tuple[list[Record], list[Problem]]:
    """A manifest's rows as records, each label as the file holds it: a number for a regression, a class
    name for a classification. With ``task`` its kind decides, and a class name must be one of its
    classes; without, what most rows hold. A row that does not fit is a problem with its file and line."""
    base = manifest.rsplit("/", 1)[0] if "/" in manifest else "."
    rows = []                       # (where, image, the label or the error that makes the row a problem)
    for where, row in _read_manifest(manifest):
        image = row.get("path") if row.get("path") not in (None, "") else row.get("url")
        try:
            if image in (None, ""):
                raise ValueError("no path or url")
            rows.append((where, str(image).strip(), _label(row.get("label") if row.get("label") is not None else "")))
        except ValueError as e:
            rows.append((where, None, e))
    labels = [label for _, _, label in rows if not isinstance(label, ValueError)]
    names = sum(isinstance(label, str) for label in labels)
    numeric = names <= len(labels) - names          # the manifest's kind: what most of its rows hold
    if task is not None:
        numeric = not task.is_classification
    records, problems = [], []
    for where, image, label in rows:
        if isinstance(label, ValueError):
            problems.append(Problem(where, f"malformed row: {label}"))
        elif task is not None and task.is_classification and isinstance(label, str) and label not in task.labels:
            problems.append(Problem(where, f"label {label!r} is not a class of {task.name}: "
                                    f"{', '.join(task.labels)}"))
        elif isinstance(label, str) == numeric:
            problems.append(Problem(where, _misfit(label, numeric, task)))
        else:
            location = image if "://" in image or image.startswith("/") else _join(base, image)
            meta = {"dataset": "manifest", "manifest": manifest, "path": image}
            records.append(Record(make_key(image), location, label, where, meta, image))
    return records, problems


def _misfit(label, numeric: bool, task: Task | None) -> str:
    if task is not None:
        return (f"label {label!r} is not a number: {task.name} is a regression" if numeric else
                f"label {label!r} is not a class name: {task.name}'s classes are {', '.join(task.labels)}")
    return (f"label {label!r} is not a number; the manifest's other labels are numbers" if numeric else
            f"label {label!r} is a number; the manifest's other labels are class names")


def _read_manifest(manifest: str) -> list[tuple[str, dict]]:
    if manifest.endswith((".parquet", ".pq")):
        fs, where = filesystem(manifest, {})
        with fs.open(where, "rb") as f:
            table = read_parquet(f)
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
