"""Labelled shards, the layout ``perceptclip evaluate`` and ``perceptclip train`` read: key.<image>
beside key.json holding the label."""

from __future__ import annotations

import json
from pathlib import Path

from perceptclip.inputs.shards import write_shard


def write_labelled_shard(path: str | Path, samples: list[tuple], ext: str = "jpg") -> str:
    """Write ``(key, image bytes or None, meta)`` samples as one shard at local ``path``; ``meta`` is a
    dict (written as JSON) or the raw bytes of key.json. Returns the path."""
    rows = []
    for key, image, meta in samples:
        sample = {"__key__": key, "json": meta if isinstance(meta, bytes) else json.dumps(meta).encode()}
        if image is not None:
            sample[ext] = image
        rows.append(sample)
    write_shard(str(path), rows)
    return str(path)
