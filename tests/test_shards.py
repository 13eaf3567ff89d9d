"""Shard listing and reading on real tar files (local and on a moto S3 server)."""

import gzip
import io
import json
import tarfile

import pytest

from pipeline.shards import (ShardError, expand_shards, image_member, read_shard, sample_info, shard_bytes,
                             shard_name, write_shard)
from pipeline.storage import StorageConfig, redact, redact_text, storage_options


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


def test_missing_unordered_and_duplicate(tmp_path):
    with pytest.raises(ShardError) as e:
        read_shard(str(tmp_path / "nope.tar"))
    assert e.value.reason == "missing"
    raw_tar(tmp_path / "u.tar", [("a.jpg", b"1"), ("b.jpg", b"2"), ("a.json", b"{}")])
    with pytest.raises(ShardError) as e:
        read_shard(str(tmp_path / "u.tar"))
    assert e.value.reason == "unordered"
    raw_tar(tmp_path / "d.tar", [("a.jpg", b"1"), ("a.jpg", b"2")])
    with pytest.raises(ShardError) as e:
        read_shard(str(tmp_path / "d.tar"))
    assert e.value.reason == "duplicate_member"


def test_img2dataset_fields():
    sample = {"__key__": "k", "jpg": b"", "txt": b"a caption ", "json": json.dumps(
        {"url": "http://example.com/a.jpg", "caption": "other"}).encode()}
    assert sample_info(sample) == {"url": "http://example.com/a.jpg", "caption": "a caption"}
    assert sample_info({"__key__": "k", "json": b"{not json"}) == {"url": None, "caption": None}
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
                  "key": "AKIDEXAMPLE", "secret": "very-secret"}
    assert storage_options(StorageConfig(endpoint_url="http://cfg:3"))["s3"]["endpoint_url"] == "http://cfg:3"
    shown = redact(storage_options())
    assert "very-secret" not in json.dumps(shown) and "AKIDEXAMPLE" not in json.dumps(shown)
    assert redact_text("denied for very-secret", storage_options()) == "denied for ***"
    with pytest.raises(ValueError, match="storage.endpoint_url"):
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
