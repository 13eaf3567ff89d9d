"""Hostile input for the scoring job, generated here (nothing is downloaded), each case with the outcome
the job promises: a scored row, an error row with its reason, no row (not a sample), or a failed shard.

``write_hostile_shards`` writes the shards and returns the cases; ``observe`` reads what a scoring run
made of them (its tables and summary) so that a test can compare and ``scripts/hostile_input_table.py``
can print the table in ``docs/reliability.md``. Both use the same cases, so the doc cannot drift from
the test.
"""

from __future__ import annotations

import gzip
import io
import json
import posixpath
import tarfile
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .images import image_bytes, make_image

SHARD = "hostile-000000.tar"
GZIP_SHARD = "hostile-gzip.tar"            # a gzip-compressed tar under a plain .tar name
MAX_PIXELS = 16_000_000                    # the run's max_pixels: the smaller bomb is over it, not over PIL's
IGNORED = "ignored"                        # the outcome of a member that is not a sample: no row


@dataclass
class Case:
    """One hostile input. ``expect``: ``ok``, an error reason, ``ignored`` (no row with ``key``), or,
    for a whole shard (``key`` None), the reason it fails."""

    what: str
    shard: str
    key: str | None
    expect: str
    columns: dict = field(default_factory=dict)      # other values the row must hold


@dataclass
class Outcome:
    case: Case
    got: str                                         # what the run made of it, in ``expect``'s terms
    columns: dict = field(default_factory=dict)      # the row's values for ``case.columns``

    @property
    def as_expected(self) -> bool:
        return self.got == self.case.expect and self.columns == self.case.columns


# --- images ------------------------------------------------------------------------------------------

def _jpeg(seed: int = 0, size=(48, 32), **kwargs) -> bytes:
    return image_bytes(make_image(seed, size), "JPEG", quality=90, **kwargs)


