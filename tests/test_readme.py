"""Every command of the README's walkthrough, run as written: the released models are swapped for tiny
ones, the paper's training config for the smoke config, and labels.csv is written here. Each command
line is split as the shell splits it and handed to the ``perceptclip`` entry point in this process, in
the walkthrough's folder, on the test session's cluster (a fresh interpreter for each would import torch
and join the cluster again; ``scripts/demo.sh`` runs the installed command in a shell, test_demo.py)."""

import csv
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from perceptclip.cli import main

# the walkthrough runs every command of the README on a Ray cluster
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def walkthrough_commands(heading: str = "## Walkthrough") -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split(heading + "\n", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", "", block)                          # continuation lines
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_the_walkthrough_names_every_command():
    used = {shlex.split(c)[1] for c in walkthrough_commands()}
    assert used == {"score", "quantiles", "filter", "report", "convert", "train", "evaluate"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from perceptclip.model.debug import make_tiny_artifact
    from support.images import image_bytes, make_image

    work = tmp_path_factory.mktemp("readme")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_data.py"), str(work / "demo-output" / "shards")],
                   check=True, capture_output=True)
    images = work / "photos"
    images.mkdir()
    with open(work / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        for i in range(40):
            (images / f"{i:03d}.jpg").write_bytes(image_bytes(make_image(1000 + i, (80, 64))))
            # relative to the manifest: the seeded split hashes these names, so it is the same every run
            writer.writerow([f"photos/{i:03d}.jpg", round(i / 40, 3)])
    models = {name: make_tiny_artifact(str(work / "models" / name), task=name, seed=7)
              for name in ("iqa", "emotion")}
    return work, models


def run_as_written(command: str) -> None:
    """``perceptclip ARGS`` split as the shell splits it, run by the entry point in this process; it must succeed."""
    argv = shlex.split(command)
    assert argv[0] == "perceptclip", command
    result = CliRunner().invoke(main, argv[1:])
    assert result.exit_code == 0, f"{command}\n{result.output[-3000:]}\n{result.exception!r}"


def test_every_walkthrough_command_runs(workdir, ray_local, monkeypatch):
    import yaml

    work, models = workdir
    monkeypatch.chdir(work)
    smoke = yaml.safe_load((ROOT / "configs" / "train" / "smoke.yaml").read_text())
    smoke["epochs"] = 2                                    # the commands must run; learning is tested elsewhere
    smoke["scaling"]["in_process"] = True                  # and Ray Train's wiring too (test_train.py)
    (work / "smoke-2-epochs.yaml").write_text(yaml.safe_dump(smoke))
    for command in walkthrough_commands():
        command = (command.replace("perceptclip-iqa", models["iqa"])
                   .replace("perceptclip-emotion", models["emotion"])
                   .replace("configs/train/iqa.yaml", str(work / "smoke-2-epochs.yaml")))
        run_as_written(command)
    assert len(list((work / "scores").glob("*.parquet"))) == 2
    assert (work / "report.html").stat().st_size > 10_000
    assert (work / "runs" / "iqa-mine" / "model" / "config.json").exists()
    assert list((work / "labelled").glob("val-*.tar")), "the split must hold validation images"
    assert len(list((work / "scores-mine" / "_markers").glob("*.json"))) == 2


def test_your_own_task_runs_as_written(workdir, ray_local, monkeypatch):
    """The README's "Your own task": its config's ViT-L/14 swapped for the debug model, 2 epochs, in process."""
    import pyarrow.parquet as pq
    import yaml

    work, _ = workdir
    monkeypatch.chdir(work)
    custom = yaml.safe_load((ROOT / "configs" / "train" / "custom.yaml").read_text())
    smoke = yaml.safe_load((ROOT / "configs" / "train" / "smoke.yaml").read_text())
    (work / "custom-smoke.yaml").write_text(yaml.safe_dump({**smoke, "task": custom["task"], "epochs": 2,
                                                            "scaling": {**smoke["scaling"], "in_process": True}}))
    commands = walkthrough_commands("### Your own task")
    assert [shlex.split(c)[1] for c in commands] == ["convert", "convert", "train", "score", "quantiles", "filter"]
    for command in commands:
        run_as_written(command.replace("configs/train/custom.yaml", str(work / "custom-smoke.yaml")))
    scores = pq.read_table(work / "scores-warmth")
    assert scores.num_rows == 40 and "warmth" in scores.column_names          # every photo, under its name
    assert "warmth" in json.dumps(json.loads((work / "runs" / "warmth" / "model" / "config.json").read_text()))
