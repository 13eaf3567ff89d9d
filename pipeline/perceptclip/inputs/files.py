"""Folders, object-store prefixes and globs of image files, scored as virtual shards.

    list      the source's image files (``IMAGE_EXTENSIONS``), at any depth, sorted; keys: their paths
              relative to the source's root
    group     the files no shard holds yet, cut into virtual shards of ``files_per_shard``, named
              ``<root's name>-000000``, ``-000001``, ... after those recorded before
    record    the new shards as one listing, ``DEST/_inputs/<name>/listing-<generation>.parquet``, created
              only if absent (one put), before any shard is scored
    read      one task per virtual shard reads its files from the listing and fetches them with many
              requests in flight (``tables.fetch_images``); a file gone since is an error row (``not_found``)

A listing is never rewritten: a rerun reads the grouping recorded and scores each virtual shard once; files
added since form new shards in a new listing, which the next run scores and nothing else. Two runs that
race to record the same generation cannot both win: the store creates the listing only if it is absent
(local files: a hard link; S3: a conditional put), and the loser reads the winner's and groups what is
left. A run that dies before its listing is stored recorded nothing; one that dies after leaves a grouping
the rerun keeps. A listing is Parquet (``shard``, ``key``; one row group per shard; the root in its
metadata), readable by anyone. A virtual shard's URL is ``<listing>#<name>``.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from perceptclip.core.storage import filesystem, join, location, protocol, read_parquet, redact_text
from perceptclip.inputs.base import ShardReader
from perceptclip.inputs.shards import GLOB_CHARS, IMAGE_EXTENSIONS, VIRTUAL_SHARD, ShardError, _absolute, folder_files

LISTING_FORMAT = "perceptclip-files"
_LISTING = re.compile(r"listing-(\d{6,})\.parquet$")
RECORD_ATTEMPTS = 8          # runs racing over one DEST: each lost race re-reads the winner's listing


@dataclass
class FileSource:
    """One input that names image files: ``keys`` relative to ``root``, sorted."""

    source: str
    root: str
    keys: list[str]

    @property
    def name(self) -> str:
        return posixpath.basename(self.root.split("://", 1)[-1].rstrip("/")) or "files"


def is_image_name(url: str) -> bool:
    return "." in url.rsplit("/", 1)[-1] and url.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def list_images(source: str, options: dict) -> FileSource:
    """The image files ``source`` names (a folder, a prefix or a glob), at any depth; ``ValueError`` if none."""
    source = source.strip()
    path = source.split("://", 1)[-1]
    if GLOB_CHARS.search(path):
        static = path[:GLOB_CHARS.search(path).start()].rsplit("/", 1)[0]
        root = source[:len(source) - len(path)] + static
        fs, pattern = filesystem(source, options)
        urls = []
        for match, info in sorted(fs.glob(pattern, detail=True).items()):
            url = _as_url(match, source)
            urls += folder_files(url, options) if info.get("type") == "directory" else [url]
    else:
        root = source.rstrip("/")
        urls = folder_files(root, options) if _exists_as_folder(root, options) else []
    root = root if protocol(root) != "file" else os.path.abspath(root.removeprefix("file://"))
    keys = sorted({u[len(root):].lstrip("/") for u in urls if is_image_name(u) and u.startswith(root + "/")})
    if not keys:
        raise ValueError(f"{source}: no image files ({', '.join(IMAGE_EXTENSIONS)}) there")
    return FileSource(source=source, root=root, keys=keys)


def _as_url(path: str, like: str) -> str:
    proto = protocol(like)
    return os.path.abspath(path) if proto == "file" else f"{proto}://{path}"


def _exists_as_folder(url: str, options: dict) -> bool:
    fs, path = filesystem(url, options)
    try:
        return bool(fs.isdir(path))
    except OSError:
        return False


# --- record the grouping under DEST ----------------------------------------------------------------

def listing_url(listings: str, name: str, generation: int) -> str:
    return join(listings, name, f"listing-{generation:06d}.parquet")


def virtual_shards(src: FileSource, listings: str, per_shard: int, options: dict) -> list[str]:
    """The URLs of every virtual shard of ``src`` recorded under ``listings`` (the output's folder of them,
    ``output.layout.listings_dir``), its new files recorded first."""
    root = _absolute(listings)      # read tasks run elsewhere: a relative path would name another folder there
    for _ in range(RECORD_ATTEMPTS):
        listings = read_listings(src, root, options)
        recorded = {key for _, table in listings for key in table["key"].to_pylist()}
        shards = [f"{url}#{name}" for url, table in listings for name in table["shard"].unique().to_pylist()]
        new = [key for key in src.keys if key not in recorded]
        if not new:
            return shards
        generation = max((int(_LISTING.search(u).group(1)) for u, _ in listings), default=-1) + 1
        url = listing_url(root, src.name, generation)
        table = group(new, src.name, len(shards), per_shard)
        try:
            create(url, listing_bytes(table, src, per_shard), options)
        except FileExistsError:
            continue                    # another run recorded this generation first: group what it left
        return shards + [f"{url}#{name}" for name in table["shard"].unique().to_pylist()]
    raise RuntimeError(f"{join(root, src.name)}: other runs kept recording listings; try again")


def group(keys: list[str], name: str, first: int, per_shard: int):
    import pyarrow as pa

    names = [f"{name}-{first + i // per_shard:06d}" for i in range(len(keys))]
    return pa.table({"shard": pa.array(names, pa.string()), "key": pa.array(keys, pa.string())})


def listing_bytes(table, src: FileSource, per_shard: int) -> bytes:
    """A listing: one row group per virtual shard, so a read task reads only its own."""
    import pyarrow.parquet as pq

    from perceptclip.core.clock import utc_now

    meta = {"format": LISTING_FORMAT, "format_version": 1, "source": src.source, "root": src.root,
            "files_per_shard": per_shard, "created_at": utc_now()}
    table = table.replace_schema_metadata({b"perceptclip": json.dumps(meta).encode()})
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, table.schema, compression="zstd") as writer:
        for start in range(0, table.num_rows, per_shard):
            writer.write_table(table.slice(start, per_shard), row_group_size=per_shard)
    return buf.getvalue()


def create(url: str, data: bytes, options: dict) -> None:
    """Store ``data`` at ``url`` only if nothing is there (``FileExistsError`` otherwise), whole or not at
    all. Local: written aside, then hard-linked (atomic, refuses an existing name). Object stores: a
    conditional put where the client offers one (S3: If-None-Match); elsewhere fsspec checks first, which
    two runs racing can both pass."""
    fs, path = filesystem(url, options)
    if protocol(url) != "file":
        fs.pipe_file(path, data, mode="create")
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    aside = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(aside, "wb") as f:
        f.write(data)
    try:
        os.link(aside, path)
    finally:
        os.unlink(aside)


def read_listings(src: FileSource, listings: str, options: dict) -> list[tuple[str, object]]:
    """``(url, table)`` of each listing recorded for ``src``'s name under ``listings``, in generation order;
    ``ValueError`` when they were recorded for another root."""
    fs, folder = filesystem(join(listings, src.name), options)
    try:
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False) if _LISTING.search(p))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        url = join(listings, src.name, name)
        with fs.open(join(folder, name), "rb") as f:
            table = read_parquet(f, columns=["shard", "key"])
        root = json.loads(table.schema.metadata[b"perceptclip"])["root"]
        if location(root) != location(src.root):
            raise ValueError(f"output: {listings} records the files of {root} as {src.name}, not those of {src.root}; "
                             f"score them into another output")
        out.append((url, table))
    return out


# --- read one virtual shard ------------------------------------------------------------------------

class FilesReader(ShardReader):
    """One virtual shard: its files, named in its listing, fetched many at a time."""

    def __init__(self, url: str, spec, options: dict):
        import pyarrow.parquet as pq

        match = VIRTUAL_SHARD.search(url)
        if match is None:
            raise ShardError("missing", f"{url}: not a virtual shard (<listing>#<name>)")
        listing, self.name = url[:match.start(1) - 1], match.group(1)
        self.spec, self.options = spec, options
        try:
            fs, path = filesystem(listing, options)
            with fs.open(path, "rb") as f:
                parquet = pq.ParquetFile(f)
                self.root = json.loads(parquet.schema_arrow.metadata[b"perceptclip"])["root"]
                self.keys = shard_keys(parquet, self.name)
        except FileNotFoundError:
            raise ShardError("missing", f"{listing}: no such listing") from None
        except Exception as e:
            raise ShardError("unreadable", redact_text(f"{listing}: {type(e).__name__}: {e}", options)) from None
        if not self.keys:
            raise ShardError("missing", f"{url}: the listing holds no shard {self.name}")

    def blocks(self, block_rows: int) -> Iterator[list[dict]]:
        from perceptclip.inputs.tables import fetch_images, fetch_options, in_blocks

        samples = ({"__key__": key, "__url__": f"{self.root}/{key}", "__image__": None} for key in self.keys)
        fetched = fetch_images(samples, fetch_options(self.options, self.spec.fetch_timeout_s),
                               self.spec.fetch_workers, self.spec.fetch_timeout_s)
        yield from in_blocks(fetched, block_rows)


def shard_keys(parquet, name: str) -> list[str]:
    """The keys of virtual shard ``name``: its row group, told by the ``shard`` column's statistics."""
    index = parquet.schema_arrow.get_field_index("shard")
    for group in range(parquet.num_row_groups):
        stats = parquet.metadata.row_group(group).column(index).statistics
        if stats is not None and stats.has_min_max and not stats.min <= name <= stats.max:
            continue
        table = parquet.read_row_group(group, columns=["shard", "key"])
        keys = [k for s, k in zip(table["shard"].to_pylist(), table["key"].to_pylist()) if s == name]
        if keys:
            return keys
    return []
