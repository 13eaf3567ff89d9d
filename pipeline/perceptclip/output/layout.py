"""Every path under an output, in one place.

    OUT/<shard>.parquet              one score table per input shard, named after it so scores join back
    OUT/_markers/<shard>.json        the shard's marker, written after its table: a shard is done only when
                                     its marker exists (object stores have no rename)
    OUT/_runs/<run_id>.json          each run's summary: shards, samples, errors by reason, images/s
    OUT/_inputs/<source>/...         the grouping of a folder of image files into virtual shards
    OUT/_conversions/<split>.json    what each split of a conversion wrote, and from what
    OUT/_output.json                 what the output was made from and with (``output.destination``)
"""

from __future__ import annotations

import json

from perceptclip.core.storage import filesystem, join
from perceptclip.inputs.shards import LISTINGS_DIR

MARKERS_DIR = "_markers"
RUNS_DIR = "_runs"
CONVERSIONS_DIR = "_conversions"
RECORD_FILE = "_output.json"
# what a command keeps beside its outputs: never an input shard, never a table of scores
RESERVED_DIRS = (MARKERS_DIR, RUNS_DIR, LISTINGS_DIR, CONVERSIONS_DIR)


def table_path(dest: str, name: str) -> str:
    """Where the score table of the shard called ``name`` lives under ``dest``."""
    return join(dest, f"{name}.parquet")


def marker_path(dest: str, name: str) -> str:
    """Where the marker of the shard called ``name`` lives under ``dest``."""
    return join(dest, MARKERS_DIR, f"{name}.json")


def shard_of(table: str) -> str:
    """The name of the shard a score table was written for: ``.../shard-000012.parquet`` -> ``shard-000012``."""
    return table.rsplit("/", 1)[-1].removesuffix(".parquet")


def committed_names(dest: str, options: dict) -> set[str]:
    """Names of the shards with a marker under ``dest``: one listing, no reads."""
    fs, root = filesystem(join(dest, MARKERS_DIR), options)
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return set()
    return {e.rsplit("/", 1)[-1].removesuffix(".json") for e in entries if e.endswith(".json")}




def json_files(folder: str, options: dict):
    """``(fs, paths)``: the JSON files directly in ``folder`` (markers, run summaries), in name order; none
    when the folder is not there."""
    fs, root = filesystem(folder, options)
    try:
        return fs, sorted(p for p in fs.ls(root, detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        return fs, []


def read_markers(dest: str, options: dict) -> list[dict]:
    """Every marker under ``dest``, in name order (an unreadable one is left out)."""
    fs, paths = json_files(join(dest, MARKERS_DIR), options)
    out = []
    for path in paths:
        try:
            out.append(json.loads(fs.cat_file(path)))
        except (ValueError, OSError):
            continue
    return out


def listings_dir(dest: str) -> str:
    """Where the groupings of folders of image files into virtual shards are recorded under ``dest``."""
    return join(dest, LISTINGS_DIR)


def runs_dir(dest: str) -> str:
    return join(dest, RUNS_DIR)


def conversion_record(dest: str, split: str) -> str:
    """The record of one split's conversion under ``dest``."""
    return join(dest, CONVERSIONS_DIR, f"{split}.json")
