"""The scoring job's readers, one per input kind: what one shard holds, in blocks of samples.

    webdataset   a tar, read whole (``shards.read_shard``): a sample's files may sit anywhere in it
    parquet      a Parquet file with the images inside: a binary column, or a struct with ``bytes`` (and
                 ``path``) as Hugging Face ``datasets`` writes its ``Image`` feature; one row group at a
                 time, so a reader's memory does not grow with the file
    table        a table of image locations (``perceptclip.tables``)
    files        a virtual shard of image files in a folder or prefix (``perceptclip.files``)

A shard is opened first (``open_shard``): whatever makes the whole shard unreadable (missing, not Parquet,
truncated, its image column missing) raises ``ShardError`` there, before a single row is sent. Its
``blocks`` then never raise: what is wrong with one row, or one row group, becomes error rows, so every
row of the input ends as exactly one row of scores. Samples are dicts as ``read_shard`` gives them, plus
reserved names: ``__image__`` (the image's bytes, or None), ``__url__`` (where it came from) and
``__carry__`` (the ``carry_columns`` values).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from array import array

import json
from collections.abc import Iterator
from dataclasses import dataclass

from perceptclip.shards import (MAX_META_BYTES, PARQUET_SUFFIXES, TABLE_SUFFIXES, VIRTUAL_SHARD, ShardError,
                                parse_json, read_shard)
from perceptclip.storage import filesystem, redact_text

INPUT_FORMATS = ("auto", "webdataset", "parquet", "table", "files")
KEY_COLUMNS = ("__key__", "key", "id")          # the key column when none is named, first found


@dataclass(frozen=True)
class InputSpec:
    """What the read tasks need to know about the input (``ScoreConfig`` documents each field)."""

    format: str = "auto"
    image_column: str | None = None
    key_column: str | None = None
    carry_columns: tuple[str, ...] = ()
    fetch_workers: int = 32              # tables, files: image requests in flight per read task
    fetch_timeout_s: float = 30.0        # tables, files: a request without an answer by then is an error row


def input_kind(url: str, spec: InputSpec) -> str:
    """The kind of shard ``url`` is: the one stated, else told by its name (a tar unless it ends .parquet)."""
    if VIRTUAL_SHARD.search(url):
        return "files"             # whatever the format: only a folder of image files gives such a URL
    if spec.format != "auto":
        return spec.format
    name = url.rstrip("/").lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(TABLE_SUFFIXES):
        return "table"
    return "webdataset"


def open_shard(url: str, spec: InputSpec, options: dict | None = None, check: bool = False) -> "ShardReader":
    """The reader of shard ``url``, or ``ShardError`` when the shard cannot be read as a whole. A Parquet
    file without image bytes is a table of image locations unless the format says otherwise. ``check``:
    open only to check the columns (the driver, before any work: a table is not copied)."""
    from perceptclip.tables import TableReader

    kind, options = input_kind(url, spec), options or {}
    if kind == "files":
        from perceptclip.files import FilesReader

        return FilesReader(url, spec, options)
    if kind == "table":
        return TableReader(url, spec, options, copy=not check)
    if kind == "webdataset":
        return TarReader(url, spec, options)
    try:
        return ParquetReader(url, spec, options)
    except NoImageColumn as e:
        if spec.format != "auto":
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


class NoImageColumn(ShardError):
    """A Parquet file none of whose columns (or not the one named) holds image bytes."""


class ShardReader(ABC):
    """One opened shard. ``blocks(n)`` yields lists of at most ``n`` samples and never raises."""

    @abstractmethod
    def blocks(self, block_rows: int) -> Iterator[list[dict]]:
        """The shard's samples, in order, in lists of at most ``block_rows``."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TarReader(ShardReader):
    """A WebDataset tar, read whole: a sample's files may sit anywhere in it. Carried columns are fields
    of each sample's ``.json`` (null where it has none)."""

    def __init__(self, url: str, spec: InputSpec, options: dict):
        self.samples = read_shard(url, options)      # a tar is read whole: its unit is the shard
        self.carry = spec.carry_columns

    def blocks(self, block_rows: int) -> Iterator[list[dict]]:
        for start in range(0, len(self.samples), block_rows):
            part = self.samples[start:start + block_rows]
            yield [dict(s, __carry__=json_fields(s, self.carry)) for s in part] if self.carry else part


def json_fields(sample: dict, names: tuple[str, ...]) -> dict:
    """Fields ``names`` of a tar sample's ``.json`` (null when absent, unreadable or over the size limit)."""
    data = sample.get("json")
    meta = {}
    if isinstance(data, bytes) and len(data) <= MAX_META_BYTES:
        try:
            loaded = parse_json(data)
            meta = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            pass
    return {name: meta.get(name) for name in names}


