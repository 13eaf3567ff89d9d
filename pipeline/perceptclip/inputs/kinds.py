"""The scoring job's readers, one per input kind: what one shard holds, in blocks of samples.

    webdataset   a tar, read whole (``shards.read_shard``): a sample's files may sit anywhere in it
    parquet      a Parquet file with the images inside: a binary column, or a struct with ``bytes`` (and
                 ``path``) as Hugging Face ``datasets`` writes its ``Image`` feature; one row group at a
                 time, so a reader's memory does not grow with the file
    table        a table of image locations (``perceptclip.inputs.tables``)
    files        a virtual shard of image files in a folder or prefix (``perceptclip.inputs.files``)

A shard is opened first (``open_shard``): whatever makes the whole shard unreadable (missing, not Parquet,
truncated, its image column missing) raises ``ShardError`` there, before a single row is sent. Its
``blocks`` then never raise: what is wrong with one row, or one row group, becomes error rows, so every
row of the input ends as exactly one row of scores. Samples are dicts as ``read_shard`` gives them, plus
reserved names: ``__image__`` (the image's bytes, or None), ``__url__`` (where it came from) and
``__carry__`` (the ``carry_columns`` values).
"""

from __future__ import annotations

from perceptclip.inputs.base import InputSpec, ShardReader
from perceptclip.inputs.files import FilesReader
from perceptclip.inputs.parquet import NoImageColumn, ParquetReader
from perceptclip.inputs.shards import PARQUET_SUFFIXES, TABLE_SUFFIXES, VIRTUAL_SHARD, ShardError
from perceptclip.inputs.tables import TableReader
from perceptclip.inputs.tar import TarReader

INPUT_KINDS = ("auto", "webdataset", "parquet", "table", "files")


def input_kind(url: str, spec: InputSpec) -> str:
    """The kind of shard ``url`` is: the one stated, else told by its name (a tar unless it ends .parquet)."""
    if VIRTUAL_SHARD.search(url):
        return "files"             # whatever the format: only a folder of image files gives such a URL
    if spec.kind != "auto":
        return spec.kind
    name = url.rstrip("/").lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(TABLE_SUFFIXES):
        return "table"
    return "webdataset"


def open_shard(url: str, spec: InputSpec, options: dict | None = None, check: bool = False) -> ShardReader:
    """The reader of shard ``url``, or ``ShardError`` when the shard cannot be read as a whole. A Parquet
    file without image bytes is a table of image locations unless the format says otherwise. ``check``:
    open only to check the columns (the driver, before any work: a table is not copied)."""
    kind, options = input_kind(url, spec), options or {}
    if kind == "files":
        return FilesReader(url, spec, options)
    if kind == "table":
        return TableReader(url, spec, options, copy=not check)
    if kind == "webdataset":
        return TarReader(url, spec, options)
    try:
        return ParquetReader(url, spec, options)
    except NoImageColumn as e:
        if spec.kind != "auto":
            raise
        try:
            return TableReader(url, spec, options, copy=not check)
        except ShardError as table:
            if table.reason != "bad_columns":
                raise
            raise ShardError("bad_columns", f"{e.message}; nor does one hold image locations") from None


def check_first_shard(urls: list[str], spec: InputSpec, options: dict) -> None:
    """Open the first shard of each kind but tars before any work, so a wrong column name fails at start
    (naming the columns there are) instead of failing every shard an hour into a run."""
    seen: set[str] = set()
    for url in urls:
        try:
            kind = input_kind(url, spec)
        except ShardError as e:
            raise ValueError(f"input: {e.message}") from None
        if kind in seen or kind in ("webdataset", "files"):
            continue
        seen.add(kind)
        try:
            open_shard(url, spec, options, check=True).close()
        except ShardError as e:
            if e.reason == "bad_columns":
                raise ValueError(f"input: {e.message}") from None
            # a missing or broken first file is that shard's failure, reported with the others


