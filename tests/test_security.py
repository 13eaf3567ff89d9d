"""Credentials never leak: a canary secret and session token, in the environment and in the config, run
through scoring and curation on a real S3 server (moto), a missing shard and a model that cannot load
included, and are looked for in everything the runs leave behind."""

import json
import logging
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from perceptclip.cli import main
from perceptclip.core.storage import storage_options
from perceptclip.inputs.shards import write_shard
from perceptclip.scoring.config import load_score_config
from perceptclip.scoring.job import run_score
from support.images import image_bytes, make_image

REPO = Path(__file__).resolve().parents[1]
SECRET = "CANARY-SECRET-4f1d9c2e7b"
TOKEN = "CANARY-TOKEN-8a3b6e0d5c"


def assert_clean(text, where: str) -> None:
    text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
    for canary in (SECRET, TOKEN):
        assert canary not in text, f"{canary} in {where}"


@pytest.fixture
def canary(s3_server, monkeypatch, tmp_path):
    """The S3 environment carrying the canaries, a bucket with one shard (one image corrupt), and a
    config that names the canaries as ``storage.secret`` and ``storage.token``."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    bucket = s3_server.bucket()
    samples = [{"__key__": f"k{i}", "jpg": image_bytes(make_image(i, (40, 32)))} for i in range(3)]
    samples[1]["jpg"] = b"not an image"
    write_shard(f"{bucket}/shards/part-000.tar", samples, storage_options())
    config = tmp_path / "score.yaml"
    config.write_text(yaml.safe_dump({"storage": {"key": "testing", "secret": SECRET, "token": TOKEN}}))
    return {"bucket": bucket, "config": str(config), "fs": s3_server.filesystem()}


def ray_session_logs(ray):
    from ray._private.worker import _global_node

    return Path(_global_node.get_session_dir_path()) / "logs"


@pytest.mark.slow
def test_the_canary_appears_in_no_output_log_table_marker_or_summary(canary, iqa_artifact, ray_local, caplog):
    bucket, fs = canary["bucket"], canary["fs"]
    address = ray_local.get_runtime_context().gcs_address
    # the CLI at its most verbose (-vv: debug logging), as a user runs it, joining the test's cluster
    cmd = [sys.executable, "-c", "from perceptclip.cli import main; main()", "-vv", "score", "--config", canary["config"],
           "--input", f"{bucket}/shards/part-000.tar", "--input", f"{bucket}/shards/missing.tar",
           "--output", f"{bucket}/scores", "--model", iqa_artifact, "--address", address]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=os.environ)
    summary = json.loads(proc.stdout)
    assert proc.returncode == 1 and summary["failed_shards"][0]["reason"] == "missing"
    assert summary["samples"]["errors_by_reason"] == {"not_an_image": 1}
    assert " DEBUG " in proc.stderr                                    # debug logging was really on
    assert summary["storage"]["s3"]["secret"] == "***" and summary["storage"]["s3"]["token"] == "***"
    assert_clean(proc.stdout, "stdout")
    assert_clean(proc.stderr, "stderr")

    # curation, through the CLI in this process, logs captured at debug
    caplog.set_level(logging.DEBUG)
    result = CliRunner().invoke(main, ["-vv", "filter", "--scores", f"{bucket}/scores", "--where", "iqa > -1000",
                                       "--output", f"{bucket}/curated"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["samples"] == {"seen": 3, "kept": 2}
    assert_clean(result.output, "filter output")

    written = fs.find(f"{bucket[5:]}/scores") + fs.find(f"{bucket[5:]}/curated")
    assert {p.rsplit("/", 2)[-2] for p in written} >= {"scores", "_markers", "_runs", "curated"}
    for path in written:
        assert_clean(fs.cat_file(path), path)
        if path.endswith(".parquet"):
            with fs.open(path, "rb") as f:
                metadata = pq.read_schema(f).metadata
            assert_clean(b"".join(k + v for k, v in metadata.items()), f"{path} key-value metadata")
    for log in ray_session_logs(ray_local).rglob("*"):
        if log.is_file():
            assert_clean(log.read_bytes(), str(log))
    assert_clean(caplog.text, "logs")


@pytest.mark.slow
def test_the_canary_appears_in_no_exception_when_the_model_cannot_load(canary, iqa_artifact, ray_local, caplog,
                                                                          tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(iqa_artifact, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + b"\0" * 64)     # config.json still reads fine
    bucket = canary["bucket"]
    cfg = load_score_config(canary["config"], input=[f"{bucket}/shards/part-000.tar"], output=f"{bucket}/broken",
                            models=[str(broken)])
    # the library's own logs at debug; botocore's debug log prints every signed request (session token
    # included), so it stays at INFO, as the CLI keeps it
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.INFO, logger="botocore")
    with pytest.raises(Exception, match="sha256") as err:
        run_score(cfg)
    assert_clean("".join(traceback.format_exception(err.value)), "the exception")
    assert_clean(caplog.text, "logs")
    (run,) = canary["fs"].find(f"{bucket[5:]}/broken/_runs")
    summary = canary["fs"].cat_file(run)
    assert b"sha256" in json.loads(summary)["aborted"].encode()
    assert_clean(summary, "the summary")


def test_a_storage_config_never_shows_its_secret_in_a_repr():
    from perceptclip.core.storage import StorageConfig

    cfg = StorageConfig(key="AKIDEXAMPLE", secret="canary-secret-in-a-repr", token="canary-token-in-a-repr")
    assert "canary" not in repr(cfg) and "canary" not in str(cfg)
    assert cfg.secret == "canary-secret-in-a-repr"
