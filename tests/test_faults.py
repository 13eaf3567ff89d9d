"""Faults in the scoring job, each injected into a real run: a model actor killed, a node removed, the
driver killed and the same command run again, an object store that throttles, refuses or goes away,
a destination that cannot be written. After each, every input sample is exactly one row of its shard's
committed table (errors included): none lost, none duplicated.

The object store is the moto server behind ``StoreProxy``, a small HTTP proxy on loopback that injects
the store's faults and can hold one request until the test lets it through: a shard still being fetched
or a table still being stored keeps the run going while the test breaks something, whatever the timing
of the machine."""

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
import s3fs

from perceptclip.core.storage import StorageError
from perceptclip.inputs.shards import write_shard
from perceptclip.scoring.config import ScoreConfig
from perceptclip.scoring.job import run_score
from support.images import image_bytes, make_image
from support.processes import kill_session, raylet_pid, reported, session_pids, worker_pids
from support.store_proxy import StoreProxy
from support.waiting import wait_for

# every test injects a fault into a real run or runs a job against the fault-injecting store
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SECRET = "testing-secret"                     # the fake secret key the s3_server fixture sets
SHARDS = 8
PER_SHARD = 4


# ------------------------------------------------------------------------------------- the store proxy

@pytest.fixture
def proxy(s3_server, monkeypatch):
    """The moto server behind a ``StoreProxy``; the job's storage settings (the AWS environment) name the proxy."""
    store = StoreProxy(s3_server.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", store.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", store.url)
    s3fs.S3FileSystem.clear_instance_cache()
    yield store
    store.stop()
    s3fs.S3FileSystem.clear_instance_cache()


# ------------------------------------------------------------------------------------------ the data

def shard_contents() -> dict[str, list[dict]]:
    """SHARDS shards of PER_SHARD small JPEGs, keys unique across shards, one image corrupt."""
    contents = {}
    for s in range(SHARDS):
        contents[f"shard-{s:06d}"] = [
            {"__key__": f"{s:03d}{i:02d}", "jpg": image_bytes(make_image(s * 10 + i, size=(24, 24)))}
            for i in range(PER_SHARD)]
    # an image that cannot be decoded: an error row, counted among the rows written, never lost
    contents["shard-000001"][2]["jpg"] = b"\xff\xd8\xff\xe0 not really a JPEG"
    return contents


def upload(s3_server, iqa_artifact: str) -> tuple[str, dict, str]:
    """Shards and the model on a fresh bucket (written straight to moto): (bucket, contents, model URI)."""
    bucket = s3_server.bucket()
    options = {"s3": {"endpoint_url": s3_server.endpoint, "key": "testing", "secret": SECRET}}
    contents = shard_contents()
    for name, samples in contents.items():
        write_shard(f"{bucket}/shards/{name}.tar", samples, options)
    s3_server.filesystem().put(iqa_artifact, f"{bucket[5:]}/models/iqa", recursive=True)
    return bucket, contents, f"{bucket}/models/iqa"


def score_config(bucket: str, model: str, output: str, **extra) -> ScoreConfig:
    """Small blocks and half-CPU readers: the two-CPU test cluster reads two shards (one may be held)
    while the model actor scores."""
    settings = {"block_rows": 2, "batch_size": 2, "cpus_per_reader": 0.5, "reader_memory_mb": 64, **extra}
    return ScoreConfig(input=[f"{bucket}/shards/*.tar"], output=output, models=[model], **settings)


def reconcile(fs, out: str, contents: dict[str, list[dict]]) -> dict:
    """Every input sample is exactly one row of its shard's committed table; every marker's checksum is
    the table's. Returns the counts the docs quote."""
    fs.invalidate_cache()
    rows, errors = [], 0
    for name, samples in contents.items():
        marker = json.loads(fs.cat_file(f"{out}/_markers/{name}.json"))
        data = fs.cat_file(f"{out}/{name}.parquet")
        assert marker["sha256"] == hashlib.sha256(data).hexdigest(), name
        table = pq.read_table(io.BytesIO(data))
        assert table["key"].to_pylist() == [s["__key__"] for s in samples], name
        assert marker["rows"] == table.num_rows
        rows += table["key"].to_pylist()
        errors += table["status"].to_pylist().count("error")
    keys = [s["__key__"] for samples in contents.values() for s in samples]
    counts = {"input_samples": len(keys), "rows_written": len(rows), "error_rows": errors,
              "duplicates": len(rows) - len(set(rows)), "lost": len(set(keys) - set(rows))}
    assert counts == {"input_samples": SHARDS * PER_SHARD, "rows_written": SHARDS * PER_SHARD, "error_rows": 1,
                      "duplicates": 0, "lost": 0}
    return counts


