"""The driver's side of the scoring job alone: score blocks in, one Parquet table and one marker per shard
out, into an S3 server that answers every request after a fixed delay (a distant object store).

    python benchmarks/commits.py                         # 50 ms a request, 1,000-row shards
    python benchmarks/commits.py --delay-ms 50 --rows 1000 --shards 800 --inline-shards 40

The blocks are shaped as the model actors return them (``score.score_block``): three models (two
regressions and an 8-class classifier), 64 rows a block, each shard's samples followed by its control
row, blocks running across shards as Ray Data batches them. They are built before the clock starts; what
is timed is ``ScoreWriter`` taking them and committing every shard: in line (one commit at a time, as
the driver did before commits moved off its loop), then as the run does (``COMMIT_WORKERS`` at once). For
scale, the same in line into a local folder: the driver's own work, no store latency.

The store is the moto S3 server on loopback behind the tests' ``StoreProxy`` with ``delay``: moto in a
process of its own and the proxy in another, so neither shares a GIL with the driver or with the other (a
real store is elsewhere and answers in parallel). Each line gives rows/s and the CPU seconds of the driver
and of the store, which here shares the machine's cores with the driver. The last line is the rate with commits at once.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
BLOCK_ROWS = 64


def serve(delay: float) -> None:
    """The store, until stdin closes: moto here, the proxy in a process of its own; prints the moto URL, then
    the proxy's."""
    import logging
    import multiprocessing

    logging.getLogger("werkzeug").setLevel(logging.ERROR)     # a line per request otherwise
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    moto = f"http://{host}:{port}"
    here, there = multiprocessing.get_context("spawn").Pipe()
    proxy = multiprocessing.get_context("spawn").Process(target=serve_proxy, args=(moto, delay, there), daemon=True)
    proxy.start()
    print(f"{moto} {here.recv()}", flush=True)
    sys.stdin.read()
    here.send("stop")
    proxy.join(timeout=30)
    server.stop()


def serve_proxy(moto: str, delay: float, conn) -> None:
    """The proxy in front of ``moto``: sends its URL on ``conn``, and stops when ``conn`` says so."""
    sys.path.insert(0, str(TESTS))
    from support.store_proxy import StoreProxy

    proxy = StoreProxy(moto, delay=delay)
    conn.send(proxy.url)
    conn.recv()
    proxy.stop()


def models() -> list:
    """The three models as the driver sees them (their columns and metadata; no weights)."""
    from perceptclip.model.artifact import ArtifactMeta
    from perceptclip.model.debug import tiny_model_config
    from perceptclip.model.reference import ModelSpec

    return [ModelSpec(name=task, ref=f"bench/{task}", meta=ArtifactMeta.for_task(task, tiny_model_config(task)))
            for task in ("iqa", "memorability", "emotion")]


def shard_table(shard: str, rows: int, specs: list, seed: int):
    """One shard's score rows as ``score_block`` gives them, then its control row (``status == "shard"``)."""
    import numpy as np
    import pyarrow as pa

    from perceptclip.core.schema import SHARD_ROW

    rng = np.random.default_rng(seed)
    n = rows + 1
    status = ["ok"] * rows + [SHARD_ROW]
    columns = {
        "shard": pa.array([shard] * n), "key": pa.array([f"{seed:06d}{i:05d}" for i in range(rows)] + [None]),
        "status": pa.array(status), "error": pa.nulls(n, pa.string()),
        "url": pa.array([f"https://example.com/{seed}/{i}.jpg" for i in range(rows)] + [None]),
        "caption": pa.nulls(n, pa.string()),
        "ordinal": pa.array(list(range(rows)) + [-1], pa.int64()),
        "shard_rows": pa.array([-1] * rows + [rows], pa.int64()),
        "width": pa.array(rng.integers(64, 4096, n), pa.int32()),
        "height": pa.array(rng.integers(64, 4096, n), pa.int32()),
    }
    mask = np.array([False] * rows + [True])
    for spec in specs:
        labels = spec.meta.labels
        if labels is None:
            columns[spec.name] = pa.array(rng.random(n, dtype=np.float32), mask=mask)
            continue
        probs = rng.dirichlet(np.ones(len(labels)), n).astype(np.float32)
        columns[spec.name] = pa.array(np.array(labels, dtype=object)[probs.argmax(1)], pa.string(), mask=mask)
        for j, label in enumerate(labels):
            columns[f"{spec.name}_{label}"] = pa.array(probs[:, j], mask=mask)
    return pa.table(columns)


