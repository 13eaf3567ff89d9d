"""The cluster job specs in jobs/: they parse, carry the settings a scheduled GPU job needs, and run
valid ``perceptclip`` commands whose config loads."""

import re
import shlex
from pathlib import Path

import click
import pytest
import yaml

from perceptclip.cli import main
from perceptclip.scoring.config import load_score_config

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
IMAGE_ROOT = "/opt/perceptclip/"      # the Dockerfile's WORKDIR: configs/ is copied there


def documents(name):
    return list(yaml.safe_load_all((JOBS / name).read_text()))


def check_perceptclip_command(argv: list[str]) -> click.Context:
    """Parse ``argv`` exactly as the installed ``perceptclip`` would, without running it, and load
    the score config it names (mapped from the image's path to the repository's)."""
    assert argv[0] == "perceptclip", argv
    name, *rest = argv[1:]
    command = main.get_command(click.Context(main, info_name="perceptclip"), name)
    assert command is not None, f"perceptclip has no command {name!r}"
    # files the image holds under its WORKDIR are read from the repository that is copied there
    rest = [str(REPO / word[len(IMAGE_ROOT):]) if word.startswith(IMAGE_ROOT) else word for word in rest]
    sub = command.make_context(name, rest, parent=click.Context(main, info_name="perceptclip"))
    if name == "score":
        load_score_config(sub.params["config_path"], input=list(sub.params["inputs"]) or None,
                          output=sub.params["output"], models=list(sub.params["models"]) or None)
    return sub


def containers(pod_template):
    return pod_template["spec"]["containers"]


def dockerfile_workdir():
    return re.search(r"^WORKDIR\s+(\S+)", (REPO / "Dockerfile").read_text(), re.M).group(1)


def test_the_image_layout_matches_the_dockerfile():
    assert dockerfile_workdir().rstrip("/") + "/" == IMAGE_ROOT
    assert "COPY configs/ configs/" in (REPO / "Dockerfile").read_text()


def test_rayjob_scores_on_gpu_workers_and_cleans_up():
    (job,) = documents("score-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    cluster = spec["rayClusterSpec"]
    head = containers(cluster["headGroupSpec"]["template"])[0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    (gpu,) = cluster["workerGroupSpecs"]
    worker = containers(gpu["template"])[0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    images = {head["image"], worker["image"]}
    assert len(images) == 1 and images.pop().endswith("/perceptclip:0.1.0")
    sub = check_perceptclip_command(shlex.split(spec["entrypoint"]))
    assert sub.info_name == "score"
    assert sub.params["inputs"] == ("s3://example-bucket/shards/shard-{000000..000999}.tar",)  # not shell-expanded
    assert len(sub.params["models"]) == 3


def test_nightly_cronjob_submits_an_incremental_run():
    cluster, cron = documents("score-nightly.yaml")
    assert cluster["kind"] == "RayCluster" and cron["kind"] == "CronJob"
    assert cluster["spec"]["workerGroupSpecs"][0]["minReplicas"] == 0          # GPUs only while it runs
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(cron["spec"]["schedule"].split()) == 5
    (container,) = containers(cron["spec"]["jobTemplate"]["spec"]["template"])
    command = container["command"]
    assert command[:3] == ["ray", "job", "submit"]
    address = command[command.index("--address") + 1]
    assert address == f"http://{cluster['metadata']['name']}-head-svc:8265"     # KubeRay's head service name
    # ray job submit runs the words after "--" through a shell
    sub = check_perceptclip_command(shlex.split(" ".join(command[command.index("--") + 1:])))
    assert sub.info_name == "score" and sub.params["overwrite"] is None        # incremental: never --overwrite
    assert sub.params["inputs"] == ("s3://example-bucket/shards/*.tar",)


def test_submit_example_is_a_valid_command():
    text = (JOBS / "submit.sh").read_text()
    joined = text.replace("\\\n", " ")
    line = next(line for line in joined.splitlines() if line.lstrip().startswith("ray job submit"))
    words = shlex.split(line)
    sub = check_perceptclip_command(words[words.index("--") + 1:])
    assert sub.info_name == "score" and sub.params["output"] == "s3://example-bucket/scores"


def walk(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


@pytest.mark.parametrize("name", ["score-rayjob.yaml", "score-nightly.yaml"])
def test_credentials_come_from_secrets_not_specs(name):
    env = [d for doc in documents(name) for d in walk(doc) if "name" in d and ("value" in d or "valueFrom" in d)]
    secret_like = [e for e in env if re.search(r"SECRET|ACCESS_KEY|TOKEN|PASSWORD", e["name"])]
    assert all("value" not in e for e in secret_like)
    refs = [d["secretRef"]["name"] for doc in documents(name) for d in walk(doc) if "secretRef" in d]
    assert refs and set(refs) == {"perceptclip-s3"}


def test_submit_example_holds_no_credentials():
    code = [line for line in (JOBS / "submit.sh").read_text().splitlines() if not line.lstrip().startswith("#")]
    assert not any(re.search(r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)", line) for line in code)


def test_an_invalid_command_is_caught():
    with pytest.raises(click.UsageError):
        check_perceptclip_command(["perceptclip", "score", "--modle", "x"])
    with pytest.raises(ValueError, match="models"):
        check_perceptclip_command(["perceptclip", "score", "--input", "a.tar", "--output", "o"])
