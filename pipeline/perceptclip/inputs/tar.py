"""The WebDataset tar reader: a tar is read whole (``shards.read_shard``), since a sample's files may
sit anywhere in it."""

from __future__ import annotations

from collections.abc import Iterator

from perceptclip.inputs.base import InputSpec, ShardReader
from perceptclip.inputs.shards import MAX_META_BYTES, parse_json, read_shard


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


