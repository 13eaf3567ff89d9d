"""The score table's schema, which every room reads: its base columns, the control row each shard
sends, the columns no task may take; a head's own columns are named by ``Task.columns``.

    key, shard, status, error, width, height, url, caption    every table (``BASE_COLUMNS``)
    <carried columns>                                        the input's own, as asked (``carry_columns``)
    <name> [, <name>_<class> ...]                            each head scored: ``Task.columns(name)``
"""

from __future__ import annotations

METADATA_KEY = b"perceptclip"     # the score table's Parquet metadata key: its run, shard and models
BASE_COLUMNS = ("key", "shard", "status", "error", "width", "height", "url", "caption")
SHARD_ROW = "shard"          # status of a shard's control row; never written to a table
# the job's own columns of a score row on its way to the driver (never in a table)
TRANSIT_COLUMNS = ("ordinal", "shard_rows", "carried")
RESERVED_COLUMNS = frozenset(BASE_COLUMNS) | frozenset(TRANSIT_COLUMNS)
# base columns that an input column of the same name, carried (``carry_columns``), fills: its value where
# it has one, else what the reader found (a tar's .txt caption, where an image was read from)
FILLED_BY_INPUT = ("url", "caption")
