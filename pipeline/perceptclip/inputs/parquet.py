"""Parquet files with the images inside: a binary column, or a struct with ``bytes`` (and ``path``) as
Hugging Face ``datasets`` writes its ``Image`` feature; read one row group at a time, so a reader's
memory does not grow with the file."""

from __future__ import annotations

from array import array
from collections.abc import Iterator

from perceptclip.core.storage import filesystem, redact_text
from perceptclip.inputs.base import KEY_COLUMNS, InputSpec, ShardReader, open_binary, repeated_hashes
from perceptclip.inputs.shards import ShardError


class NoImageColumn(ShardError):
    """A Parquet file none of whose columns (or not the one named) holds image bytes."""



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
        if self.key and hash(sample["__key__"]) in repeated:
            # a row without a key stands in by its number: a real key equal to it is shared, both rows say so
            sample["__error__"] = f"duplicate_key: key {sample['__key__']!r} is on more than one row of {self.url}"
        elif key is None and self.key:
            sample["__error__"] = f"no_key: row {row}: the key column {self.key!r} is null"
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
        first = 0
        for group in range(self.parquet.num_row_groups):
            rows = self.parquet.metadata.row_group(group).num_rows
            try:
                keys = self.parquet.read_row_group(group, columns=[self.key])[self.key].to_pylist()
            except Exception:
                keys = [None] * rows    # that row group's rows become error rows, keyed by their numbers
            # a null key's row is keyed by its number (``sample``): counted, so it can never pass for a real key
            hashes.extend(hash(str(first + i if k is None else k)) for i, k in enumerate(keys))
            first += rows
        return repeated_hashes(hashes)



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
                "bad_columns", f"{url}: {which}; name it with --image-column (image_column: in a score config); {have}")
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


