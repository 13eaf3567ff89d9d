"""Shard listing and reading on real tar files (local and on a moto S3 server)."""

import gzip
import io
import json
import tarfile

import pyarrow as pa
import pytest

from perceptclip.core.storage import StorageConfig, redact, redact_text, storage_options
from perceptclip.inputs.shards import (
    MAX_META_BYTES,
    ShardError,
    expand_shards,
    image_member,
    iter_shard,
    read_shard,
    sample_info,
    shard_bytes,
    shard_name,
    write_shard,
)


def samples(n, prefix="s"):
    return [{"__key__": f"{prefix}{i:03d}", "jpg": bytes([i]) * 700, "json": json.dumps({"i": i}).encode()}
            for i in range(n)]


def raw_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_brace_ranges_globs_and_url_lists(tmp_path):
    for i in range(4):
        write_shard(str(tmp_path / f"shard-{i:03d}.tar"), samples(1))
    braces = expand_shards(str(tmp_path / "shard-{000..002}.tar"))
    assert braces == [str(tmp_path / f"shard-{i:03d}.tar") for i in range(3)]
    assert expand_shards(str(tmp_path / "*.tar")) == [str(tmp_path / f"shard-{i:03d}.tar") for i in range(4)]
    listing = tmp_path / "shards.txt"
    listing.write_text(f"# nightly\n{tmp_path}/shard-003.tar\n\n{tmp_path}/shard-{{000..001}}.tar\n")
    assert expand_shards([str(listing), str(tmp_path / "shard-000.tar")]) == [
        str(tmp_path / "shard-003.tar"), str(tmp_path / "shard-000.tar"), str(tmp_path / "shard-001.tar")]