def markers(fs, out: str) -> set[str]:
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[-1].removesuffix(".json") for p in fs.glob(f"{out}/_markers/*.json")}


# The images of shard_contents() also as loose files under a prefix on the store (a `files` input), PER_SHARD
# to a virtual shard, so photos-000000 .. photos-000007 hold what the tars hold. The grouping is recorded
# under the output by the first run; a rerun must keep it.

def put_photos(s3_server, bucket: str) -> dict[str, list[dict]]:
    """The images as files ``photos/SSS/II.jpg`` on ``bucket`` (written straight to moto): their keys by
    virtual shard. Keys sort in shard order: one tar, one virtual shard."""
    fs, contents = s3_server.filesystem(), {}
    for s, samples in enumerate(shard_contents().values()):
        contents[f"photos-{s:06d}"] = [{"__key__": f"{s:03d}/{i:02d}.jpg"} for i in range(len(samples))]
        for sample, image in zip(contents[f"photos-{s:06d}"], samples):
            fs.pipe_file(f"{bucket[5:]}/photos/{sample['__key__']}", image["jpg"])
    return contents


def upload_files(s3_server, iqa_artifact: str) -> tuple[str, dict, str]:
    """The images as files and the model on a fresh bucket: (bucket, contents by virtual shard, model URI)."""
    bucket = s3_server.bucket()
    contents = put_photos(s3_server, bucket)
    s3_server.filesystem().put(iqa_artifact, f"{bucket[5:]}/models/iqa", recursive=True)
    return bucket, contents, f"{bucket}/models/iqa"


def files_config(bucket: str, model: str, output: str, **extra) -> ScoreConfig:
    """``score_config`` on the prefix. A fetch timeout longer than any hold: a held file arrives late, it
    does not become an error row."""
    return dataclasses.replace(score_config(bucket, model, output, **extra), input=[f"{bucket}/photos/"],
                               input_kind="files", files_per_shard=PER_SHARD, fetch_timeout_s=300.0)


def both_config(bucket: str, model: str, output: str, **extra) -> ScoreConfig:
    """``files_config`` on the tars and the prefix in one run, each input's kind told by what it holds."""
    return dataclasses.replace(files_config(bucket, model, output, **extra), input_kind="auto",
                               input=[f"{bucket}/shards/*.tar", f"{bucket}/photos/"])


def reconcile_files(fs, out: str, bucket: str, contents: dict[str, list[dict]]) -> dict:
    """``reconcile``, and: each row says which file it was read from, and every run used the one grouping
    the first recorded (no listing beside it)."""
    counts = reconcile(fs, out, contents)
    for name in contents:
        table = pq.read_table(io.BytesIO(fs.cat_file(f"{out}/{name}.parquet")))
        assert table["url"].to_pylist() == [f"{bucket}/photos/{key}" for key in table["key"].to_pylist()], name
    listings = [p.rsplit("/", 1)[-1] for p in fs.ls(f"{out}/_inputs/photos", detail=False)]
    assert listings == ["listing-000000.parquet"]
    return counts


# ------------------------------------------------------------------------------------------ compute

