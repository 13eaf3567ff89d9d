"""WebDataset shards: which shards a spec names, and what one shard holds.

A spec is a local path or any fsspec URL (``s3://``, ``gs://``, ...), with brace ranges
(``shard-{000000..000999}.tar``) and globs (``data/*.tar``), a list of such specs, or a ``.txt`` file
holding one spec per line (blank lines and ``#`` comments ignored). A folder or object-store prefix
means the shards inside it (``FOLDER_SHARD_SUFFIXES``, at any depth, sorted), for every command that
takes shards; one that holds none is an error, never zero shards.

A shard is read as a unit: ``read_shard`` returns all its samples or raises ``ShardError`` with a
reason code (missing, unreadable, not_a_tar, truncated); nothing else escapes, and a caller never
emits part of a shard that turns out to be broken. A sample is a dict ``{"__key__": key, ext: bytes,
...}``: every regular file named ``dir/key.ext`` (``ext`` everything after the first dot of the file
name), wherever it sits in the tar, in the order keys first appear. What the reader does with odd
members, as a stated policy:

- directories, files without an extension and webdataset's own ``__name__`` entries: not samples,
  ignored; so is a member whose extension starts with ``__`` (it would overwrite ``__key__``).
- a symlink or hardlink (``link_member``), a device or fifo (``special_member``), or a key with the
  same extension twice (``duplicate_key``): nothing is followed, extracted or guessed; the key becomes
  one sample ``{"__key__": key, "__error__": "reason: message"}`` holding no files, which the
  scoring job writes as an error row. A key counts as one sample however many files it has.
- a file name that is not UTF-8: its undecodable bytes are written ``\\xNN`` in the key.

What is wrong with one sample's image is the decoder's business, not the reader's.
"""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
from collections.abc import Iterator, Sequence

from perceptclip.core.storage import filesystem, protocol, redact_text

SHARD_SUFFIXES = (".tar.gz", ".tgz", ".tar")
PARQUET_SUFFIXES = (".parquet", ".pq")
TABLE_SUFFIXES = (".csv", ".jsonl", ".ndjson")
# What a folder's listing counts as its shards: tars and Parquet files (tables of paths are named one by
# one: a CSV beside the shards is more often someone's notes than an input)
FOLDER_SHARD_SUFFIXES = SHARD_SUFFIXES + PARQUET_SUFFIXES
URL_LIST_SUFFIXES = (".txt",)
# Lower-case extensions of the image formats PIL reads, in the order a sample's image is picked.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "gif", "ppm", "pgm", "pbm", "pnm",
                    "jp2", "j2k", "avif", "tga", "ico")
MAX_META_BYTES = 1 << 20    # a larger .json or .txt beside an image is not read: url and caption stay null
_META_MEMBER = re.compile(r"(^|/)__[^/]*__($|/)")    # webdataset's own metadata, such as __index__
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")
GLOB_CHARS = re.compile(r"[*?\[]")      # the one test of whether a spec is a pattern
# A folder of image files is scored as virtual shards, recorded under DEST (perceptclip.inputs.files): one such
# shard's URL is its listing's and its name, ``DEST/_inputs/<source>/listing-000000.parquet#<name>``
LISTINGS_DIR = "_inputs"
VIRTUAL_SHARD = re.compile(r"/_inputs/[^/]+/listing-\d+\.parquet#([^/#]+)$")