# --- parquet with the images inside ----------------------------------------------------------------

class ParquetReader(ShardReader):
    """A Parquet file whose rows hold the images, one row group at a time."""

    def __init__(self, url: str, spec: InputSpec, options: dict):
        import pyarrow.parquet as pq

        self.url, self.spec = url, spec
        self.file = open_binary(url, options)
        try:
            self.parquet = pq.ParquetFile(self.file, pre_buffer=True)
            self.image, self.key = image_columns(self.parquet.schema_arrow, spec, url)
        except ShardError:
            self.close()
            raise
        except Exception as e:                      # not Parquet, or cut short: the footer is at the end
            self.close()
            raise parquet_error(url, e, options) from None

    def close(self) -> None:
        self.file.close()

    def blocks(self, block_rows: int) -> Iterator[list[dict]]:
        repeated = self.repeated_keys()
        first = 0
        for group in range(self.parquet.num_row_groups):
            rows = self.parquet.metadata.row_group(group).num_rows
            samples = self.row_group(group, first, repeated)
            for start in range(0, rows, block_rows):
                yield samples[start:start + block_rows]
            first += rows

    def row_group(self, group: int, first: int, repeated: set) -> list[dict]:
        """The samples of one row group; one that cannot be read is an error row per row (``unreadable``)."""
        columns = list(dict.fromkeys([self.image] + ([self.key] if self.key else []) + list(self.spec.carry_columns)))
        try:
            table = self.parquet.read_row_group(group, columns=columns)
        except Exception as e:
            rows = self.parquet.metadata.row_group(group).num_rows
            why = f"unreadable: row group {group} of {self.url}: {type(e).__name__}: {e}"
            return [{"__key__": str(first + i), "__error__": why} for i in range(rows)]
        images = table[self.image].to_pylist()
        keys = table[self.key].to_pylist() if self.key else [None] * len(images)
        carried = {c: table[c].to_pylist() for c in self.spec.carry_columns}
        return [self.sample(first + i, image, key, {c: v[i] for c, v in carried.items()}, repeated)
                for i, (image, key) in enumerate(zip(images, keys))]

    def sample(self, row: int, image, key, carry: dict, repeated: set) -> dict:
        path = None
        if isinstance(image, dict):             # datasets' Image feature: {"bytes": ..., "path": ...}
            image, path = image.get("bytes"), image.get("path")
        sample = {"__key__": str(row) if key is None else str(key), "__image__": image,
                  "__url__": path if isinstance(path, str) else None, "__carry__": carry}
        if key is None and self.key:
            sample["__error__"] = f"no_key: row {row}: the key column {self.key!r} is null"
        elif self.key and hash(sample["__key__"]) in repeated:
            sample["__error__"] = f"duplicate_key: key {sample['__key__']!r} is on more than one row of {self.url}"
        elif image is None:
            sample["__error__"] = f"no_image: row {row}: no image bytes in column {self.image!r}" + (
                f" (only a path, {path!r})" if path else "")
        return sample

    def repeated_keys(self) -> set[int]:
        """Hashes of the keys on more than one row: every such row is an error row (``duplicate_key``), as
        in tars. One pass over the key column; 8 bytes a row, whatever the keys' length."""
        if not self.key:
            return set()
        hashes = array("q")
        for group in range(self.parquet.num_row_groups):
            try:
                keys = self.parquet.read_row_group(group, columns=[self.key])[self.key].to_pylist()
            except Exception:
                continue            # that row group's rows become error rows of their own
            hashes.extend(hash(str(k)) for k in keys if k is not None)
        return repeated_hashes(hashes)


def repeated_hashes(hashes: array) -> set[int]:
    """The values that occur more than once in ``hashes``, an ``array("q")`` of the keys' hashes (8 bytes a
    key, where a list of Python ints takes 40), sorted in place: the peak is the array and a byte a key."""
    import numpy as np

    values = np.frombuffer(hashes, dtype=np.int64)
    values.sort()
    return set(values[1:][values[1:] == values[:-1]].tolist())


