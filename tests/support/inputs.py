"""Inputs other than tars, written by the tests: Parquet files with the images inside (as Hugging Face
``datasets`` writes its ``Image`` feature, or a plain binary column)."""

from __future__ import annotations

import json
import os


def hf_image_type():
    """``datasets``' Image feature in Arrow: a struct of the encoded bytes and the file's path."""
    import pyarrow as pa

    return pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])


def write_image_parquet(path, images: list, columns: dict | None = None, layout: str = "hf",
                        row_group_size: int = 4, image_column: str = "image") -> str:
    """Write ``images`` (bytes or None, one per row) with ``columns`` (name -> values) beside them as a
    Parquet file at local ``path``. ``layout``: ``hf`` (a struct of bytes and path, with the metadata
    ``datasets`` writes) or ``binary`` (a plain binary column). Returns the path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if layout == "hf":
        values = [None if b is None else {"bytes": b, "path": f"img-{i}.jpg"} for i, b in enumerate(images)]
        array = pa.array(values, hf_image_type())
        features = {image_column: {"_type": "Image"}}
    else:
        array, features = pa.array(images, pa.binary()), None
    table = pa.table({image_column: array, **{k: v for k, v in (columns or {}).items()}})
    if features is not None:
        table = table.replace_schema_metadata(
            {"huggingface": json.dumps({"info": {"features": features}})})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return str(path)


def write_image_files(root, names: list[str], fs=None) -> list[str]:
    """An image file (a small JPEG or PNG, told by the name; the same name gives the same image) at each of
    ``names`` under ``root``: a local folder, or a bucket path on ``fs`` (an fsspec filesystem)."""
    import zlib

    from support.images import image_bytes, make_image

    for name in names:
        data = image_bytes(make_image(zlib.crc32(name.encode()) % 1000, (36, 28)),
                           "PNG" if name.lower().endswith(".png") else "JPEG")
        if fs is not None:
            fs.pipe_file(f"{root}/{name}", data)
        else:
            os.makedirs(os.path.dirname(os.path.join(str(root), name)), exist_ok=True)
            with open(os.path.join(str(root), name), "wb") as f:
                f.write(data)
    return names
