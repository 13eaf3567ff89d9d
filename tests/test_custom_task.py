"""Your own perceptual task, end to end, as a user runs it: a manifest of labels -> ``convert manifest
--task`` -> ``train`` with the task defined in the config -> ``evaluate`` on held-out images -> ``score``
-> ``quantiles`` and ``filter`` on the task's own column. A regression whose label the picture shows (its
brightness) and a three-class task (its tint) both learn with the smoke config."""

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from perceptclip.cli import main
from perceptclip.core.tasks import load_task
from support.images import image_bytes, make_image

REPO = Path(__file__).resolve().parents[1]
TINTS = ("red", "green", "blue")
TASKS = {
    "brightness": {"name": "brightness", "kind": "regression", "description": "how bright the picture is"},
    "tint": {"name": "tint", "kind": "classification", "labels": list(TINTS), "description": "its dominant hue"},
}


def picture(seed: int) -> tuple[Image.Image, float, str]:
    """A generated picture scaled to a brightness and tinted towards one channel: (image, brightness, tint)."""
    rng = np.random.default_rng(seed)
    level, tint = float(rng.uniform(0.25, 1.0)), TINTS[seed % 3]
    pixels = np.asarray(make_image(seed, (48, 48)), dtype=np.float64) * level
    pixels[..., [c for c in range(3) if c != TINTS.index(tint)]] *= 0.45
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), round(5 * level, 3), tint


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """300 pictures and, for each task, a manifest of their labels (relative paths, as a user writes them)."""
    root = tmp_path_factory.mktemp("own-task")
    (root / "photos").mkdir()
    labels = {}
    for seed in range(300):
        img, level, tint = picture(seed)
        (root / "photos" / f"{seed:03d}.png").write_bytes(image_bytes(img, "PNG"))
        labels[f"photos/{seed:03d}.png"] = {"brightness": level, "tint": tint}
    for task in TASKS:
        with open(root / f"{task}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label"])
            writer.writerows([path, value[task]] for path, value in labels.items())
    return root


def run(*args: str) -> dict:
    """A command as a user runs it; its JSON summary (the last line of its output), if it prints one."""
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, f"{args}\n{result.output[-3000:]}"
    last = (result.stdout.strip().splitlines() or [""])[-1]
    return json.loads(last) if last.startswith("{") else {}


@pytest.mark.slow
@pytest.mark.parametrize("task, bound", [("brightness", ("srcc", 0.6)), ("tint", ("accuracy", 1 / 3 + 0.2))])
def test_a_task_of_your_own_learns_and_scores_under_its_name(photos, task, bound, ray_local, tmp_path):
    smoke = yaml.safe_load((REPO / "configs" / "train" / "smoke.yaml").read_text())
    config = tmp_path / f"{task}.yaml"
    config.write_text(yaml.safe_dump({**smoke, "task": TASKS[task], "epochs": 10}))
    assert load_task(str(config)).name == task

    shards = {}
    for split in ("train", "val", "test"):
        shards[split] = str(tmp_path / "shards" / split)
        report = run("convert", "manifest", str(photos / f"{task}.csv"), "--task", str(config), "--split", split,
                     "--fractions", "train=0.6,val=0.2,test=0.2", "--output", shards[split])
        assert report["written"] > 40 and not report["problems"], report

    run("train", "--config", str(config), "--train", shards["train"], "--val", shards["val"],
        "--output", str(tmp_path / "run"), "--in-process")
    model = str(tmp_path / "run" / "model")
    written = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert written["task"]["name"] == task and written["task"]["kind"] == TASKS[task]["kind"]

    metrics = run("evaluate", "--model", model, "--data", shards["test"], "--bootstrap", "50")
    metric, least = bound
    assert metrics[metric] >= least, metrics

    run("score", "--input", shards["test"], "--output", str(tmp_path / "scores"), "--model", model)
    table = pq.read_table(tmp_path / "scores")
    assert task in table.column_names and table.num_rows == metrics["n"]
    if task == "tint":
        assert {f"tint_{c}" for c in TINTS} <= set(table.column_names)
        assert set(table["tint"].to_pylist()) <= set(TINTS)
    quantiles = CliRunner().invoke(main, ["quantiles", "--scores", str(tmp_path / "scores")])
    assert quantiles.exit_code == 0 and task in quantiles.output, quantiles.output


def test_convert_checks_each_label_against_the_task(photos, tmp_path):
    """A label that does not fit the task is a problem with its file and line; the rest are written."""
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label\n"
                        f"{photos}/photos/000.png,red\n"
                        f"{photos}/photos/001.png,purple\n"
                        f"{photos}/photos/002.png,2.5\n"
                        f"{photos}/photos/003.png,blue\n")
    tint = tmp_path / "tint.yaml"
    tint.write_text(yaml.safe_dump(TASKS["tint"]))
    result = CliRunner().invoke(main, ["convert", "manifest", str(manifest), "--task", str(tint),
                                       "--output", str(tmp_path / "shards")])
    assert result.exit_code == 0, result.output
    assert f"{manifest}:3: label 'purple' is not a class of tint: red, green, blue" in result.output
    assert f"{manifest}:4: label 2.5 is not a class name: tint's classes are red, green, blue" in result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["written"] == 2

    result = CliRunner().invoke(main, ["convert", "manifest", str(manifest), "--task", "memorability",
                                       "--output", str(tmp_path / "scores-shards")])
    assert "label 'red' is not a number: memorability is a regression" in result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["written"] == 1

    result = CliRunner().invoke(main, ["convert", "manifest", str(manifest), "--task", "quality",
                                       "--output", str(tmp_path / "none")])
    assert result.exit_code != 0 and "--task: unknown task 'quality'" in result.output