def test_a_killed_model_actor_is_restarted_and_every_shard_commits_once(proxy, s3_server, iqa_artifact,
                                                                        ray_local, tmp_path):
    """SIGKILL of the model actor's process after the first commit, while the last tar is still being
    fetched (held at the proxy), in a run over both inputs (the tars and the image files under a prefix):
    Ray restarts the actor and retries its tasks, the run completes, and every table holds its shard's
    or its virtual shard's samples exactly once (the writer raises on any extra row)."""
    bucket, contents, _ = upload(s3_server, iqa_artifact)
    photos = put_photos(s3_server, bucket)
    out = tmp_path / "scores"
    proxy.hold("GET", "/shards/shard-000007.tar")
    result = {}
    thread = threading.Thread(target=_run_into, args=(result, both_config(bucket, iqa_artifact, str(out))))
    thread.start()
    wait_for(lambda: list(out.glob("_markers/*.json")), 240, "the first commit")
    raylet = raylet_pid()
    [actor] = wait_for(lambda: worker_pids(raylet, "ModelActor"), 30, "the model actor")
    os.kill(actor, signal.SIGKILL)
    wait_for(lambda: set(worker_pids(raylet, "ModelActor")) - {actor}, 120, "the restarted model actor")
    assert "summary" not in result                      # the held shard kept the run going
    proxy.release()
    thread.join(timeout=240)

    assert "error" not in result, result.get("lines")
    assert result["summary"]["shards"] == {"planned": 2 * SHARDS, "done": 2 * SHARDS, "skipped": 0, "failed": 0}
    reconcile(fsspec.filesystem("file"), str(out), contents)
    reconcile_files(fsspec.filesystem("file"), str(out), bucket, photos)


# A driver process of its own: the test process already holds the shared local cluster, and a second
# ray.init beside it will not work. It starts a head (no CPUs: nothing runs beside the driver) and two
# 2-CPU worker nodes, scores, removes the node of the model actor after the first commit, and prints
# a line "removed {...}" then and a line "outcome {...}" at the end (`support.processes.report`).
# Anything that stops it first is a line "failed {...}", and it exits at once: the run's thread, waiting
# on the held shard, would keep it alive. Its output goes to files: a pipe nobody reads would fill up and
# stop it. It runs in the repository.
NODE_LOSS = r"""
import json, os, sys, threading, time, traceback
from ray.cluster_utils import Cluster
from perceptclip.scoring.config import ScoreConfig
from perceptclip.scoring.job import run_score
sys.path.insert(0, "tests")
from support.processes import raylet_pid, report, worker_pids

cfg = ScoreConfig(**json.loads(sys.argv[1]))
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
def runs_the_model(node):
    return bool(worker_pids(raylet_pid(node), "ModelActor"))
try:        # shutdown also removes the address file the Cluster wrote for plain ray.init() to find
    workers = [cluster.add_node(num_cpus=2, wait=False) for _ in range(2)]     # both start at once
    cluster.wait_for_nodes()
    cfg.address = cluster.address
    result = {}
    def run():
        try:
            result["summary"] = run_score(cfg).to_dict()
        except Exception as e:
            result["error"] = repr(e)
    thread = threading.Thread(target=run)
    thread.start()
    markers = os.path.join(cfg.output, "_markers")
    while thread.is_alive() and not (os.path.isdir(markers) and os.listdir(markers)):
        time.sleep(0.02)
    if thread.is_alive():
        victim = next(n for n in workers if runs_the_model(n))
        try:
            cluster.remove_node(victim, allow_graceful=False)
        except AssertionError as e:
            # Ray waits 30 s at most for each SIGKILLed process of the node to be reaped, then says
            # "zombie processes left over": on a loaded machine one may take longer. It is killed all the same.
            if "zombie" not in str(e):
                raise
        report("removed", {"nodes_left": len(cluster.list_all_nodes())})
    thread.join()
    report("outcome", result)
except BaseException:
    report("failed", traceback.format_exc())
    cluster.shutdown()
    os._exit(1)
finally:
    cluster.shutdown()
"""