def png_bomb(width: int, height: int) -> bytes:
    """A real 1-bit black PNG of ``width`` x ``height``: a few kilobytes that decode to width*height
    pixels (PIL holds a byte per pixel). Written chunk by chunk, never held whole."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    row = bytes(1 + (width + 7) // 8)                # filter byte 0, then the packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row * min(256, height - y)) for y in range(0, height, 256)) + packer.flush()
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (20, 12), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()


def _palette_with_transparency() -> bytes:
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    img.paste(1, (4, 4, 12, 12))
    return image_bytes(img, "PNG", transparency=0)


def _oriented(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _jpeg(orientation, exif=exif)


# --- shards ------------------------------------------------------------------------------------------

def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = kind, link, 0
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def _tar(members: list[tuple]) -> bytes:
    buf = io.BytesIO()
    # GNU format: long names, and names whose bytes are not UTF-8 written as they are
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _sample_cases() -> tuple[list[tuple], list[Case]]:
    """The members of the main hostile shard, and what each sample must become."""
    good = _jpeg(1)
    meta = json.dumps({"url": "https://example.com/a.jpg", "caption": "a caption"}).encode()
    members: list[tuple] = []
    cases: list[Case] = []

    def sample(what, key, expect, files, **columns):
        members.extend(_member(f"{key}.{ext}", data) for ext, data in files)
        cases.append(Case(what, SHARD, key, expect, columns))

    sample("a good JPEG with its .json (control)", "good", "ok", [("jpg", good), ("json", meta)],
           width=48, height=32, url="https://example.com/a.jpg", caption="a caption")
    sample("truncated JPEG", "truncated", "corrupt", [("jpg", good[: len(good) // 2])])
    sample("zero bytes", "zero", "empty", [("jpg", b"")])
    sample("text named .jpg", "text", "not_an_image", [("jpg", b"<html>404 Not Found</html>\n")])
    sample("PNG named .jpg", "png-as-jpg", "ok", [("jpg", image_bytes(make_image(2, (30, 20)), "PNG"))],
           width=30, height=20)
    sample("EPS named .jpg (a format outside the allowed list)", "eps", "not_an_image",
           [("jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")])
    sixteen = Image.fromarray(np.linspace(0, 65535, 24 * 16, dtype=np.uint16).reshape(16, 24))
    sample("16-bit greyscale PNG", "png16", "ok", [("png", image_bytes(sixteen, "PNG"))], width=24, height=16)
    sample("CMYK JPEG", "cmyk", "ok", [("jpg", image_bytes(make_image(3, (40, 30), mode="CMYK"), "JPEG"))],
           width=40, height=30)
    sample("palette PNG with transparency", "palette", "ok", [("png", _palette_with_transparency())],
           width=16, height=16)
    sample("animated GIF (first frame)", "anim-gif", "ok", [("gif", _animated("GIF"))], width=20, height=12)
    sample("animated WebP (first frame)", "anim-webp", "ok", [("webp", _animated("WEBP"))], width=20, height=12)
    sample("1x1 image", "one-pixel", "ok", [("png", image_bytes(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"))],
           width=1, height=1)
    sample("1x20000 strip (a memory bomb for resize-then-crop)", "strip", "ok",
           [("png", image_bytes(Image.new("L", (1, 20000), 128), "PNG"))], width=1, height=20000)
    bomb = png_bomb(6000, 6000)
    sample(f"decompression bomb: {len(bomb) // 1024} KiB PNG of 6000x6000, over max_pixels", "bomb-36mp",
           "too_large", [("png", bomb)])
    bomb = png_bomb(14000, 14000)
    sample(f"decompression bomb: {len(bomb) // 1024} KiB PNG of 14000x14000, over PIL's own limit", "bomb-196mp",
           "too_large", [("png", bomb)])
    for o in range(1, 9):
        w, h = (32, 48) if o >= 5 else (48, 32)     # 5..8 turn the image a quarter: the sides swap
        sample(f"EXIF orientation {o}", f"exif-{o}", "ok", [("jpg", _oriented(o))], width=w, height=h)
    big = json.dumps({"url": "https://example.com/big.jpg", "pad": "x" * (1 << 20)}).encode()
    sample("JSON over 1 MiB beside an image", "huge-json", "ok", [("jpg", good), ("json", big)], url=None)
    sample("invalid JSON beside an image", "bad-json", "ok", [("jpg", good), ("json", b'{"url": "https://ex')],
           url=None)
    sample("JSON nested 100000 deep", "deep-json", "ok", [("jpg", good), ("json", b"[" * 100_000)], url=None)
    sample("JSON caption with a lone surrogate", "surrogate-json", "ok",
           [("jpg", good), ("json", b'{"caption": "half \\ud800 a pair"}')], caption="half \ufffd\ufffd\ufffd a pair")
    sample("key with /", "dir/sub/key", "ok", [("jpg", good)])
    sample("key with .. segments", "../../escape", "ok", [("jpg", good)])
    sample("key with a leading /", "/abs/key", "ok", [("jpg", good)])
    sample("non-ASCII key", "café-東京", "ok", [("jpg", good)])
    sample("key with a tab and a newline", "tab\tnew\nline", "ok", [("jpg", good)])

    # the same key and extension twice: one sample, one error row
    members += [_member("dup.jpg", good), _member("dup.json", meta), _member("dup.jpg", _jpeg(5))]
    cases.append(Case("duplicate key (dup.jpg twice)", SHARD, "dup", "duplicate_key"))
    # a name that is not UTF-8 (the byte 0xE9): kept, the byte written \xe9
    members.append(_member("latin1-caf\udce9.jpg", good))
    cases.append(Case("file name that is not UTF-8", SHARD, "latin1-caf\\xe9", "ok"))
    # members out of order: the .json comes after another sample
    members[1:1] = [_member("split.jpg", good)]
    members.append(_member("split.json", meta))
    cases.append(Case("members out of order (.jpg first, .json last)", SHARD, "split", "ok",
                      {"url": "https://example.com/a.jpg"}))
    members += [
        _member("sym.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd"),
        _member("hard.jpg", kind=tarfile.LNKTYPE, link="good.jpg"),
        _member("symjson.jpg", good), _member("symjson.json", kind=tarfile.SYMTYPE, link="../../secrets.json"),
        _member("fifo.jpg", kind=tarfile.FIFOTYPE),
        _member("device.jpg", kind=tarfile.CHRTYPE),
        _member("images.jpg", kind=tarfile.DIRTYPE), _member("images", kind=tarfile.DIRTYPE),
        _member("README"),
        _member("noimage.json", meta),
        _member("reserved.jpg", good), _member("reserved.__key__", b"not-the-key"),
    ]
    cases += [
        Case("symlink as the image (to /etc/passwd)", SHARD, "sym", "link_member"),
        Case("hardlink as the image", SHARD, "hard", "link_member"),
        Case("symlink as the .json beside a real image", SHARD, "symjson", "link_member"),
        Case("fifo as the image", SHARD, "fifo", "special_member"),
        Case("character device as the image", SHARD, "device", "special_member"),
        Case("directory entry named like an image", SHARD, "images", IGNORED),
        Case("file without an extension", SHARD, "README", IGNORED),
        Case("sample without an image", SHARD, "noimage", "no_image"),
        Case("member key.__key__ (would overwrite the key)", SHARD, "reserved", "ok"),
    ]
    return members, cases


def write_hostile_shards(folder: str) -> list[Case]:
    """Write every hostile shard into local ``folder``; returns the cases, in order."""
    import os

    os.makedirs(folder, exist_ok=True)
    members, cases = _sample_cases()
    plain = _tar([_member(f"gz-{i}.jpg", _jpeg(20 + i)) for i in range(2)])
    good_tar = _tar([_member(f"k{i}.jpg", _jpeg(30 + i)) for i in range(4)])
    files = {
        SHARD: _tar(members),
        GZIP_SHARD: gzip.compress(plain, mtime=0),
        "broken-truncated.tar": good_tar[: len(good_tar) // 2],
        "broken-not-a-tar.tar": b"<html><body>403 Forbidden</body></html>\n" * 20,
        "broken-empty.tar": b"",
        "broken-truncated-gzip.tar.gz": gzip.compress(good_tar, mtime=0)[:300],
    }
    for name, data in files.items():
        with open(posixpath.join(folder, name), "wb") as f:
            f.write(data)
    cases += [Case(f"gzip-compressed tar named .tar (sample {i})", GZIP_SHARD, f"gz-{i}", "ok") for i in range(2)]
    cases += [
        Case("shard cut in the middle of a member", "broken-truncated.tar", None, "truncated"),
        Case("shard that is not a tar (an HTML error page)", "broken-not-a-tar.tar", None, "not_a_tar"),
        Case("shard of zero bytes", "broken-empty.tar", None, "not_a_tar"),
        Case("gzip shard cut short", "broken-truncated-gzip.tar.gz", None, "truncated"),
    ]
    return cases


# --- what a run made of them -------------------------------------------------------------------------

def observe(cases: list[Case], output: str, summary: dict) -> tuple[list[Outcome], dict]:
    """Each case's outcome in a scoring run's local ``output`` (its summary ``summary``), and the
    reconciliation: input samples (distinct keys in the readable shards, as the cases declare them)
    against the rows written, with the keys written twice and the keys lost."""
    import pyarrow.parquet as pq

    from perceptclip.inputs.shards import shard_name

    failed = {posixpath.basename(f["shard"]): f["reason"] for f in summary["failed_shards"]}
    rows: dict[str, list[dict]] = {}
    for name in {c.shard for c in cases} - set(failed):
        rows[name] = pq.read_table(posixpath.join(output, f"{shard_name(name)}.parquet")).to_pylist()
    outcomes = []
    for case in cases:
        if case.key is None:
            outcomes.append(Outcome(case, failed.get(case.shard, "not failed")))
            continue
        found = [r for r in rows.get(case.shard, []) if r["key"] == case.key]
        if not found:
            got = IGNORED
        elif found[0]["status"] == "ok":
            got = "ok"
        else:
            got = found[0]["error"].split(":", 1)[0]
        columns = {c: found[0][c] for c in case.columns} if found else {}
        outcomes.append(Outcome(case, got if len(found) <= 1 else f"{len(found)} rows", columns))
    declared = [(c.shard, c.key) for c in cases if c.key is not None and c.expect != IGNORED]
    written = [(name, r["key"]) for name, table in rows.items() for r in table]
    reconciliation = {
        "input_samples": len(set(declared)), "rows": len(written),
        "ok": sum(r["status"] == "ok" for table in rows.values() for r in table),
        "error": sum(r["status"] == "error" for table in rows.values() for r in table),
        "duplicates": len(written) - len(set(written)),
        "lost": len(set(declared) - set(written)),
        "unexpected": len(set(written) - set(declared)),
        "failed_shards": len(failed),
    }
    return outcomes, reconciliation