def blocks(shards: int, rows: int, specs: list, prefix: str) -> list:
    """Every shard's rows in order, cut into blocks of ``BLOCK_ROWS`` (a block may hold two shards' rows)."""
    import pyarrow as pa

    stream = pa.concat_tables([shard_table(f"{prefix}/shard-{s:06d}.tar", rows, specs, s) for s in range(shards)])
    return [stream.slice(i, BLOCK_ROWS) for i in range(0, stream.num_rows, BLOCK_ROWS)]


def commit_all(dest: str, options: dict, specs: list, stream: list, workers: int) -> tuple[int, float, float]:
    """Feed ``stream`` to a ``ScoreWriter`` and wait for every commit: (rows committed, seconds, driver
    CPU seconds)."""
    from perceptclip.output.commit import ScoreWriter

    writer = ScoreWriter(dest, options, specs, "bench", overwrite=False, workers=workers)
    results = []
    cpu, start = time.process_time(), time.perf_counter()
    try:
        for block in stream:
            results += writer.add(block)
        results += writer.finish()
    finally:
        results += writer.close()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert not writer.pending() and all(r.failed is None for r in results)
    return sum(r.rows for r in results), seconds, cpu


def measure(what: str, store, shards: int, *args) -> float:
    """``commit_all(*args)``, and one line: rows/s, and the CPU seconds of the driver and of the store."""
    import psutil

    def store_cpu() -> float:          # moto's process and the proxy's
        processes = [psutil.Process(store.pid)] + psutil.Process(store.pid).children(recursive=True)
        return sum(sum(p.cpu_times()[:2]) for p in processes)

    before = store_cpu()
    rows, seconds, cpu = commit_all(*args)
    store_seconds = store_cpu() - before
    print(f"{what}: {shards} shards, {rows:,} rows in {seconds:.2f} s = {rows / seconds:,.0f} rows/s "
          f"(CPU s: driver {cpu:.2f}, store {store_seconds:.2f})", flush=True)
    return rows / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, default=50.0, help="added to every store request")
    parser.add_argument("--rows", type=int, default=1000, help="samples per shard")
    parser.add_argument("--shards", type=int, default=800, help="shards committed as the run commits them")
    parser.add_argument("--inline-shards", type=int, default=40, help="shards committed in line")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.delay_ms / 1000)

    import subprocess

    import s3fs

    from perceptclip.core.storage import StorageConfig, storage_options
    from perceptclip.output.commit import COMMIT_WORKERS
    from perceptclip.output.layout import committed_names

    store = subprocess.Popen([sys.executable, __file__, "--serve", "--delay-ms", str(args.delay_ms)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        moto, proxy = store.stdout.readline().split()
        s3fs.S3FileSystem(endpoint_url=moto, key="testing", secret="testing-secret").mkdir("bench")
        options = storage_options(StorageConfig(endpoint_url=proxy, region="us-east-1", key="testing",
                                                secret="testing-secret"))
        specs = models()
        committed_names("s3://bench/inline", options)       # the client's session starts before the clock
        print(f"{args.rows:,}-row shards, {BLOCK_ROWS}-row blocks, models {', '.join(s.name for s in specs)}; "
              f"store: moto behind a proxy adding {args.delay_ms:g} ms to every request", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            local = blocks(args.inline_shards, args.rows, specs, "local")
            measure("local folder, in line", store, args.inline_shards, tmp, {}, specs, local, 0)
        inline = blocks(args.inline_shards, args.rows, specs, "inline")
        measure("store, in line", store, args.inline_shards, "s3://bench/inline", options, specs, inline, 0)
        pooled = blocks(args.shards, args.rows, specs, "pool")
        rate = measure(f"store, {COMMIT_WORKERS} commits at once", store, args.shards, "s3://bench/pool", options, specs,
                       pooled, COMMIT_WORKERS)
        assert len(committed_names("s3://bench/pool", options)) == args.shards
    finally:
        store.stdin.close()
        store.wait(timeout=60)
    print(f"rows/s at {args.delay_ms:g} ms per request, {args.rows:,}-row shards: {rate:.0f}")


if __name__ == "__main__":
    main()
