"""Memory of a read task streaming a table of image locations, against the table's length: the same read on
a table of ``--rows`` locations and on one of a tenth as many, each in a fresh process.

    python benchmarks/table_memory.py                      # 1,000,000 rows against 100,000, CSV
    python benchmarks/table_memory.py --rows 1000000 --format jsonl

The table (a key column, a location column and a caption to carry) points at 16 small JPEGs on local
disk, each row at one of them, so every row is fetched and read for real while the disk holds little.
The read is the job's read task without the decoding: ``TableReader.blocks`` (one pass for keys seen twice,
then the rows streamed, 32 fetches in flight) in blocks of 64 rows, each block dropped when read, as the
task hands it on. Printed per size: rows read, seconds, and the process's peak resident memory above what
it held once the table was written and the modules loaded. Last line: the peak growth of the large table
over the small one's. Streaming keeps it near flat; what grows with the table is 8 bytes a row (the hash
of each key, to find keys seen twice: 8 MB for a million rows).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
IMAGES = 16


def write_table(root: Path, rows: int, fmt: str) -> str:
    """A table of ``rows`` locations (relative paths) of ``IMAGES`` JPEGs written beside it."""
    from support.images import image_bytes, make_image

    (root / "images").mkdir()
    for i in range(IMAGES):
        (root / "images" / f"{i}.jpg").write_bytes(image_bytes(make_image(i, (32, 32))))
    path = root / f"table.{fmt}"
    with open(path, "w") as f:
        if fmt == "csv":
            f.write("key,path,caption\n")
            f.writelines(f"{r:08d},images/{r % IMAGES}.jpg,caption of image {r}\n" for r in range(rows))
        else:
            f.writelines(json.dumps({"key": f"{r:08d}", "path": f"images/{r % IMAGES}.jpg",
                                     "caption": f"caption of image {r}"}) + "\n" for r in range(rows))
    return str(path)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # kilobytes on Linux


def read_once(rows: int, fmt: str) -> None:
    """In this process: write the table, read it as a read task does, print one JSON line."""
    from perceptclip.inputs.base import InputSpec
    from perceptclip.inputs.tables import TableReader

    with tempfile.TemporaryDirectory() as tmp:
        url = write_table(Path(tmp), rows, fmt)
        spec = InputSpec(carry_columns=("caption",))
        before = peak_mb()
        start, read, errors = time.perf_counter(), 0, 0
        with TableReader(url, spec, {}) as reader:
            for block in reader.blocks(64):
                read += len(block)
                errors += sum("__error__" in s for s in block)
        seconds = time.perf_counter() - start
    print(json.dumps({"rows": read, "errors": errors, "seconds": seconds, "growth_mb": peak_mb() - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the large table")
    parser.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    parser.add_argument("--once", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.once is not None:
        return read_once(args.once, args.format)
    growth = {}
    for rows in (args.rows // 10, args.rows):
        out = subprocess.run([sys.executable, __file__, "--once", str(rows), "--format", args.format],
                             check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        assert result["rows"] == rows and result["errors"] == 0, result
        growth[rows] = result["growth_mb"]
        print(f"{args.format}, {rows:,} rows: read in {result['seconds']:.1f} s "
              f"({rows / result['seconds']:,.0f} rows/s); peak memory {result['growth_mb']:.1f} MB above the start",
              flush=True)
    small, large = args.rows // 10, args.rows
    print(f"peak memory growth, {large:,} rows against {small:,}: {growth[large]:.1f} MB against "
          f"{growth[small]:.1f} MB")


if __name__ == "__main__":
    main()
