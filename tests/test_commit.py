"""Commits off the driver's loop: ``ScoreWriter`` with commits in flight, against the moto S3 server behind
``StoreProxy``, fed score blocks made by the job's own stages from shards written here. The proxy holds
or refuses a table's upload, so what overlaps and what waits is seen, not timed."""

import hashlib
import io
import json
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from perceptclip.core.storage import StorageConfig, StorageError, storage_options
from perceptclip.inputs.shards import write_shard
from perceptclip.model.preprocess import DEFAULT_MAX_PIXELS
from perceptclip.model.reference import ModelSpec, distinct_preprocessing
from perceptclip.output.commit import ScoreWriter
from perceptclip.scoring.actor import score_block
from perceptclip.scoring.decode import read_and_decode
from support.images import image_bytes, make_image
from support.store_proxy import StoreProxy
from support.waiting import wait_for

SHARDS = 8
PER_SHARD = 3


@pytest.fixture(scope="module")
def scored(tmp_path_factory, iqa_artifact):
    """The model, and one score block per shard (its samples, then its control row) as the actors send them."""
    from perceptclip.model.scorer import Scorer

    root = tmp_path_factory.mktemp("shards")
    spec = ModelSpec.resolve(iqa_artifact)
    preprocessing, crops_index = distinct_preprocessing([spec])
    scorers = [Scorer.load(spec.ref, name=spec.name)]
    blocks = []
    for s in range(SHARDS):
        url = str(root / f"shard-{s:06d}.tar")
        write_shard(url, [{"__key__": f"{s:02d}{i:02d}", "jpg": image_bytes(make_image(10 * s + i, size=(24, 24)))}
                          for i in range(PER_SHARD)])
        decoded = read_and_decode({"shard": np.array([url], dtype=object)}, preprocessing, {}, 2, DEFAULT_MAX_PIXELS)
        blocks.append(pa.concat_tables([score_block(b, scorers, crops_index) for b in decoded]))
    return [spec], blocks


@pytest.fixture
def proxy(s3_server):
    store = StoreProxy(s3_server.endpoint)
    yield store
    store.stop()


@pytest.fixture
def dest(s3_server):
    return f"{s3_server.bucket()}/scores"


def writer_for(dest: str, proxy: StoreProxy, specs: list, workers: int) -> ScoreWriter:
    # one try a request: a refused upload fails at once (403 is never retried anyway)
    options = storage_options(StorageConfig(endpoint_url=proxy.url, max_attempts=1))
    s3fs.S3FileSystem.clear_instance_cache()
    return ScoreWriter(dest, options, specs, "test-run", overwrite=False, workers=workers)


def committed(s3_server, dest: str) -> set[str]:
    """The shards with a marker, each checked against its table: never a marker without its whole table."""
    fs = s3_server.filesystem()
    fs.invalidate_cache()       # listings are cached by the client
    names = set()
    for path in fs.glob(f"{dest[5:]}/_markers/*.json"):
        name = path.rsplit("/", 1)[-1].removesuffix(".json")
        marker = json.loads(fs.cat_file(path))
        data = fs.cat_file(f"{dest[5:]}/{name}.parquet")
        assert marker["sha256"] == hashlib.sha256(data).hexdigest(), name
        assert pq.read_table(io.BytesIO(data)).num_rows == marker["rows"] == PER_SHARD
        names.add(name)
    return names


def stored(s3_server, dest: str, name: str) -> bool:
    fs = s3_server.filesystem()
    fs.invalidate_cache()
    return fs.exists(f"{dest[5:]}/{name}.parquet")


def names(results) -> set[str]:
    return {r.shard.rsplit("/", 1)[-1].removesuffix(".tar") for r in results}


def test_commits_overlap_while_the_loop_goes_on(s3_server, proxy, dest, scored):
    """One shard's table is held at the store: the loop goes on taking blocks, the other shards are
    committed around it, the held shard has no marker until its table is stored, and ``finish`` waits for it."""
    specs, blocks = scored
    proxy.hold("PUT", "/shard-000000.parquet")
    writer = writer_for(dest, proxy, specs, workers=3)
    results = []
    for block in blocks:
        results += writer.add(block)
    assert proxy.arrived.wait(timeout=30)
    wait_for(lambda: len(committed(s3_server, dest)) == SHARDS - 1, 60, "the other shards' commits")
    assert "shard-000000" not in committed(s3_server, dest) and not stored(s3_server, dest, "shard-000000")
    proxy.release()
    results += writer.finish()
    results += writer.close()
    assert sorted(r.shard for r in results) == sorted(b["shard"][0].as_py() for b in blocks)
    assert committed(s3_server, dest) == names(results) and len(results) == SHARDS
    assert writer.pending() == []