class ShardError(Exception):
    """A shard that cannot be read as a whole. ``reason``: missing, unreadable, not_a_tar or truncated."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


# --- listing -----------------------------------------------------------------------------------------

def expand_shards(spec: str | Sequence[str], storage_options: dict | None = None) -> list[str]:
    """Every shard URL ``spec`` names, in order, each once. Local paths come back absolute.

    A glob that matches nothing, a folder that holds no shards, or a URL list that cannot be read,
    raises ``ValueError``: a typo in a nightly job should fail loudly, not score zero shards."""
    from braceexpand import braceexpand

    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        item = item.strip()
        if item.endswith(URL_LIST_SUFFIXES):
            urls += expand_shards(_read_url_list(item, storage_options), storage_options)
            continue
        for one in braceexpand(item):
            if GLOB_CHARS.search(_path_part(one)):
                urls += _glob(one, storage_options)
            elif _may_be_folder(one) and is_folder(one, storage_options):
                urls += folder_shards(one, storage_options)
            else:
                urls.append(_absolute(one))
    return list(dict.fromkeys(urls))


class EmptyFolderError(ValueError):
    """A folder or prefix named as input that holds no shard; ``url``: the folder."""

    def __init__(self, url: str, message: str):
        super().__init__(message)
        self.url = url


def has_glob(spec: str) -> bool:
    """Whether ``spec`` is a glob pattern (``*``, ``?`` or ``[`` in its path; a protocol's ``://`` aside)."""
    return bool(GLOB_CHARS.search(_path_part(spec)))


def _path_part(url: str) -> str:
    return url.split("://", 1)[1] if "://" in url else url


def _absolute(url: str) -> str:
    if protocol(url) != "file":
        return url
    return posixpath.abspath(url.removeprefix("file://"))


def _with_protocol(path: str, like: str) -> str:
    """A path as a filesystem lists it, as a URL of the same kind as ``like``."""
    proto = protocol(like)
    return _absolute(path) if proto == "file" else f"{proto}://{path}"


def _may_be_folder(url: str) -> bool:
    """Whether ``url`` needs a look at the store: a name ending like a shard file is taken as one
    unseen (a brace range of 10,000 shards costs no request), anything else may be a folder."""
    name = _path_part(url).rstrip("/").rsplit("/", 1)[-1].lower()
    return url.endswith("/") or not name.endswith(FOLDER_SHARD_SUFFIXES + TABLE_SUFFIXES)


def is_folder(url: str, storage_options: dict | None = None) -> bool:
    """Whether ``url`` is a folder (an object-store prefix with objects under it)."""
    fs, path = filesystem(url, storage_options)
    try:
        return bool(fs.isdir(path))
    except OSError:             # unreachable or refused: the read reports it, with its reason
        return False


def folder_files(url: str, storage_options: dict | None = None) -> list[str]:
    """Every file under folder ``url``, at any depth, sorted, as URLs; names in ``_``- or ``.``-folders
    (``_markers/``, ``_conversions/``, ``.cache/``) and hidden or ``_`` files are left out: they hold
    bookkeeping, not data."""
    fs, root = filesystem(url, storage_options)
    root = root.rstrip("/")
    found = []
    for path in fs.find(root, withdirs=False, detail=False):
        relative = path[len(root):].lstrip("/") if path.startswith(root) else path
        if any(part.startswith(("_", ".")) for part in relative.split("/")):
            continue
        found.append(_with_protocol(path, url))
    return sorted(found)


def folder_shards(url: str, storage_options: dict | None = None) -> list[str]:
    """The shards inside folder ``url`` (``FOLDER_SHARD_SUFFIXES``), sorted; ``EmptyFolderError`` if none."""
    shards = [f for f in folder_files(url, storage_options) if f.lower().endswith(FOLDER_SHARD_SUFFIXES)]
    if not shards:
        raise EmptyFolderError(url, f"{url}: the folder holds no shards (no "
                                    f"{', '.join(FOLDER_SHARD_SUFFIXES)} file)")
    return shards


def _glob(pattern: str, storage_options: dict | None) -> list[str]:
    fs, path = filesystem(pattern, storage_options)
    matches = fs.glob(path, detail=True)
    if not matches:
        raise ValueError(f"{pattern}: the pattern matches no shards")
    urls = []
    for match, info in sorted(matches.items()):
        url = _with_protocol(match, pattern)
        urls += folder_shards(url, storage_options) if info.get("type") == "directory" else [url]
    return urls


def _read_url_list(path: str, storage_options: dict | None) -> list[str]:
    fs, p = filesystem(path, storage_options)
    try:
        with fs.open(p, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the list of shard URLs: {redact_text(str(e), storage_options or {})}") from None
    specs = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not specs:
        raise ValueError(f"{path}: the list of shard URLs is empty")
    return specs


def shard_name(url: str) -> str:
    """The shard's file name without its suffix: ``s3://b/x/shard-000012.tar`` -> ``shard-000012``,
    ``part-0003.parquet`` -> ``part-0003``; a virtual shard (``...listing-000000.parquet#photos-000003``)
    -> its name."""
    virtual = VIRTUAL_SHARD.search(url)
    if virtual:
        return virtual.group(1)
    name = posixpath.basename(_path_part(url).rstrip("/"))
    for suffix in SHARD_SUFFIXES + PARQUET_SUFFIXES + TABLE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


# --- reading -----------------------------------------------------------------------------------------

def read_shard(url: str, storage_options: dict | None = None) -> list[dict]:
    """All samples of one shard, in the order their keys first appear, or ``ShardError``."""
    options = storage_options or {}
    try:
        fs, path = filesystem(url, options)
        with fs.open(path, "rb") as raw:
            # "r|*": a forward-only stream (object stores need no seeks), plain or compressed
            return _samples(tarfile.open(fileobj=raw, mode="r|*", encoding="utf-8", errors="surrogateescape"), url)
    except ShardError:
        raise
    except FileNotFoundError:
        raise ShardError("missing", f"{url}: no such shard") from None
    except IsADirectoryError:
        raise ShardError("missing", f"{url}: a directory, not a shard") from None
    except tarfile.ReadError as e:
        reason = "truncated" if "unexpected end" in str(e) else "not_a_tar"
        raise ShardError(reason, f"{url}: {e}") from None
    except (EOFError, tarfile.CompressionError) as e:   # a compressed shard cut short, or unknown compression
        raise ShardError("truncated" if isinstance(e, EOFError) else "not_a_tar", f"{url}: {e}") from None
    except Exception as e:  # storage errors (permissions, network, throttling) after the client's own retries
        raise ShardError("unreadable", redact_text(f"{url}: {type(e).__name__}: {e}", options)) from None


def iter_shard(url: str, storage_options: dict | None = None) -> Iterator[dict]:
    """``read_shard`` for callers that loop: a sample's files may sit anywhere in the tar, so the whole
    shard is read before the first sample is yielded, and a broken shard yields nothing."""
    yield from read_shard(url, storage_options)


def _samples(tar: tarfile.TarFile, url: str) -> list[dict]:
    samples: dict[str, dict] = {}           # key -> sample; dicts keep the order keys first appear
    problems: dict[str, str] = {}           # key -> "reason: message", the first problem found
    for member in tar:
        name = _text(member.name)
        if member.isdir() or _META_MEMBER.search(name):
            continue
        match = _KEY_EXT.match(name)
        if not match or match.group(2).startswith("__"):
            continue                        # no extension: part of no sample; "__": reserved for ours
        key, ext = match.groups()
        sample = samples.setdefault(key, {"__key__": key})
        if member.issym() or member.islnk():
            problems.setdefault(key, f"link_member: {name!r} is a link to {_text(member.linkname)!r}, never followed")
        elif not member.isreg():
            problems.setdefault(key, f"special_member: {name!r} is a device or fifo, not a file")
        elif ext in sample:
            problems.setdefault(key, f"duplicate_key: the shard holds {name!r} more than once")
        else:
            sample[ext] = tar.extractfile(member).read()
    _check_end_of_archive(tar, url)
    return [{"__key__": key, "__error__": problems[key]} if key in problems else sample
            for key, sample in samples.items()]


def _text(name: str) -> str:
    """A member name as text Parquet can hold: tarfile keeps undecodable bytes as lone surrogates,
    which no UTF-8 writer accepts, so they become ``\\xNN``."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _check_end_of_archive(tar: tarfile.TarFile, url: str) -> None:
    """tarfile stops quietly when a shard is cut exactly between two members; a complete tar ends with
    zero blocks after its last member, so insist on seeing them."""
    stream = tar.fileobj
    while stream.read(1 << 20):
        pass
    if stream.tell() - tar.offset < tarfile.BLOCKSIZE:
        raise ShardError("truncated", f"{url}: the tar ends without its end-of-archive blocks")


# --- writing -----------------------------------------------------------------------------------------

def shard_bytes(samples: list[dict]) -> bytes:
    """A WebDataset tar holding ``samples`` (dicts of ``__key__`` and ext -> bytes), in order."""
    import io

    from webdataset import TarWriter

    buf = io.BytesIO()
    with TarWriter(buf, encoder=False, mtime=0) as writer:     # mtime 0: the same samples, the same bytes
        for sample in samples:
            writer.write(sample)
    return buf.getvalue()


def write_shard(url: str, samples: list[dict], storage_options: dict | None = None) -> bytes:
    """Write ``samples`` as one shard at ``url`` in a single put (no partial object is ever visible on
    an object store); returns the bytes written."""
    data = shard_bytes(samples)
    fs, path = filesystem(url, storage_options)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, data)
    return data


# --- samples -----------------------------------------------------------------------------------------

def image_member(sample: dict) -> str | None:
    """The extension of the sample's image, or None when it has none."""
    by_type: dict[str, str] = {}
    for ext in sample:
        if not ext.startswith("__"):
            by_type.setdefault(ext.rsplit(".", 1)[-1].lower(), ext)
    return next((by_type[t] for t in IMAGE_EXTENSIONS if t in by_type), None)


def sample_info(sample: dict) -> dict:
    """``url`` and ``caption`` as img2dataset writes them (``key.json``, ``key.txt``), as they are; None
    when absent, not text, or beside metadata that is invalid or over ``MAX_META_BYTES``."""
    meta: dict = {}
    data = sample.get("json")
    if isinstance(data, bytes) and len(data) <= MAX_META_BYTES:
        try:
            loaded = parse_json(data)
            meta = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            meta = {}
    caption = meta.get("caption")
    text = sample.get("txt")
    if isinstance(text, bytes):
        caption = text.decode("utf-8", errors="replace").strip() if len(text) <= MAX_META_BYTES else None
    url = meta.get("url")
    return {"url": _storable(url), "caption": _storable(caption)}


def parse_json(data: bytes):
    """``json.loads`` that fails only with ``ValueError``: deep nesting raises RecursionError otherwise."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _storable(value) -> str | None:
    """Text as Parquet can store it: JSON may carry lone surrogates (``"\\ud800"``), which no UTF-8
    writer accepts; they become U+FFFD. Anything but text is None."""
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