def image_columns(schema, spec: InputSpec, url: str) -> tuple[str, str | None]:
    """The image column and the key column (None: the row number) of a Parquet file with the images
    inside; ``ShardError("bad_columns")`` naming the columns there are when they cannot be told."""
    import pyarrow as pa

    names = schema.names
    have = f"its columns: {describe_columns(schema)}"
    if spec.image_column is not None:
        if spec.image_column not in names:
            raise ShardError("bad_columns", f"{url}: no image_column {spec.image_column!r}; {have}")
        kind = schema.field(spec.image_column).type
        if not holds_images(kind):
            # a column of text may be the locations of a table; one of numbers is nothing an image is in
            raise (NoImageColumn if pa.types.is_string(kind) or pa.types.is_large_string(kind) else ShardError)(
                "bad_columns", f"{url}: image_column {spec.image_column!r} holds no image bytes "
                                            f"(binary, or a struct with bytes); {have}")
        image = spec.image_column
    else:
        found = [f.name for f in schema if holds_images(f.type)]
        if len(found) != 1:
            which = f"{len(found)} columns hold bytes ({', '.join(found)})" if found else "no column holds image bytes"
            raise (NoImageColumn if not found else ShardError)(
                "bad_columns", f"{url}: {which}; name one as image_column; {have}")
        image = found[0]
    if spec.key_column is not None and spec.key_column not in names:
        raise ShardError("bad_columns", f"{url}: no key_column {spec.key_column!r}; {have}")
    missing = [c for c in spec.carry_columns if c not in names]
    if missing:
        raise ShardError("bad_columns", f"{url}: no carry_columns {', '.join(map(repr, missing))}; {have}")
    key = spec.key_column or next((k for k in KEY_COLUMNS if k in names and k != image), None)
    return image, key


def holds_images(kind) -> bool:
    """A binary column, or a struct with a binary ``bytes`` field (``datasets``' Image feature)."""
    import pyarrow as pa

    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    if pa.types.is_struct(kind):
        index = kind.get_field_index("bytes")
        return index >= 0 and holds_images(kind.field(index).type) and not pa.types.is_struct(kind.field(index).type)
    return False


def describe_columns(schema) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema)


# --- files on any store ----------------------------------------------------------------------------

def open_binary(url: str, options: dict):
    """``url`` opened for reading, or ``ShardError`` (missing, unreadable)."""
    try:
        fs, path = filesystem(url, options)
        if fs.isdir(path):
            raise IsADirectoryError(path)
        return fs.open(path, "rb")
    except FileNotFoundError:
        raise ShardError("missing", f"{url}: no such shard") from None
    except IsADirectoryError:
        raise ShardError("missing", f"{url}: a directory, not a shard") from None
    except Exception as e:  # permissions, network, throttling after the client's own retries
        raise ShardError("unreadable", redact_text(f"{url}: {type(e).__name__}: {e}", options)) from None


def parquet_error(url: str, error: Exception, options: dict) -> ShardError:
    """Why a Parquet file could not be opened: a file that begins as Parquet but lacks its footer was
    cut short (``truncated``); another that Arrow refuses is ``not_parquet``; the rest is the store's
    failure (``unreadable``)."""
    import pyarrow as pa

    text = redact_text(f"{url}: {type(error).__name__}: {error}", options)
    if not isinstance(error, pa.ArrowInvalid):
        return ShardError("unreadable", text)
    try:
        fs, path = filesystem(url, options)
        with fs.open(path, "rb") as f:
            head = f.read(4)
    except Exception:
        head = b""
    return ShardError("truncated" if head == b"PAR1" else "not_parquet", text)


# --- carried columns -------------------------------------------------------------------------------

def carried_text(values: dict | None) -> str | None:
    """A sample's ``carry_columns`` values as one JSON object (its row's ``carried``), in the order asked
    for; None when nothing is carried. The driver makes them columns again (``carried_columns``)."""
    if not values:
        return None
    return json.dumps(values, ensure_ascii=False, default=_json_value)


def _json_value(value):
    """What JSON has no type for, as text: times in ISO 8601, decimals as written, bytes in base64."""
    import base64

    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def carried_columns(table, taken: list[str]) -> dict:
    """The carried columns of a shard's score rows (``table``: its ``carried`` JSON column), typed, in the
    order asked for. Types are inferred over the whole shard; a column whose values mix types is
    written as JSON text. A name among ``taken`` (the table's own columns) is refused."""
    import pyarrow as pa

    if "carried" not in table.column_names:
        return {}
    rows = [json.loads(t) if t else {} for t in table["carried"].to_pylist()]
    names = list(dict.fromkeys(name for row in rows for name in row))
    clash = sorted(set(names) & set(taken))
    if clash:
        raise ValueError(f"carry_columns: {', '.join(clash)} would also be a column of the score table")
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowException, OverflowError):
            columns[name] = pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
    return columns