def test_a_full_pool_makes_the_loop_wait(s3_server, proxy, dest, scored):
    """Every table is held: two workers take two shards, and the loop waits in ``add`` with the third
    shard (the rows waiting to be stored stay bounded) until the store answers again."""
    specs, blocks = scored
    proxy.hold("PUT", ".parquet")
    writer = writer_for(dest, proxy, specs, workers=2)
    taken, results = [], []

    def loop():
        for block in blocks:
            taken.append(block)
            results.extend(writer.add(block))
        results.extend(writer.finish())

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        wait_for(lambda: len(taken) >= 3, 30, "the loop to take the third shard")
        thread.join(timeout=1.0)
        assert thread.is_alive() and len(taken) == 3 and results == []
    finally:
        proxy.release()
        thread.join(timeout=60)
    writer.close()
    assert committed(s3_server, dest) == names(results) and len(results) == SHARDS


def test_a_failed_commit_stops_the_run_with_the_shard_named(s3_server, proxy, dest, scored):
    """The store refuses one shard's table: the error, naming the shard, is raised on the caller's thread;
    ``close`` lets the commits in flight finish; every shard reported committed has its marker and table,
    none other has a marker, and the refused shard has neither."""
    specs, blocks = scored
    proxy.deny = {"/scores/shard-000002.parquet": "PUT"}
    writer = writer_for(dest, proxy, specs, workers=3)
    results = []
    with pytest.raises(StorageError) as error:
        try:
            for block in blocks:
                results += writer.add(block)
            results += writer.finish()
        finally:
            results += writer.close()
    assert str(error.value).startswith(f"{dest}: cannot commit shard-000002: PermissionError: Access Denied")
    assert committed(s3_server, dest) == names(results)
    assert "shard-000002" not in names(results) and not stored(s3_server, dest, "shard-000002")


def test_commits_in_flight_when_the_loop_stops_finish_and_count(s3_server, proxy, dest, scored):
    """The loop stops with an error of its own (Ray's, an interrupt) while a table is being stored:
    ``close`` lets that commit finish whole (table, then marker) and reports it."""
    specs, blocks = scored
    proxy.hold("PUT", "/shard-000000.parquet")
    writer = writer_for(dest, proxy, specs, workers=2)
    results = []
    with pytest.raises(KeyboardInterrupt):
        try:
            results += writer.add(blocks[0])
            assert proxy.arrived.wait(timeout=30)
            raise KeyboardInterrupt
        finally:
            threading.Timer(0.5, proxy.release).start()
            results += writer.close()
    assert names(results) == {"shard-000000"} == committed(s3_server, dest)


def test_rows_of_several_shards_out_of_order_give_each_table_in_sample_order(tmp_path, scored):
    """Blocks cut across shards, a shard's rows split over blocks in any order, a control row ahead of
    rows of another shard: each table holds its shard's rows in sample order, as one block in order gives."""
    specs, blocks = scored
    a, b = blocks[0], blocks[1]                  # each: 3 samples, then the shard's control row
    mixed = [pa.concat_tables([a.slice(2, 1), b.slice(0, 1)]),
             pa.concat_tables([b.slice(1, 1), a.slice(0, 2)]),
             pa.concat_tables([a.slice(3, 1), b.slice(2, 2)])]
    writer = ScoreWriter(str(tmp_path / "mixed"), {}, specs, "test-run", overwrite=False)
    results = [r for block in mixed for r in writer.add(block)]
    assert sorted(r.rows for r in results) == [PER_SHARD, PER_SHARD] and not writer.pending()
    straight = ScoreWriter(str(tmp_path / "straight"), {}, specs, "test-run", overwrite=False)
    assert names(straight.add(a) + straight.add(b)) == names(results)
    for name in names(results):
        got = pq.read_table(tmp_path / "mixed" / f"{name}.parquet")
        want = pq.read_table(tmp_path / "straight" / f"{name}.parquet")
        assert got["key"].to_pylist() == want["key"].to_pylist()
        assert got.equals(want)
