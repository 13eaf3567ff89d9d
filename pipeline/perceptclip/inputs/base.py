"""What every reader of an input kind shares: the input's settings (``InputSpec``), the reader's
contract (``ShardReader``), opening a file of any store, the keys, and the carried columns.

A shard is opened first: whatever makes the whole shard unreadable raises ``ShardError`` there, before a
single row is sent. Its ``blocks`` then never raise: what is wrong with one row becomes an error row, so
every row of the input ends as exactly one row of scores. Samples are dicts as ``shards.read_shard``
gives them, plus reserved names: ``__image__`` (the image's bytes, or None), ``__url__`` (where it came
from) and ``__carry__`` (the ``carry_columns`` values).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

from perceptclip.core.storage import filesystem, redact_text
from perceptclip.inputs.shards import ShardError

KEY_COLUMNS = ("__key__", "key", "id")          # the key column when none is named, first found


@dataclass(frozen=True)
class InputSpec:
    """What the read tasks need to know about the input (``ScoreConfig`` documents each field)."""

    kind: str = "auto"                  # the input kind (``kinds.INPUT_KINDS``); auto: told per shard
    image_column: str | None = None
    key_column: str | None = None
    carry_columns: tuple[str, ...] = ()
    fetch_workers: int = 32              # tables, files: image requests in flight per read task
    fetch_timeout_s: float = 30.0        # tables, files: a request without an answer by then is an error row


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


def repeated_hashes(hashes: array) -> set[int]:
    """The values that occur more than once in ``hashes``, an ``array("q")`` of the keys' hashes (8 bytes a
    key, where a list of Python ints takes 40), sorted in place: the peak is the array and a byte a key."""
    import numpy as np

    values = np.frombuffer(hashes, dtype=np.int64)
    values.sort()
    return set(values[1:][values[1:] == values[:-1]].tolist())



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
