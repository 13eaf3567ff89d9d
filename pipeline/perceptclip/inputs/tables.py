"""Tables of image locations (Parquet, CSV or JSONL with a column of paths or URIs), read as shards: the
read task streams the table and fetches the images itself, many requests in flight.

    table     copied to the task's local disk when it is not local already (a read that fails there
              fails the shard, before any row is sent), then streamed: memory does not grow with it
    rows      one per record; a malformed CSV or JSONL line is an error row naming its line
    fetch     ``FETCH_WORKERS`` requests at a time through fsspec (local files, ``s3://``, ``http(s)://``,
              any fsspec URL); each one that does not answer within the timeout is an error row

What goes wrong with one image is its row's error, never the shard's: ``not_found``, ``not_a_file`` (a
folder), ``fetch_timeout``, ``fetch_failed``; what the bytes are is the decoder's business. Relative
paths resolve against the table's folder.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from perceptclip.core.storage import filesystem, protocol, redact_text
from perceptclip.inputs.shards import PARQUET_SUFFIXES, ShardError

LOCATION_COLUMNS = ("path", "image_path", "file_name", "url", "image")   # the first found, when none is named


def table_columns(columns: list[str], spec, url: str) -> tuple[str, str | None]:
    """The location column and the key column (None: the row number) of a table; ``ShardError`` naming
    the columns there are when one cannot be found."""
    from perceptclip.inputs.base import KEY_COLUMNS

    have = f"its columns: {', '.join(columns) or 'none'}"
    location = spec.image_column or next((c for c in LOCATION_COLUMNS if c in columns), None)
    if location not in columns:
        which = f"no image_column {spec.image_column!r}" if spec.image_column else \
            f"no column of image locations ({', '.join(LOCATION_COLUMNS)})"
        raise ShardError("bad_columns", f"{url}: {which}; name it with --image-column (image_column: in a score config); {have}")
    if spec.key_column is not None and spec.key_column not in columns:
        raise ShardError("bad_columns", f"{url}: no key_column {spec.key_column!r}; {have}")
    missing = [c for c in spec.carry_columns if c not in columns]
    if missing:
        raise ShardError("bad_columns", f"{url}: no carry_columns {', '.join(map(repr, missing))}; {have}")
    return location, spec.key_column or next((k for k in KEY_COLUMNS if k in columns), None)


def check_locations_are_text(schema, spec, url: str) -> None:
    """A Parquet table's location column must hold text: one of image bytes or ``datasets`` image structs
    is a Parquet file with the images inside, another input kind."""
    import pyarrow as pa

    name = spec.image_column or next((c for c in LOCATION_COLUMNS if c in schema.names), None)
    if name is None or name not in schema.names:
        return                          # table_columns names what is missing
    kind = schema.field(name).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ShardError("bad_columns", f"{url}: column {name!r} holds {kind}, not image locations (paths or URLs "
                                        f"as text); a Parquet file with the images inside is --input-kind parquet")


def table_format(url: str) -> str:
    name = url.rstrip("/").lower()
    return "parquet" if name.endswith(PARQUET_SUFFIXES) else "csv" if name.endswith(".csv") else "jsonl"


class TableReader:
    """One table of image locations. ``ShardError`` at open; ``blocks`` never raise."""

    def __init__(self, url: str, spec, options: dict, copy: bool = True):
        """``copy``: read the whole table to local disk now (a read task); without, only its header is
        read, where it is (the driver's check before any work)."""
        self.url, self.spec, self.options = url, spec, options
        self.fetch_options = fetch_options(options, spec.fetch_timeout_s)
        self.format = table_format(url)
        self.base = url.rstrip("/").rsplit("/", 1)[0]
        self.path, self.temporary = local_copy(url, options) if copy else (None, False)
        try:
            self.location, self.key = table_columns(self.header(), spec, url)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.temporary:
            os.unlink(self.path)
            self.temporary = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def header(self) -> list[str]:
        """The table's column names: a CSV's header, a Parquet file's schema (whose location column must
        hold text), every name of a JSONL table's records (one record may lack a field others have)."""
        import io

        try:
            fs, path = filesystem(self.url, self.options) if self.path is None else (None, self.path)
            with (fs.open(path, "rb") if fs is not None else open(path, "rb")) as raw:
                if self.format == "parquet":
                    import pyarrow.parquet as pq

                    schema = pq.ParquetFile(raw).schema_arrow
                    check_locations_are_text(schema, self.spec, self.url)
                    return schema.names
                text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")
                if self.format == "csv":
                    return next(csv.reader(text), [])
                names: dict[str, None] = {}
                for line in text:
                    try:
                        record = json.loads(line) if line.strip() else None
                    except ValueError:
                        continue                # a malformed line is that row's error, not the table's
                    if isinstance(record, dict):
                        names.update(dict.fromkeys(record))
            return list(names)
        except FileNotFoundError:
            raise ShardError("missing", f"{self.url}: no such table") from None
        except (ValueError, csv.Error, OSError) as e:
            raise ShardError("not_a_table", redact_text(f"{self.url}: {type(e).__name__}: {e}", self.options)) from None

    def records(self) -> Iterator[tuple[str, dict | None, str | None]]:
        """``(where, record, problem)`` per row, in order: where is ``line N`` (``row N`` for Parquet)."""
        if self.format == "parquet":
            import pyarrow.parquet as pq

            row = 0
            for batch in pq.ParquetFile(self.path).iter_batches(batch_size=1024):
                for record in batch.to_pylist():
                    yield f"row {row}", record, None
                    row += 1
        elif self.format == "csv":
            yield from csv_records(self.path)
        else:
            yield from jsonl_records(self.path)

    def locations(self) -> Iterator[str]:
        """Every image location the table names, as a URL (relative paths resolved), streamed."""
        for _, record, _ in self.records():
            location = (record or {}).get(self.location)
            if isinstance(location, str) and location.strip():
                yield resolve(location.strip(), self.base)

    def blocks(self, block_rows: int) -> Iterator[list[dict]]:
        from array import array

        from perceptclip.inputs.base import repeated_hashes

        # one pass for the keys seen twice: 8 bytes a row (a million-row table: 8 MB), then the rows stream. A
        # row without a key (malformed, or the key empty) stands in by its number: counted too, so that a
        # real key equal to it is seen as shared
        keys = (hash(str(self.key_of(row, r))) for row, (_, r, _) in enumerate(self.records()))
        repeated = repeated_hashes(array("q", keys if self.key else ()))
        samples = (self.sample(row, where, record, problem, repeated)
                   for row, (where, record, problem) in enumerate(self.records()))
        yield from in_blocks(fetch_images(samples, self.fetch_options, self.spec.fetch_workers,
                                          self.spec.fetch_timeout_s), block_rows)

    def key_of(self, row: int, record: dict | None):
        """A row's key: its key column's value, else (none named, the line malformed, the key empty) its number."""
        key = (record or {}).get(self.key) if self.key else None
        return row if key is None or key == "" else key

    def sample(self, row: int, where: str, record: dict | None, problem: str | None, repeated: set) -> dict:
        key = self.key_of(row, record)
        record = record or {}
        location = record.get(self.location)
        sample = {"__key__": str(key), "__image__": None, "__url__": None,
                  "__carry__": {c: record.get(c) for c in self.spec.carry_columns}}
        if self.key and hash(str(key)) in repeated:
            sample["__error__"] = f"duplicate_key: key {str(key)!r} is on more than one row of {self.url}"
        elif problem is not None:
            sample["__error__"] = f"malformed_line: {self.url} {where}: {problem}"
        elif self.key and record.get(self.key) in (None, ""):
            sample["__error__"] = f"no_key: {where}: the key column {self.key!r} is empty"
        elif not isinstance(location, str) or not location.strip():
            sample["__error__"] = f"no_image: {where}: no location in column {self.location!r}"
        else:
            sample["__url__"] = resolve(location.strip(), self.base)
        return sample


def resolve(location: str, base: str) -> str:
    """A location as written in a table, as a URL: relative paths against the table's folder."""
    if "://" in location or location.startswith("/"):
        return location
    return posixpath.join(base, location)


def csv_records(path: str) -> Iterator[tuple[str, dict | None, str | None]]:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield f"line {reader.line_num}", None, str(e)
                continue
            if not fields:
                continue                     # a blank line holds no record
            if len(fields) != len(header):
                yield f"line {reader.line_num}", None, f"{len(fields)} fields, the header has {len(header)}"
                continue
            yield f"line {reader.line_num}", dict(zip(header, fields)), None


def jsonl_records(path: str) -> Iterator[tuple[str, dict | None, str | None]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as e:
                yield f"line {number}", None, f"not JSON ({e})"
                continue
            if not isinstance(record, dict):
                yield f"line {number}", None, "not a JSON object"
                continue
            yield f"line {number}", record, None


def local_copy(url: str, options: dict) -> tuple[str, bool]:
    """A local path holding the table at ``url`` and whether it is a temporary copy (to remove)."""
    try:
        fs, path = filesystem(url, options)
        if fs.isdir(path):
            raise IsADirectoryError(path)
        if protocol(url) == "file":
            if not os.path.exists(path):
                raise FileNotFoundError(path)
            return path, False
        handle, local = tempfile.mkstemp(suffix=posixpath.basename(path))
        os.close(handle)
        try:
            fs.get_file(path, local)
        except BaseException:
            os.unlink(local)
            raise
        return local, True
    except FileNotFoundError:
        raise ShardError("missing", f"{url}: no such table") from None
    except IsADirectoryError:
        raise ShardError("missing", f"{url}: a directory, not a table") from None
    except Exception as e:
        raise ShardError("unreadable", redact_text(f"{url}: {type(e).__name__}: {e}", options)) from None


# --- fetch -----------------------------------------------------------------------------------------

def fetch_images(samples: Iterator[dict], options: dict, workers: int, timeout: float) -> Iterator[dict]:
    """``samples`` in order, each with a location (``__url__``) and no error given its ``__image__``
    bytes, or its error: at most ``workers`` requests in flight, each waited for ``timeout`` seconds."""
    from collections import deque

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch")
    window: deque = deque()
    try:
        for sample in samples:
            while len(window) >= workers:          # every request submitted starts at once: its clock is fair
                yield settle(*window.popleft(), timeout, options)
            if "__error__" not in sample:
                window.append((sample, pool.submit(fetch_one, sample["__url__"], options), time.monotonic()))
            else:
                window.append((sample, None, 0.0))
        while window:
            yield settle(*window.popleft(), timeout, options)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)     # a request that hangs holds no one up


def in_blocks(samples: Iterator[dict], block_rows: int) -> Iterator[list[dict]]:
    """``samples`` in lists of at most ``block_rows``, in order."""
    block: list[dict] = []
    for sample in samples:
        block.append(sample)
        if len(block) == block_rows:
            yield block
            block = []
    if block:
        yield block


def settle(sample: dict, future, started: float, timeout: float, options: dict) -> dict:
    from concurrent.futures import TimeoutError as FutureTimeout

    if future is None:
        return sample
    try:
        sample["__image__"] = future.result(timeout=max(0.0, started + timeout - time.monotonic()))
    except FutureTimeout:
        sample["__error__"] = f"fetch_timeout: {sample['__url__']}: no answer in {timeout:g} s"
    except FileNotFoundError:
        sample["__error__"] = f"not_found: {sample['__url__']}: no such file"
    except IsADirectoryError:
        sample["__error__"] = f"not_a_file: {sample['__url__']}: a folder, not an image"
    except Exception as e:
        sample["__error__"] = redact_text(f"fetch_failed: {sample['__url__']}: {type(e).__name__}: {e}", options)
    return sample


def fetch_one(url: str, options: dict) -> bytes:
    fs, path = filesystem(url, options)
    return fs.cat_file(path)


def fetch_options(options: dict, timeout: float) -> dict:
    """``options`` for fetching single images: the clients' own timeouts set to ``timeout``, so that a
    request that never answers also ends in its thread, not only in the row's error; and one GET an image
    from S3 (s3fs otherwise first asks for the object's size, a HEAD, to split large objects into parallel
    ranges: a second round trip for every image)."""
    s3 = dict(options.get("s3", {}))
    s3["config_kwargs"] = {**s3.get("config_kwargs", {}), "connect_timeout": timeout, "read_timeout": timeout}
    s3["max_concurrency"] = 1
    out = {**options, "s3": s3}
    try:
        import aiohttp

        http = {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=timeout)}}
        out.update(http=options.get("http", http), https=options.get("https", http))
    except ImportError:
        pass
    return out
