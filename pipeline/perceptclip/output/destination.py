"""The destination: every command that writes an output opens it here first.

    open      read only: refuse an output equal to, inside or around any input of the run (links
              resolved), an output made by another command, and a rerun whose recorded identity differs
              (unless ``overwrite``), naming what differs (``models.iqa.weights: 62e2b3 -> 9a01c4``)
    begin     the first write: with ``overwrite``, remove what the earlier run made (and only that);
              then record what the output is made from and with. (``check_writable``, which the scoring
              job calls before any other work, writes a probe and leaves no trace.)

The record, ``OUT/_output.json``, holds the command, its inputs (URL and kind) and its settings: what
decides the output's contents (models and their weight digests; a filter's expression and format; a
conversion's source and split settings; a training's config and data). A run that is refused has
written nothing. A file output (a report, evaluation metrics) has no record: it is only kept apart.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from perceptclip.core.clock import utc_now
from perceptclip.core.storage import StorageError, filesystem, holds, join, protocol, redact_text
from perceptclip.core.version import __version__
from perceptclip.inputs.shards import VIRTUAL_SHARD
from perceptclip.output.layout import MARKERS_DIR, RECORD_FILE, RESERVED_DIRS, RUNS_DIR

log = logging.getLogger(__name__)


class OutputRefused(ValueError):
    """An output that cannot be written as asked; nothing was written."""


@dataclass
class Destination:
    """An output opened by one command. ``settings``: what the output is made with, compared with the
    record of an earlier run into it; ``inputs``: what it is made from, ``{"url", "kind"}`` each."""

    url: str
    command: str
    options: dict
    settings: dict = field(default_factory=dict)
    inputs: list[dict] = field(default_factory=list)
    overwrite: bool = False
    earlier: dict | None = None           # the record found, if any
    compare_inputs: bool = True           # False: the output grows with new inputs (scoring a growing prefix)

    @classmethod
    def open(cls, url: str, command: str, options: dict, *, inputs: dict[str, list[str]] | None = None,
             made_from: list[dict] | None = None, settings: dict | None = None, overwrite: bool = False,
             compare_inputs: bool = True, earlier: Callable[[], dict | None] | None = None,
             option: str = "--output") -> Destination:
        """Check ``url`` for ``command`` before anything is written. ``inputs``: what they are (``"the
        input shards"``) -> their URLs, each kept apart from the output; ``made_from``: the inputs to
        record, ``{"url", "kind"}`` each (default: every one of ``inputs``, its kind what it is);
        ``earlier``: the settings of an output written before outputs had records (None: none there)."""
        inputs = inputs or {}
        check_apart(option, url, inputs)
        if made_from is None:
            made_from = [{"url": u, "kind": what} for what, urls in inputs.items() for u in urls]
        dest = cls(url=url, command=command, options=options, settings=settings or {}, inputs=made_from,
                   overwrite=overwrite, compare_inputs=compare_inputs)
        dest.earlier = read_record(url, options)
        if dest.earlier is None and earlier is not None:
            legacy = earlier()
            # inputs as now: an output written before records were kept is checked by its settings alone
            dest.earlier = None if legacy is None else {"command": command, "inputs": made_from, "settings": legacy}
        dest.check_same(option)
        return dest

    def check_same(self, option: str = "--output") -> None:
        if self.earlier is None:
            return
        made_by = self.earlier.get("command")
        if made_by != self.command:
            raise OutputRefused(f"{option}: {self.url} holds the output of `perceptclip {made_by}`, not of "
                                f"`perceptclip {self.command}`; choose another output")
        changes = differences(self.earlier.get("settings", {}), self.settings)
        if self.compare_inputs:
            before = sorted(i["url"] for i in self.earlier.get("inputs", []))
            now = sorted(i["url"] for i in self.inputs)
            if before != now:
                changes.append(f"inputs: {', '.join(before) or 'none'} -> {', '.join(now) or 'none'}")
        if changes and not self.overwrite:
            raise OutputRefused(f"{option}: {self.url} holds an earlier `perceptclip {self.command}` made otherwise "
                                f"({'; '.join(changes)}); choose another output, or --overwrite to replace it")

    def begin(self, remove: Callable[[], list[str]] | None = None) -> None:
        """The first write of the run. With ``overwrite``, ``remove`` lists what the earlier run made
        (default: what the layout knows: tables and files its markers name, markers, run records,
        listings); those go first. Then a write check and the record."""
        if self.overwrite and (self.earlier is not None or remove is not None):
            for path in (remove or self.made_before)():
                self._remove(path)
        inputs = self.inputs
        if not self.compare_inputs and self.earlier is not None and not self.overwrite:
            seen = {i["url"] for i in inputs}
            inputs = [i for i in self.earlier.get("inputs", []) if i["url"] not in seen] + inputs
        record = {"format": "perceptclip-output", "format_version": 1, "command": self.command,
                  "inputs": inputs, "settings": self.settings, "package_version": __version__,
                  "created_at": (self.earlier or {}).get("created_at") if not self.overwrite else None}
        record["created_at"] = record["created_at"] or utc_now()
        record["updated_at"] = utc_now()
        fs, root = filesystem(self.url, self.options)
        if protocol(self.url) == "file":
            fs.makedirs(root, exist_ok=True)
        fs.pipe_file(join(root, RECORD_FILE), json.dumps(record, indent=1, allow_nan=False).encode())

    def made_before(self) -> list[str]:
        """What an earlier run made under this output, as the layout knows it: every file a marker names,
        the markers, the run records and the listings of folders of image files."""
        fs, root = filesystem(self.url, self.options)
        found: list[str] = []
        markers = _listing(fs, join(root, MARKERS_DIR))
        for marker in markers:
            try:
                named = json.loads(fs.cat_file(marker)).get("output")
            except (ValueError, OSError):
                named = None
            name = marker.rsplit("/", 1)[-1].removesuffix(".json")
            named_path = filesystem(named, self.options)[1] if isinstance(named, str) else None
            # a marker names its file; the file must lie directly under this output to be removed
            for path in {p for p in (named_path, join(root, f"{name}.parquet")) if p}:
                if path.rsplit("/", 1)[0] == root.rstrip("/") and fs.exists(path):
                    found.append(path)
        found += markers
        found += _listing(fs, join(root, RUNS_DIR), recursive=True)
        for folder in RESERVED_DIRS:
            if folder not in (MARKERS_DIR, RUNS_DIR):
                found += _listing(fs, join(root, folder), recursive=True)
        if fs.exists(join(root, RECORD_FILE)):
            found.append(join(root, RECORD_FILE))
        return found

    def _remove(self, path: str) -> None:
        fs, _ = filesystem(self.url, self.options)
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass
        except Exception as e:
            raise StorageError(redact_text(f"{self.url}: cannot remove {path} of the earlier run: "
                                           f"{type(e).__name__}: {e}", self.options)) from None


def _listing(fs, folder: str, recursive: bool = False) -> list[str]:
    try:
        if recursive:
            return sorted(fs.find(folder))
        return sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        return []


def read_record(url: str, options: dict) -> dict | None:
    """The record of what ``url`` was made from and with, or None (no output there yet, or one written
    before outputs had records)."""
    fs, root = filesystem(url, options)
    try:
        data = fs.cat_file(join(root, RECORD_FILE))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StorageError(redact_text(f"{url}: cannot read {RECORD_FILE}: {type(e).__name__}: {e}", options)) from None
    try:
        record = json.loads(data)
    except ValueError:
        raise OutputRefused(f"{url}: {RECORD_FILE} is not readable JSON; it records what the output was made "
                            f"from: restore it, or choose another output") from None
    return record if isinstance(record, dict) else None


def made_from(url: str, options: dict) -> list[str]:
    """The inputs an output was made from, as its record names them; for an output written before outputs
    had records, the shards its markers name (a virtual shard: the folder of image files it lists)."""
    record = read_record(url, options)
    if record is not None:
        urls = [i["url"] for i in record.get("inputs", []) if isinstance(i, dict) and isinstance(i.get("url"), str)]
        return list(dict.fromkeys(listed_root(u, options) or u for u in urls))
    fs, root = filesystem(url, options)
    found: list[str] = []
    for marker in _listing(fs, join(root, MARKERS_DIR)):
        try:
            shard = json.loads(fs.cat_file(marker)).get("shard")
        except (ValueError, OSError):
            continue
        if isinstance(shard, str):
            found.append(listed_root(shard, options) or shard)
    return list(dict.fromkeys(found))


def listed_root(shard: str, options: dict) -> str | None:
    """The folder of image files a virtual shard was listed from (its listing's metadata), else None."""
    match = VIRTUAL_SHARD.search(shard)
    if match is None:
        return None
    import pyarrow.parquet as pq

    fs, path = filesystem(shard[:match.start(1) - 1], options)
    try:
        with fs.open(path, "rb") as f:
            meta = pq.read_schema(f).metadata or {}
        return json.loads(meta[b"perceptclip"])["root"]
    except Exception:
        return None


def check_apart(option: str, output: str, inputs: dict[str, list[str]]) -> None:
    """Refuse an output equal to, inside or around any input: writing there could overwrite an input, mix
    with it, or be read as input by the next run over it. ``inputs``: what they are -> their URLs."""
    for what, urls in inputs.items():
        for url in urls:
            url = url.split("#", 1)[0] if VIRTUAL_SHARD.search(url) else url
            if holds(output, url):
                raise OutputRefused(f"{option}: {output} holds {what} ({url}); write the output to a folder apart "
                                    f"from its inputs")
            if holds(url, output):
                one = what.removesuffix("s") if what.endswith("s") else what
                one = one if one.startswith("the ") else f"the {one}"
                raise OutputRefused(f"{option}: {output} lies inside {one} {url}; a later run over it would read "
                                    f"what is written there as input: write the output to a folder apart")


def check_writable(url: str, options: dict) -> None:
    """Fail before any model is loaded or shard read when nothing can be written under ``url`` (a
    read-only mount, a missing bucket, a role without write access). Writes an empty object and removes
    it, and the folders it had to make: a run refused afterwards leaves no trace."""
    probe = join(url, f".write-check-{uuid.uuid4().hex}")
    made: list[str] = []
    try:
        fs, path = filesystem(probe, options)
        if protocol(url) == "file":
            # only local folders: object stores have none, and s3fs's makedirs would create a missing bucket
            folder = path.rsplit("/", 1)[0]
            while folder and not os.path.lexists(folder):
                made.append(folder)
                folder = folder.rsplit("/", 1)[0]
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, b"")
    except Exception as e:
        raise StorageError(redact_text(f"output: cannot write under {url}: {type(e).__name__}: {e}", options)) from None
    try:
        fs.rm_file(path)
        for folder in made:                     # deepest first; one that is not empty is someone else's now
            os.rmdir(folder)
    except Exception as e:  # a store may grant writes but not deletes; the commands only write
        log.warning("%s", redact_text(f"could not remove {probe}: {type(e).__name__}: {e}", options))


def differences(earlier: dict, now: dict) -> list[str]:
    """What differs between two settings, for a person: ``epochs: 15 -> 2``, ``models.iqa.weights: 62e2b3 ->
    9a01c4``. Long values are shortened; a digest to its first 6 characters."""
    before, after = flatten(earlier), flatten(now)
    out = []
    for key in sorted(set(before) | set(after), key=lambda k: (k.count("."), k)):
        if before.get(key) != after.get(key):
            out.append(f"{key}: {_short(before.get(key))} -> {_short(after.get(key))}")
    return out


def flatten(mapping: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _short(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:6]
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