def test_a_node_removed_mid_run_and_the_run_completes_on_the_rest(proxy, s3_server, iqa_artifact, tmp_path):
    """Three nodes on this machine (``ray.cluster_utils.Cluster``); the worker node running the model
    actor is removed without warning after the first commit, while the last shard is held at the
    proxy: the actor comes back on the other node, lost blocks are recomputed, the run completes and
    reconciles."""
    bucket, contents, _ = upload(s3_server, iqa_artifact)
    out = tmp_path / "scores"
    proxy.hold("GET", "/shards/shard-000007.tar")
    cfg = score_config(bucket, iqa_artifact, str(out))
    fields = {k: getattr(cfg, k) for k in ("input", "output", "models", "block_rows", "batch_size",
                                           "cpus_per_reader", "reader_memory_mb")}
    # Ray's folder of its own: the cluster, killed at the end if it must be, leaves no address file in /tmp/ray
    ray_tmp = tempfile.mkdtemp(prefix="pc-ray-", dir="/tmp")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp}
    stdout, stderr = tmp_path / "driver.out", tmp_path / "driver.err"

    def said(word: str) -> dict | None:
        return reported(stdout.read_text(), word)

    with open(stdout, "w") as out_file, open(stderr, "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-c", NODE_LOSS, json.dumps(fields)], cwd=REPO, env=env,
                                stdout=out_file, stderr=err_file, start_new_session=True)
    try:
        removal = wait_for(lambda: said("removed") or said("failed") or proc.poll() is not None, 300,
                           "the node's removal", said=lambda: stdout.read_text() + stderr.read_text()[-3000:])
        proxy.release()
        proc.wait(timeout=300)
    finally:
        kill_session(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert removal == {"nodes_left": 2}, said("failed") or stderr.read_text()[-3000:]   # the head and one worker node
    outcome = said("outcome")
    assert outcome["summary"]["shards"] == {"planned": SHARDS, "done": SHARDS, "skipped": 0, "failed": 0}, outcome
    reconcile(fsspec.filesystem("file"), str(out), contents)


# ------------------------------------------------------------------------------------------ the store

def test_a_throttling_store_is_retried_and_what_it_refuses_is_redone_by_the_next_run(
        proxy, s3_server, iqa_artifact, ray_local):
    """Every third request to the store is answered 503 SlowDown for the whole run (shards, model,
    tables, markers, summary), one shard's downloads are refused (403), and so is the upload of another
    shard's table, the last to arrive (its download is held until the refused shard is reported). The
    client's back-off carries the run through the throttling; the refused shard is a failed shard; the
    refused table stops the run with an error naming it, and the summary says where the run stopped.
    Neither shard has a marker, and the next run scores exactly those two."""
    bucket, contents, model = upload(s3_server, iqa_artifact)
    out, fs = f"{bucket}/scores", s3_server.filesystem()
    proxy.mode = "flaky"
    proxy.deny = {"/shards/shard-000003.tar": "GET", "/scores/shard-000007.parquet": "PUT"}
    proxy.hold("GET", "/shards/shard-000007.tar")
    # one row a model call: with two, the refused shard's lone control row could wait in Ray Data for a row
    # of the held shard to fill its batch, and the run would wait on the test while the test waits on it
    cfg = score_config(bucket, model, out, batch_size=1)
    result = {}
    thread = threading.Thread(target=_run_into, args=(result, cfg))
    thread.start()
    wait_for(lambda: any("shard-000003: FAILED" in line for line in result.get("lines", [])), 240,
              "the refused shard to be reported")
    proxy.release()
    thread.join(timeout=240)

    assert proxy.statuses("GET", "/shards/").count(503) >= 3 and proxy.statuses("PUT", "/scores/").count(503) >= 3
    assert isinstance(result["error"], StorageError)
    assert str(result["error"]).startswith(f"{out}: cannot commit shard-000007: PermissionError: Access Denied")
    [path] = fs.glob(f"{out[5:]}/_runs/*.json")
    summary = json.loads(fs.cat_file(path))
    assert summary["aborted"] == f"StorageError: {result['error']}"
    # a shard's last rows may wait in Ray Data for the next shard's to fill a batch: which shards were
    # committed before the refused table depends on the timing, that they are the markers does not
    committed = markers(fs, out[5:])
    assert committed and committed <= set(contents) - {"shard-000003", "shard-000007"}
    assert {Path(o).stem for o in summary["outputs"]} == committed
    assert summary["shards"] == {"planned": SHARDS, "done": len(committed), "skipped": 0, "failed": 1}
    [failed] = summary["failed_shards"]
    assert failed["shard"] == f"{bucket}/shards/shard-000003.tar" and failed["reason"] == "unreadable"
    assert "Access Denied" in failed["message"]
    assert not fs.exists(f"{out[5:]}/shard-000003.parquet") and not fs.exists(f"{out[5:]}/shard-000007.parquet")

    proxy.mode, proxy.deny = "ok", {}
    again = run_score(cfg).to_dict()
    assert again["shards"] == {"planned": SHARDS, "done": SHARDS - len(committed), "skipped": len(committed),
                               "failed": 0}
    reconcile(fs, out[5:], contents)


def test_a_shard_still_being_fetched_holds_back_no_other_shards_commit(proxy, s3_server, iqa_artifact, ray_local,
                                                                       tmp_path):
    """The driver commits each shard as soon as its rows arrive, whatever comes after it: with the last
    shard's download held at the proxy, every other shard is committed (one row a model call, so nothing
    but the driver could hold a shard's rows back)."""
    bucket, contents, _ = upload(s3_server, iqa_artifact)
    out = tmp_path / "scores"
    proxy.hold("GET", "/shards/shard-000007.tar")
    result = {}
    thread = threading.Thread(target=_run_into, args=(result, score_config(bucket, iqa_artifact, str(out),
                                                                           batch_size=1)))
    thread.start()
    try:
        wait_for(lambda: len(list(out.glob("_markers/*.json"))) == SHARDS - 1 or not thread.is_alive(), 240,
                 "every shard but the held one to commit")
        assert "summary" not in result                  # the held shard kept the run going
    finally:
        proxy.release()
        thread.join(timeout=240)
    assert result["summary"]["shards"] == {"planned": SHARDS, "done": SHARDS, "skipped": 0, "failed": 0}
    reconcile(fsspec.filesystem("file"), str(out), contents)


def run_through_an_outage(proxy, cfg, fs, out: str) -> dict:
    """Run ``cfg`` in a thread; after its first commit, hold every upload of a table or marker at the proxy,
    then drop every connection. ``max_attempts: 1`` in ``cfg`` (s3fs adds a few tries of its own) makes the
    outage surface in seconds, not minutes. Returns the run's ``error`` and progress ``lines``."""
    result = {}
    thread = threading.Thread(target=_run_into, args=(result, cfg))
    thread.start()
    wait_for(lambda: markers(fs, out[5:]) or "error" in result, 240, "the first commit")
    # shards are committed several at a time: from here on none completes, whichever are in flight
    proxy.hold("PUT", "/scores/")
    assert proxy.arrived.wait(timeout=240), result
    proxy.mode = "down"
    proxy.release()
    thread.join(timeout=240)
    return result


def test_a_store_outage_mid_run_stops_with_a_clear_error_and_a_rerun_completes(
        proxy, s3_server, iqa_artifact, ray_local):
    """The store goes away while tables are being stored (after the first commit, every upload of a table
    or marker is held at the proxy, then every connection dropped), in a run over the tars and the image
    files, the grouping and the scores all on that store: the run stops with an error naming the store and
    a shard or virtual shard it could not commit, keeps every committed one, leaves no marker without its
    whole table, and still says why when even its summary cannot be written; the next run, with the store
    back, keeps the grouping and scores exactly the rest."""
    bucket, contents, model = upload(s3_server, iqa_artifact)
    photos = put_photos(s3_server, bucket)
    out, fs = f"{bucket}/scores", s3_server.filesystem()
    cfg = both_config(bucket, model, out, storage={"max_attempts": 1})
    result = run_through_an_outage(proxy, cfg, fs, out)

    error = result["error"]
    assert isinstance(error, StorageError)
    failed = re.match(rf"{re.escape(out)}: cannot commit ((shard|photos)-\d+): ", str(error))
    assert failed and proxy.url in str(error), error
    assert SECRET not in str(error)
    committed = markers(fs, out[5:])
    lines = result["lines"]
    assert any("cannot write the run summary" in line for line in lines)    # said, not raised over the error
    assert any(line.startswith(f"stopped with {len(committed)} of {2 * SHARDS} shards committed") for line in lines)
    assert committed and failed[1] not in committed     # what was committed before the outage is kept
    for name in committed:                              # no marker without its whole table
        marker = json.loads(fs.cat_file(f"{out[5:]}/_markers/{name}.json"))
        assert marker["sha256"] == hashlib.sha256(fs.cat_file(f"{out[5:]}/{name}.parquet")).hexdigest(), name
    assert not fs.exists(f"{out[5:]}/_runs")

    proxy.mode = "ok"
    again = run_score(cfg).to_dict()
    assert again["shards"] == {"planned": 2 * SHARDS, "done": 2 * SHARDS - len(committed), "skipped": len(committed),
                               "failed": 0}
    reconcile(fs, out[5:], contents)
    reconcile_files(fs, out[5:], bucket, photos)


def _run_into(result: dict, cfg: ScoreConfig) -> None:
    """``run_score`` for a thread: its summary or its error, and its progress lines, into ``result``."""
    lines = result.setdefault("lines", [])
    try:
        result["summary"] = run_score(cfg, progress=lines.append).to_dict()
    except Exception as e:
        result["error"] = e


# ------------------------------------------------------------------------------------------ the destination

def _sys_path(tmp_path):
    return "/sys/perceptclip-out"           # sysfs refuses new entries even to root (tests may run as root)


def _under_a_file(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    return str(tmp_path / "a-file" / "scores")


@pytest.mark.parametrize("where, reason", [(_sys_path, "PermissionError"), (_under_a_file, "NotADirectoryError")])
def test_an_unwritable_local_destination_fails_before_any_work(where, reason, proxy, s3_server, iqa_artifact,
                                                              tmp_path):
    from click.testing import CliRunner

    from perceptclip.cli import main

    bucket, _, model = upload(s3_server, iqa_artifact)
    dest = where(tmp_path)
    result = CliRunner().invoke(main, ["score", "--input", f"{bucket}/shards/*.tar", "--output", dest,
                                       "--model", model])
    assert result.exit_code == 1
    assert f"Error: output: cannot write under {dest}: {reason}" in result.output
    assert proxy.log == []                  # not a model fetched, not a shard listed or read


@pytest.mark.parametrize("case", ["write denied", "no such bucket"])
def test_an_unwritable_bucket_fails_before_any_work(case, proxy, s3_server, iqa_artifact):
    bucket, _, model = upload(s3_server, iqa_artifact)
    if case == "write denied":
        proxy.deny = {"/scores/": "PUT"}
        dest, reason = f"{bucket}/scores", "PermissionError"
    else:
        dest, reason = "s3://perceptclip-no-such-bucket/scores", "FileNotFoundError"
    cfg = score_config(bucket, model, dest)
    with pytest.raises(StorageError, match=f"^output: cannot write under {dest}: {reason}") as e:
        run_score(cfg)
    assert SECRET not in str(e.value)
    assert [(m, s) for m, p, s in proxy.log if "/scores/" in p] == [("PUT", 403 if case == "write denied" else 404)]
    assert not any("/shards/" in p or "/models/" in p for _, p, _ in proxy.log)
    assert not s3_server.filesystem().exists("perceptclip-no-such-bucket")    # nor was the bucket created


# ------------------------------------------------------------------------------------------ the driver

# Ray's per-node agents: they may outlive a SIGKILLed driver's cluster for a while, holding nothing that
# a new cluster needs
AGENTS = {"ray::DashboardAgent", "ray::RuntimeEnvAgent"}


def _titles(session: int) -> set[str]:
    """What the processes of a session are (Ray names its processes ``ray::ROLE``)."""
    return {command.split()[0] if command.split() else str(pid) for pid, command in session_pids(session).items()}


# what the command's config file holds; num_cpus only for a driver that starts a cluster of its own
CONFIG_KEYS = ("input", "output", "models", "block_rows", "batch_size", "cpus_per_reader", "reader_memory_mb")


def kill_after_two_commits_then_rerun(proxy, cfg, keys: tuple, hold: str, orphan: str, contents: dict,
                                      unchanged: list[Path] = (), address: str | None = None) -> None:
    """``perceptclip score --config`` (``cfg``'s ``keys``; a local cluster of its own, or the cluster at
    ``address`` through RAY_ADDRESS) SIGKILLed after two commits while the request for ``hold`` waits at the
    proxy; a table for ``orphan`` left without its marker, as if killed between the two writes; then the
    same command again. The rerun must skip exactly what was committed, leave those tables and the
    ``unchanged`` files as they were, and score the rest."""
    import yaml

    out = Path(cfg.output)
    path = out.parent / "score.yaml"
    path.write_text(yaml.safe_dump({k: getattr(cfg, k) for k in keys}))
    cmd = [sys.executable, "-c", "from perceptclip.cli import main; main()", "score", "--config", str(path)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if address:
        env["RAY_ADDRESS"] = address
    proxy.hold("GET", hold)

    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        wait_for(lambda: len(list(out.glob("_markers/*.json"))) >= 2 or first.poll() is not None, 240,
                 "two commits")
        assert first.poll() is None
        first.send_signal(signal.SIGKILL)
        first.wait()
        # Ray's reaper takes the driver's own cluster down with it: the GCS, the raylet and the workers go
        # within seconds, and the rerun starts while the agents still linger (a joined cluster stays up
        # and ends the dead driver's job)
        wait_for(lambda: _titles(first.pid) <= AGENTS, 60, "the killed driver's cluster to stop")
        committed = {p.stem for p in out.glob("_markers/*.json")}
        before = {name: (out / f"{name}.parquet").stat().st_mtime_ns for name in committed}
        kept = {p: p.read_bytes() for p in unchanged}
        (out / f"{orphan}.parquet").write_bytes(b"half-written orphan")

        proxy.release()
        second = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True)
        try:
            stdout, stderr = second.communicate(timeout=300)
        finally:
            kill_session(second)
    finally:
        kill_session(first)
    assert second.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout)
    assert summary["shards"] == {"planned": SHARDS, "done": SHARDS - len(committed), "skipped": len(committed),
                                 "failed": 0}
    assert {Path(o).stem for o in summary["outputs"]} == set(contents) - committed
    assert {name: (out / f"{name}.parquet").stat().st_mtime_ns for name in committed} == before
    assert {p: p.read_bytes() for p in unchanged} == kept


def test_a_killed_driver_then_the_same_command_redoes_only_the_uncommitted_shards(proxy, s3_server, iqa_artifact,
                                                                                   tmp_path):
    """``perceptclip score`` with its own local cluster is SIGKILLed after two commits, while the last
    shard is still being fetched; the same command run again skips what was committed, overwrites an
    orphan table left without a marker, scores the rest, and the outputs of both runs together hold
    every sample once."""
    bucket, contents, _ = upload(s3_server, iqa_artifact)
    out = tmp_path / "scores"
    cfg = score_config(bucket, iqa_artifact, str(out), num_cpus=2)
    kill_after_two_commits_then_rerun(proxy, cfg, CONFIG_KEYS + ("num_cpus",), "/shards/shard-000007.tar", "shard-000007",
                                      contents)
    reconcile(fsspec.filesystem("file"), str(out), contents)


# ------------------------------------------------------------------------------------------ the driver, image files

def test_files_a_killed_driver_then_the_same_command_redoes_only_the_uncommitted_virtual_shards(
        proxy, s3_server, iqa_artifact, ray_local, tmp_path):
    """As for tars, with a driver that joined a running cluster (the session's, through RAY_ADDRESS):
    ``perceptclip score`` over the prefix is SIGKILLed after two commits, while a file of the last virtual
    shard is held; the same command again reads the grouping the first recorded, skips what was
    committed, overwrites the orphan table and scores the rest, image by image once."""
    bucket, contents, _ = upload_files(s3_server, iqa_artifact)
    out = tmp_path / "scores"
    cfg = files_config(bucket, iqa_artifact, str(out))
    # the grouping the first run recorded is the one the rerun reads: its listing is left as it was
    kill_after_two_commits_then_rerun(proxy, cfg, CONFIG_KEYS + ("input_kind", "files_per_shard", "fetch_timeout_s"),
                                      "/photos/007/03.jpg", "photos-000007", contents,
                                      unchanged=[out / "_inputs" / "photos" / "listing-000000.parquet"],
                                      address=ray_local.get_runtime_context().gcs_address)
    reconcile_files(fsspec.filesystem("file"), str(out), bucket, contents)