def test_expansion_fails_loudly(tmp_path):
    with pytest.raises(ValueError, match="matches no shards"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    (tmp_path / "empty.txt").write_text("# no shards\n")
    with pytest.raises(ValueError, match="empty"):
        expand_shards(str(tmp_path / "empty.txt"))


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert expand_shards("a.tar") == [str(tmp_path / "a.tar")]


def test_shard_names():
    assert shard_name("s3://bucket/x/shard-000012.tar") == "shard-000012"
    assert shard_name("/data/part.tar.gz") == "part"
    assert shard_name("gs://b/c.tgz") == "c"


def test_read_groups_members_by_key_in_order(tmp_path):
    path = tmp_path / "a.tar"
    raw_tar(path, [("__index__", b"meta"), ("dir/k1.jpg", b"1"), ("dir/k1.json", b"{}"), ("README", b"x"),
                   ("k2.seg.png", b"2"), ("k2.txt", b"cap")])
    got = read_shard(str(path))
    assert got == [{"__key__": "dir/k1", "jpg": b"1", "json": b"{}"},
                   {"__key__": "k2", "seg.png": b"2", "txt": b"cap"}]
    assert image_member(got[1]) == "seg.png"


def test_written_shards_read_back_and_compress(tmp_path):
    original = samples(5)
    write_shard(str(tmp_path / "out" / "a.tar"), original)
    assert read_shard(str(tmp_path / "out" / "a.tar")) == original
    (tmp_path / "b.tar.gz").write_bytes(gzip.compress(shard_bytes(original)))
    assert read_shard(str(tmp_path / "b.tar.gz")) == original


@pytest.mark.parametrize("damage,reason", [
    (lambda data: data[: len(data) // 2], "truncated"),               # cut inside a member
    (lambda data: data[: 512 + 1024], "truncated"),                   # cut exactly between members
    (lambda data: b"this is not a tar file" * 40, "not_a_tar"),
    (lambda data: b"", "not_a_tar"),
])
def test_broken_shards_say_why(tmp_path, damage, reason):
    path = tmp_path / "bad.tar"
    path.write_bytes(damage(shard_bytes(samples(6))))
    with pytest.raises(ShardError) as e:
        read_shard(str(path))
    assert e.value.reason == reason
    assert str(path) in e.value.message


def test_truncated_gzip_shard(tmp_path):
    data = gzip.compress(shard_bytes(samples(20)))
    (tmp_path / "t.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError) as e:
        read_shard(str(tmp_path / "t.tar.gz"))
    assert e.value.reason == "truncated"


def test_missing_shard(tmp_path):
    with pytest.raises(ShardError) as e:
        read_shard(str(tmp_path / "nope.tar"))
    assert e.value.reason == "missing"


def test_members_out_of_order_are_grouped_by_key(tmp_path):
    raw_tar(tmp_path / "u.tar", [("a.jpg", b"1"), ("b.jpg", b"2"), ("a.json", b"{}"), ("c.txt", b"t"),
                                 ("b.txt", b"x"), ("c.png", b"3")])
    assert read_shard(str(tmp_path / "u.tar")) == [
        {"__key__": "a", "jpg": b"1", "json": b"{}"}, {"__key__": "b", "jpg": b"2", "txt": b"x"},
        {"__key__": "c", "txt": b"t", "png": b"3"}]


def test_a_duplicated_key_is_one_sample_that_says_so(tmp_path):
    raw_tar(tmp_path / "d.tar", [("a.jpg", b"1"), ("b.jpg", b"2"), ("a.json", b"{}"), ("a.jpg", b"3")])
    a, b = read_shard(str(tmp_path / "d.tar"))
    assert a == {"__key__": "a", "__error__": "duplicate_key: the shard holds 'a.jpg' more than once"}
    assert b == {"__key__": "b", "jpg": b"2"}
    assert image_member(a) is None


def special_member(name, kind, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def test_links_devices_and_directories_are_never_followed(tmp_path):
    path = tmp_path / "links.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("good.jpg", b"img"), ("pair.jpg", b"img")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in [special_member("sym.jpg", tarfile.SYMTYPE, "/etc/passwd"),
                     special_member("hard.jpg", tarfile.LNKTYPE, "good.jpg"),
                     special_member("pair.json", tarfile.SYMTYPE, "../../secret.json"),
                     special_member("fifo.jpg", tarfile.FIFOTYPE),
                     special_member("dev.jpg", tarfile.CHRTYPE),
                     special_member("folder.jpg", tarfile.DIRTYPE)]:
            tar.addfile(info)
    got = {s["__key__"]: s for s in read_shard(str(path))}
    assert list(got) == ["good", "pair", "sym", "hard", "fifo", "dev"]          # the directory is no sample
    assert got["good"] == {"__key__": "good", "jpg": b"img"}
    for key, reason, target in [("sym", "link_member", "/etc/passwd"), ("hard", "link_member", "good.jpg"),
                                ("pair", "link_member", "../../secret.json"), ("fifo", "special_member", None),
                                ("dev", "special_member", None)]:
        assert set(got[key]) == {"__key__", "__error__"}                        # no bytes, none guessed
        assert got[key]["__error__"].startswith(f"{reason}: ")
        assert target is None or repr(target) in got[key]["__error__"]


def test_odd_names(tmp_path):
    path = tmp_path / "names.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for name in ["caf\udce9.jpg", "../up.jpg", "/abs/k.jpg", "東京.jpg", "k.jpg", "k.__key__", "x/__index__"]:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"1"))
    got = read_shard(str(path))
    # undecodable bytes are spelt out; reserved extensions cannot overwrite the key
    assert [s["__key__"] for s in got] == ["caf\\xe9", "../up", "/abs/k", "東京", "k"]
    assert got[-1] == {"__key__": "k", "jpg": b"1"}


def test_iter_shard_yields_nothing_from_a_broken_shard(tmp_path):
    data = shard_bytes(samples(6))
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])        # whole samples, then the cut
    seen = []
    with pytest.raises(ShardError):
        for sample in iter_shard(str(tmp_path / "cut.tar")):
            seen.append(sample)
    assert seen == []


def test_img2dataset_fields():
    sample = {"__key__": "k", "jpg": b"", "txt": b"a caption ", "json": json.dumps(
        {"url": "http://example.com/a.jpg", "caption": "other"}).encode()}
    assert sample_info(sample) == {"url": "http://example.com/a.jpg", "caption": "a caption"}
    assert sample_info({"__key__": "k", "json": b"{not json"}) == {"url": None, "caption": None}


@pytest.mark.parametrize("meta,expected", [
    (b"[" * 100_000, {"url": None, "caption": None}),                          # RecursionError inside json
    (b'{"url": "\xff"}', {"url": None, "caption": None}),                       # not UTF-8
    (b'{"url": 3, "caption": ["a"]}', {"url": None, "caption": None}),          # not text
    (b'["a list"]', {"url": None, "caption": None}),
    (b'{"caption": "a \\ud800 b"}', {"url": None, "caption": "a \ufffd\ufffd\ufffd b"}),   # storable in Parquet
    (json.dumps({"url": "u", "caption": "c" * 1000}).encode(), {"url": "u", "caption": "c" * 1000}),
    (json.dumps({"url": "u", "pad": "x" * MAX_META_BYTES}).encode(), {"url": None, "caption": None}),
])
def test_metadata_that_cannot_be_read_leaves_url_and_caption_null(meta, expected):
    info = sample_info({"__key__": "k", "jpg": b"", "json": meta})
    assert info == expected
    pa.array([info["url"], info["caption"]], pa.string())      # always writable
    big = sample_info({"__key__": "k", "txt": b"x" * (MAX_META_BYTES + 1)})
    assert big["caption"] is None
    assert image_member({"__key__": "k", "json": b"{}"}) is None
    assert image_member({"__key__": "k", "JPEG": b"", "png": b""}) == "JPEG"


def test_storage_options_from_environment_and_config(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://general:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:2")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    s3 = storage_options()["s3"]
    assert s3 == {"endpoint_url": "http://s3-only:2", "client_kwargs": {"region_name": "eu-west-3"},
                  "key": "AKIDEXAMPLE", "secret": "very-secret",
                  "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 8},
                                    "max_pool_connections": 64, "request_checksum_calculation": "when_required"}}
    assert storage_options(StorageConfig(endpoint_url="http://cfg:3"))["s3"]["endpoint_url"] == "http://cfg:3"
    shown = redact(storage_options())
    assert "very-secret" not in json.dumps(shown) and "AKIDEXAMPLE" not in json.dumps(shown)
    assert redact_text("denied for very-secret", storage_options()) == "denied for ***"
    with pytest.raises(ValueError, match="^endpoint_url: must be a URL such as http://host:9000"):
        StorageConfig(endpoint_url="localhost:9000")


def test_s3_listing_and_reading(s3_server):
    bucket = s3_server.bucket()
    options = storage_options()
    for i in range(3):
        write_shard(f"{bucket}/shards/shard-{i:06d}.tar", samples(2, prefix=f"{i}-"), options)
    urls = expand_shards(f"{bucket}/shards/shard-*.tar", options)
    assert urls == [f"{bucket}/shards/shard-{i:06d}.tar" for i in range(3)]
    assert expand_shards(f"{bucket}/shards/shard-{{000000..000001}}.tar", options) == urls[:2]
    assert [s["__key__"] for s in read_shard(urls[2], options)] == ["2-000", "2-001"]
    with pytest.raises(ShardError) as e:
        read_shard(f"{bucket}/shards/absent.tar", options)
    assert e.value.reason == "missing"
