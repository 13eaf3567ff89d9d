"""The scoring job on a cluster of several nodes, on this machine (``ray.cluster_utils.Cluster``): a head
without GPUs and two worker nodes that declare one GPU each (the models then run on this machine's
CPU). The job needs no setting of its own there: one model actor per GPU, hence one per GPU node; the
decode tasks spread over the nodes; and the tables are those the job's steps give in one process
(``support.scoring.score_here``), row for row."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from perceptclip.inputs.shards import write_shard
from perceptclip.scoring.config import ScoreConfig
from support.images import image_bytes, make_image
from support.processes import kill_session, reported, session_pids
from support.scoring import score_here
from support.waiting import wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SHARDS, PER_SHARD, GPU_NODES = 6, 4, 2

# The cluster's driver runs in a process of its own: the test process may hold the shared local cluster
# (ray_local), and a second ray.init beside it will not work. The head has no CPUs (nothing runs beside
# the driver); each worker node has 2 CPUs and declares 1 GPU, so its model actor (1 GPU, 1 CPU: the
# job's defaults) leaves it a CPU for a decode task. After the run the driver asks the cluster's GCS
# where the model actors and the decode tasks ran and reports one line "outcome {...}" (Ray may print
# lines of its own). ``ray.util.state`` would ask the dashboard, which ``ray[data]`` does not install:
# the GCS's actor table and task events (``ray._private.state``, Ray 2.60) hold the same node ids.
# It runs in the repository.
CLUSTER_RUN = r"""
import json, sys, time
import ray
from ray._private.state import actors, state
from ray.core.generated.common_pb2 import TaskStatus
from ray.cluster_utils import Cluster
from perceptclip.scoring.config import ScoreConfig
from perceptclip.scoring.job import run_score
sys.path.insert(0, "tests")
from support.processes import report

fields, gpu_nodes, shards = json.loads(sys.argv[1])
cfg = ScoreConfig(**fields)
small = {"object_store_memory": 100 * 2**20}

def decode_tasks():
    events = [e for e in state._get_all_task_events() if e.task_info.name.endswith("(read_and_decode)")]
    return [{"node": e.state_updates.node_id.hex(),
             "finished": TaskStatus.Value("FINISHED") in e.state_updates.state_ts_ns} for e in events]

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, **small})
try:        # shutdown also removes the address file the Cluster wrote for plain ray.init() to find
    nodes = [cluster.add_node(num_cpus=2, num_gpus=1, wait=False, **small) for _ in range(gpu_nodes)]
    cluster.wait_for_nodes()
    cfg.address = cluster.address
    summary = run_score(cfg).to_dict()
    ray.init(address=cluster.address, logging_level="WARNING")
    deadline = time.monotonic() + 30     # task events reach the GCS a second or so after the tasks end
    while sum(t["finished"] for t in decode_tasks()) < shards and time.monotonic() < deadline:
        time.sleep(0.5)
    report("outcome", {
        "summary": summary, "gpu_nodes": [n.node_id for n in nodes],
        "actors": [{"class": a["ActorClassName"], "node": a["Address"]["NodeID"], "restarts": a["NumRestarts"]}
                   for a in actors().values()],
        "tasks": decode_tasks(),
    })
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, list[dict]]:
    """Six small shards; one holds a sample that is not an image (an error row both runs must agree on)."""
    root = tmp_path_factory.mktemp("cluster-shards")
    contents = {}
    for s in range(SHARDS):
        contents[f"shard-{s:06d}"] = [
            {"__key__": f"{s:03d}{i:03d}", "jpg": image_bytes(make_image(100 * s + i, (64 + 8 * i, 48)))}
            for i in range(PER_SHARD)]
    contents["shard-000002"][1]["jpg"] = b"\xff\xd8\xff\xe0 not really a JPEG"
    for name, samples in contents.items():
        write_shard(str(root / f"{name}.tar"), samples)
    return {"root": root, "contents": contents}


def config(shards: dict, models: list[str], output: Path) -> ScoreConfig:
    # reader_memory_mb: the test's shards are a few KB; the default (1 GiB a task) is for real shards
    return ScoreConfig(input=[str(shards["root"] / "shard-*.tar")], output=str(output), models=models,
                       block_rows=2, batch_size=2, reader_memory_mb=256)


def test_gpu_nodes_one_model_actor_each_and_the_tables_of_the_jobs_steps_in_one_process(
        shards, iqa_artifact, emotion_artifact, tmp_path):
    models = [iqa_artifact, emotion_artifact]
    cfg = config(shards, models, tmp_path / "cluster")
    fields = {k: getattr(cfg, k) for k in ("input", "output", "models", "block_rows", "batch_size",
                                           "reader_memory_mb")}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    stdout, stderr = tmp_path / "driver.out", tmp_path / "driver.err"
    with open(stdout, "w") as out_file, open(stderr, "w") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", CLUSTER_RUN, json.dumps([fields, GPU_NODES, SHARDS])],
            cwd=REPO, env=env, stdout=out_file, stderr=err_file, start_new_session=True)
    try:
        proc.wait(timeout=240)
        # the Cluster's shutdown ends its nodes; what it started and left running would still be in the session
        wait_for(lambda: not session_pids(proc.pid), 20, "the cluster's processes to exit", every=0.5)
    finally:
        kill_session(proc)
    outcome = reported(stdout.read_text(), "outcome")
    assert outcome, stderr.read_text()[-3000:]
    assert outcome["summary"]["shards"] == {"planned": SHARDS, "done": SHARDS, "skipped": 0, "failed": 0}

    # one model actor per GPU node, started once (none restarted or replaced), none on the head
    model_actors = [a for a in outcome["actors"] if a["class"] == "MapWorker(MapBatches(ModelActor))"]
    assert sorted(a["node"] for a in model_actors) == sorted(outcome["gpu_nodes"]), outcome["actors"]
    assert all(a["restarts"] == 0 for a in model_actors), outcome["actors"]
    # every shard read and decoded by one task, on more than one node, none on the head (it has no CPUs)
    tasks = [t for t in outcome["tasks"] if t["finished"]]
    assert len(tasks) == SHARDS, outcome["tasks"]
    decode_nodes = {t["node"] for t in tasks}
    assert len(decode_nodes) > 1 and decode_nodes <= set(outcome["gpu_nodes"]), outcome["tasks"]

    # the job's own steps in this process, without Ray (as one model actor on one node): the same tables
    results = score_here([str(shards["root"] / "shard-*.tar")], models, str(tmp_path / "local"), block_rows=2)
    assert len(results) == SHARDS and sum(r.ok for r in results) == SHARDS * PER_SHARD - 1
    for name in shards["contents"]:
        cluster_rows = pq.read_table(tmp_path / "cluster" / f"{name}.parquet").to_pylist()
        local_rows = pq.read_table(tmp_path / "local" / f"{name}.parquet").to_pylist()
        assert len(cluster_rows) == len(local_rows) == PER_SHARD
        for got, want in zip(cluster_rows, local_rows):
            assert set(got) == set(want)
            for column, value in want.items():
                if isinstance(value, float):
                    assert got[column] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, want["key"], column)
                else:
                    assert got[column] == value, (name, want["key"], column)
    errors = [r for name in shards["contents"]
              for r in pq.read_table(tmp_path / "local" / f"{name}.parquet").to_pylist() if r["status"] == "error"]
    assert [r["key"] for r in errors] == ["002001"]
