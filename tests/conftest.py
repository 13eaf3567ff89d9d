import os

import pytest

# Tests never touch the network: the Hugging Face hub is offline for every test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch.compile builds its kernels in this process: a pool of compile workers started for one test
# costs more than it saves on two cores shared with the other test worker
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    # the quick tier (-m "not slow") starts no Ray cluster: a test that needs one says it is slow
    unmarked = [item.nodeid for item in items if "ray_local" in item.fixturenames and "slow" not in item.keywords]
    if unmarked:
        raise pytest.UsageError("tests on the local Ray cluster must be marked slow: " + ", ".join(unmarked))
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; run on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # artifacts fetched from object storage and converted releases go to a per-session cache
    monkeypatch.setenv("PERCEPTCLIP_CACHE", str(tmp_path_factory.getbasetemp() / "perceptclip-cache"))


@pytest.fixture(scope="session")
def iqa_artifact(tmp_path_factory):
    from perceptclip.model.debug import make_tiny_artifact

    return make_tiny_artifact(str(tmp_path_factory.mktemp("models") / "iqa"), task="iqa", seed=1)


@pytest.fixture(scope="session")
def emotion_artifact(tmp_path_factory):
    from perceptclip.model.debug import make_tiny_artifact

    return make_tiny_artifact(str(tmp_path_factory.mktemp("models") / "emotion"), task="emotion", seed=2)


@pytest.fixture(scope="session")
def memorability_artifact(tmp_path_factory):
    from perceptclip.model.debug import make_tiny_artifact

    return make_tiny_artifact(str(tmp_path_factory.mktemp("models") / "memorability"), task="memorability", seed=3)


@pytest.fixture(scope="session")
def _moto_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)   # port 0: a free port
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


class S3Server:
    """A real S3 API (moto) on loopback. ``bucket()`` makes a fresh, empty bucket: tests never share one."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key="testing", secret="testing-secret")

    def bucket(self) -> str:
        import uuid

        name = f"test-{uuid.uuid4().hex[:12]}"
        self.filesystem().mkdir(name)
        return f"s3://{name}"


@pytest.fixture
def s3_server(_moto_server, monkeypatch):
    """The moto S3 server, with the standard AWS environment pointing at it (fake credentials)."""
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", _moto_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", _moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()     # cached clients would keep an older endpoint
    yield S3Server(_moto_server)
    s3fs.S3FileSystem.clear_instance_cache()


TRAIN_POLL_S = "0.5"


@pytest.fixture(autouse=True)
def quick_ray_train(monkeypatch):
    """Ray Train set for a local test cluster: it polls its workers more often and watches for no preemption.

    - Its controller learns of a reported checkpoint, and of a finished or failed worker, when it polls
      the workers: every 2 s by default. Polling more often ends each training run sooner (every test
      that trains, in this process or in a command it runs), and lets a test kill a worker soon after a
      checkpoint is registered, well inside the next epoch.
    - Each worker group also gets a preemption watcher, an actor that asks the cluster whether a node is
      being drained (spot instances): a process of its own, about 2 s of CPU, for a local cluster whose
      nodes are never drained.

    Ray Train hands the driver's values to its controller and workers when a run starts."""
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_S)
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="session")
def smoke_training(tmp_path_factory):
    """``perceptclip train`` as a user runs it: a process of its own that starts its own local Ray cluster,
    the smoke config for 2 epochs, 40 training and 20 validation samples (labels 0 to 4). One run for the
    whole session, however many pytest-xdist workers share it (the first to ask runs it, under a file
    lock): the console test reads what it printed, the rerun test trains again over (a copy of) its output.
    Returns the finished process, the config file, the shards and the output folder."""
    import fcntl
    import json
    import subprocess

    # under pytest-xdist each worker's base folder is one of its session's: their parent is shared
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    root = shared / "smoke-training"
    with open(shared / "smoke-training.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done.json").exists():
            _train_smoke(root)
    done = json.loads((root / "done.json").read_text())
    proc = subprocess.CompletedProcess(done["args"], done["returncode"], done["stdout"], done["stderr"])
    return {"proc": proc, "config": root / "smoke.yaml", "train": done["train"], "val": done["val"],
            "output": root / "run"}


def _train_smoke(root) -> None:
    """The session's smoke training into ``root``; what the process did and printed into ``root/done.json``."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from support.images import image_bytes, make_image
    from support.processes import ray_tmpdir_left_by_a_dead_cluster
    from support.shards import write_labelled_shard

    if root.exists():
        shutil.rmtree(root)             # a worker that died half way: start again
    root.mkdir(parents=True)
    repo = Path(__file__).resolve().parents[1]

    def shard(name: str, seeds: range) -> str:
        return write_labelled_shard(root / f"{name}.tar", [
            (f"k{i}", image_bytes(make_image(i, (40, 40)), "PNG"), {"label": float(i % 5)}) for i in seeds],
            ext="png")

    config = root / "smoke.yaml"
    config.write_text((repo / "configs/train/smoke.yaml").read_text().replace("epochs: 15", "epochs: 2"))
    train, val = shard("train", range(40)), shard("val", range(100, 120))
    # a session fixture is set up before the tests' own fixtures: quick_ray_train's settings are made here too.
    # Ray's folder holds a dead cluster's address file: the run starts a cluster of its own all the same
    ray_tmp = ray_tmpdir_left_by_a_dead_cluster()
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": TRAIN_POLL_S,
           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TMPDIR": ray_tmp}
    args = [sys.executable, "-c", "from perceptclip.cli import main; main()", "train", "--config", str(config),
            "--train", train, "--val", val, "--output", str(root / "run")]
    try:
        proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    (root / "done.json").write_text(json.dumps({"args": args, "returncode": proc.returncode, "stdout": proc.stdout,
                                                "stderr": proc.stderr, "train": train, "val": val}))


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray cluster shared by every test that needs one (starting one costs seconds)."""
    import ray

    if not ray.is_initialized():
        # address="local": always a cluster of its own, never one another process left registered in
        # /tmp/ray (a `ray start`, a ray.cluster_utils.Cluster, another test session on this machine)
        # num_workers_soft_limit: Ray keeps as many idle worker processes as the node has CPUs, 2 here,
        # so every data task of every training epoch would start (and import torch in) a fresh process:
        # 10-20 s an epoch instead of 1. A setting of this cluster's, whichever test starts it.
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False,
                 _system_config={"num_workers_soft_limit": 16})
    yield ray
    ray.shutdown()
