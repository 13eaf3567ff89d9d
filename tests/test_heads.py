"""Several tasks, one pass: a model whose heads serve different tasks on one shared LoRA records each
head's task, scores every head from one backbone pass, and gives each head the scores it gives alone
(``MODEL#HEAD``), bit for bit."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from perceptclip.cli import main
from perceptclip.core.tasks import Task
from perceptclip.model.artifact import ArtifactError, ArtifactMeta, load_artifact, read_meta, save_artifact
from perceptclip.model.clip_lora import ClipLoraModel
from perceptclip.model.debug import make_tiny_artifact, tiny_model_config
from perceptclip.model.preprocess import decode_image
from perceptclip.model.reference import ModelSpec, check_columns
from perceptclip.model.scorer import Scorer
from perceptclip.training.evaluate import evaluate
from support.artifacts import as_version_1
from support.images import image_bytes, make_image
from support.scoring import score_here
from support.shards import write_labelled_shard

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "train" / "smoke.yaml"
BRIGHTNESS = Task(name="brightness", kind="regression", description="mean brightness")
TINT = Task(name="tint", kind="classification", labels=("red", "green", "blue"), description="dominant colour")


def two_task_model(seed: int = 0) -> ClipLoraModel:
    """The debug model with a regression head and a three-class head on one LoRA (random weights)."""
    cfg = dataclasses.replace(tiny_model_config(BRIGHTNESS, heads=("light", "colour")), head_sizes={"colour": 3})
    torch.manual_seed(seed)
    model = ClipLoraModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(std=0.05)        # non-zero LoRA, so merging is not trivially exact
    return model.eval()


def save_two_task_artifact(dest: str, seed: int = 0) -> str:
    model = two_task_model(seed)
    meta = ArtifactMeta.for_task(BRIGHTNESS, model.cfg, head_tasks={"light": BRIGHTNESS, "colour": TINT})
    save_artifact(model, meta, dest)
    return dest


@pytest.fixture(scope="module")
def two_task(tmp_path_factory):
    return save_two_task_artifact(str(tmp_path_factory.mktemp("models") / "two-task"), seed=3)


@pytest.fixture(scope="module")
def crops(two_task):
    scorer = Scorer.load(two_task, device="cpu")
    return [scorer.preprocess(decode_image(image_bytes(make_image(i, (40 + i, 36))))) for i in range(21)]


# --- 1. the artifact ----------------------------------------------------------------------------------

def test_the_artifact_records_each_heads_task_once_and_each_head_has_its_tasks_size(two_task):
    config = json.loads(open(f"{two_task}/config.json").read())
    assert "task" not in config and list(config["head_tasks"]) == ["light", "colour"]   # the default: the first
    assert config["head_tasks"]["colour"]["labels"] == ["red", "green", "blue"]
    assert config["model"]["head_sizes"] == {"colour": 3}
    assert config["head_tasks"]["light"]["kind"] == "regression"
    model, meta = load_artifact(two_task)
    assert [model.heads[h][-1].out_features for h in ("light", "colour")] == [1, 3]
    assert meta.task_of("colour") == TINT and meta.task_of("light") == BRIGHTNESS
    assert [(h, name) for h, name, _ in meta.scored_heads()] == [("light", "brightness"), ("colour", "tint")]
    assert [name for _, name, _ in meta.scored_heads("colour", "hue")] == ["hue"]


def test_a_head_whose_size_does_not_fit_its_task_is_refused_naming_the_field():
    model = two_task_model()
    with pytest.raises(ValueError, match="model: head 'colour' has size 3, its task 'brightness' 1"):
        ArtifactMeta.for_task(BRIGHTNESS, model.cfg)                       # no head_tasks: every head brightness
    with pytest.raises(ValueError, match="head_tasks: names the heads"):
        ArtifactMeta.for_task(BRIGHTNESS, model.cfg, head_tasks={"light": BRIGHTNESS})
    with pytest.raises(ValueError, match="head_tasks: the default head's task"):
        ArtifactMeta.for_task(BRIGHTNESS, model.cfg, head_tasks={"light": TINT, "colour": TINT})


def test_an_artifact_written_before_head_tasks_loads_and_scores_the_same(tmp_path, crops):
    """config.json as it was written before heads had tasks (format version 1): no head_tasks, no
    head_outputs, no task_definition."""
    path = make_tiny_artifact(str(tmp_path / "old"), task="emotion", seed=5, heads=("a", "b"))
    before = Scorer.load(path, device="cpu")
    expected = before.score(crops)
    config = as_version_1(json.loads((tmp_path / "old" / "config.json").read_text()))
    del config["task_definition"], config["model"]["head_outputs"]
    assert "head_tasks" not in config
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    meta = read_meta(path)
    assert meta.head_tasks is None and meta.task_of("b").name == "emotion"
    scorer = Scorer.load(path, device="cpu")
    assert scorer.heads == ("a",) and list(scorer.columns(expected))[:2] == ["emotion", "emotion_amusement"]
    assert scorer.score(crops).tobytes() == expected.tobytes()
    assert Scorer.load(f"{path}#b", device="cpu").heads == ("b",)


def test_an_artifact_whose_head_tasks_are_not_tasks_is_refused(tmp_path, two_task):
    config = json.loads(open(f"{two_task}/config.json").read())
    config["head_tasks"]["colour"] = {"name": "tint", "kind": "classification", "labels": ["only"]}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="head_tasks.colour.labels: a classification needs two or more"):
        read_meta(str(tmp_path / "bad"))


# --- 2. scoring ---------------------------------------------------------------------------------------

def count_backbone_calls(scorer: Scorer) -> list[int]:
    calls = []
    scorer.model.visual.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls


def test_one_backbone_pass_per_model_call_whatever_the_number_of_heads(two_task, crops):
    both = Scorer.load(two_task, device="cpu")
    alone = Scorer.load(f"{two_task}#colour", device="cpu")
    calls_both, calls_alone = count_backbone_calls(both), count_backbone_calls(alone)
    both.score(crops)
    alone.score(crops)
    assert both.batch == 8 and calls_both == calls_alone == [8, 8, 8]     # 21 crops, padded to 24


def test_every_heads_columns_in_one_pass_equal_each_head_scored_alone(two_task, crops):
    both = Scorer.load(two_task, device="cpu")
    columns = both.columns(both.score(crops))
    assert list(columns) == ["brightness", "tint", "tint_red", "tint_green", "tint_blue"]
    light = Scorer.load(f"{two_task}#light", device="cpu")
    colour = Scorer.load(f"{two_task}#colour", device="cpu")
    alone = {**light.columns(light.score(crops)), **colour.columns(colour.score(crops))}
    assert list(colour.columns(colour.score(crops[:1]))) == ["tint", "tint_red", "tint_green", "tint_blue"]
    for name, values in columns.items():
        assert np.asarray(values).tobytes() == np.asarray(alone[name]).tobytes(), name
    record = both.record(both.score(crops[:1])[0])
    assert set(record) == {"brightness", "tint", "tint_probs"} and record["tint"] in TINT.labels


def test_a_rename_names_one_head_only(two_task):
    with pytest.raises(ValueError, match="renames one head's columns.*MODEL#HEAD"):
        Scorer.load(f"hue={two_task}", device="cpu")
    with pytest.raises(ValueError, match="NAME=hue renames one head's columns.*MODEL#HEAD"):
        ModelSpec.resolve(f"hue={two_task}")
    assert Scorer.load(f"hue={two_task}#colour", device="cpu").names == ["hue"]
    assert ModelSpec.resolve(f"hue={two_task}#colour").columns == ["hue", "hue_red", "hue_green", "hue_blue"]
    with pytest.raises(ValueError, match="no head 'nose'"):
        Scorer.load(f"{two_task}#nose", device="cpu")


def test_the_job_writes_every_heads_columns_and_each_equals_its_head_alone(two_task, iqa_artifact, tmp_path):
    images = [(f"k{i}", image_bytes(make_image(i, (48, 40))), {}) for i in range(11)]
    shard = write_labelled_shard(tmp_path / "in" / "part-0.tar", images)
    spec = ModelSpec.resolve(two_task)
    assert spec.columns == ["brightness", "tint", "tint_red", "tint_green", "tint_blue"]
    assert [o["name"] for o in spec.describe()["heads"]] == ["brightness", "tint"]
    assert spec.describe()["heads"][1]["labels"] == list(TINT.labels)
    check_columns([spec, ModelSpec.resolve(iqa_artifact)])
    with pytest.raises(ValueError, match="'tint'.*NAME=MODEL#HEAD"):
        check_columns([ModelSpec.resolve(f"tint={iqa_artifact}"), spec])
    score_here([shard], [two_task, iqa_artifact], str(tmp_path / "both"))
    score_here([shard], [f"{two_task}#light", f"{two_task}#colour"], str(tmp_path / "alone"))
    both = pq.read_table(tmp_path / "both" / "part-0.parquet")
    alone = pq.read_table(tmp_path / "alone" / "part-0.parquet")
    for name in spec.columns:
        assert both[name].equals(alone[name]), name
    assert both["tint"].type == "string" and both.num_rows == 11


# --- 3, 4. training a model of two tasks, end to end ------------------------------------------------------

def test_a_config_gives_each_training_set_its_task():
    from perceptclip.core.config import ConfigError
    from perceptclip.training.config import TrainConfig
    from perceptclip.training.train import init_model_config

    smoke = yaml.safe_load(SMOKE.read_text())
    cfg = TrainConfig.from_mapping({**smoke, "task": None, "tasks": {"light": BRIGHTNESS.definition(),
                                                                     "colour": TINT.definition()}})
    assert cfg.head_tasks(("light", "colour")) == {"light": BRIGHTNESS, "colour": TINT}
    model = init_model_config(cfg, ("light", "colour"))
    assert model.head_size("light") == 1 and model.head_size("colour") == 3
    with pytest.raises(ConfigError, match="tasks: training set 'other' has no task"):
        cfg.head_tasks(("light", "other"))
    with pytest.raises(ConfigError, match="tasks: the tasks of one model share one preprocessing"):
        TrainConfig.from_mapping({**smoke, "tasks": {"a": "memorability", "b": "iqa"}})
    with pytest.raises(ConfigError, match="tasks.colour.labels"):
        TrainConfig.from_mapping({**smoke, "tasks": {"colour": {"name": "tint", "kind": "classification"}}})


def labelled(tmp_path, name: str, seeds: range, label) -> str:
    """One shard of generated pictures labelled by ``label(image array)``."""
    samples = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        pixels = np.asarray(make_image(seed, (40, 40)), dtype=np.float64) * rng.uniform(0.25, 1.0)
        tint = seed % 3
        pixels[..., [c for c in range(3) if c != tint]] *= 0.45
        pixels = np.clip(pixels, 0, 255).astype(np.uint8)
        samples.append((f"{seed:04d}", image_bytes(Image.fromarray(pixels), "PNG"), {"label": label(pixels, tint)}))
    return write_labelled_shard(tmp_path / name / "part-0.tar", samples, ext="png")


@pytest.mark.slow
def test_a_model_of_two_tasks_trains_exports_and_scores_both_heads_in_one_pass(ray_local, tmp_path):
    smoke = yaml.safe_load(SMOKE.read_text())
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump({**smoke, "task": None, "epochs": 4, "tasks": {
        "light": BRIGHTNESS.definition(), "colour": TINT.definition()}}))
    light = lambda pixels, tint: round(float(pixels.mean()) / 51, 3)      # noqa: E731
    colour = lambda pixels, tint: TINT.labels[tint]                       # noqa: E731
    shards = {"light": labelled(tmp_path, "light-train", range(0, 90), light),
              "colour": labelled(tmp_path, "colour-train", range(100, 190), colour),
              "light-val": labelled(tmp_path, "light-val", range(200, 230), light),
              "colour-val": labelled(tmp_path, "colour-val", range(300, 330), colour)}
    result = CliRunner().invoke(main, [
        "train", "--config", str(config), "--train", f"light={shards['light']}", "--train",
        f"colour={shards['colour']}", "--val", f"light={shards['light-val']}", "--val",
        f"colour={shards['colour-val']}", "--output", str(tmp_path / "run"), "--in-process"])
    assert result.exit_code == 0, result.output[-3000:]
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "srcc" in history[-1]["val"]["light"] and "accuracy" in history[-1]["val"]["colour"]
    model = str(tmp_path / "run" / "model")
    meta = read_meta(model)
    assert meta.task.name == "brightness" and meta.task_of("colour") == TINT and list(meta.model.heads) == ["light", "colour"]

    metrics = evaluate(f"{model}#colour", shards["colour-val"], resamples=10)
    assert metrics["kind"] == "classification" and "accuracy" in metrics and metrics["head"] == "colour"
    assert "srcc" in evaluate(f"{model}#light", shards["light-val"], resamples=10)

    # one job: the model's two heads in one pass, and each head alone under another name
    result = CliRunner().invoke(main, ["score", "--input", shards["light-val"], "--output", str(tmp_path / "scores"),
                                       "--model", model, "--model", f"b={model}#light", "--model", f"t={model}#colour"])
    assert result.exit_code == 0, result.output[-3000:]
    table = pq.read_table(tmp_path / "scores")
    assert table.num_rows == 30 and set(table["tint"].to_pylist()) <= set(TINT.labels)
    for both, alone in [("brightness", "b"), ("tint", "t")] + [(f"tint_{c}", f"t_{c}") for c in TINT.labels]:
        assert table[both].equals(table[alone]), both


def test_quantiles_filter_and_the_language_see_every_heads_columns(two_task, tmp_path):
    """Each head is one entry of the tables' metadata: quantiles per regression column, class shares per
    classification, and the filter language knows the classification's classes."""
    from perceptclip.curation.filter import run_filter
    from perceptclip.curation.quantiles import class_shares, quantiles, read_scores

    images = [(f"k{i}", image_bytes(make_image(i, (48, 40))), {}) for i in range(12)]
    shard = write_labelled_shard(tmp_path / "in" / "part-0.tar", images)
    score_here([shard], [two_task], str(tmp_path / "scores"))
    scores = read_scores(str(tmp_path / "scores"))
    assert [m["name"] for m in scores.models] == ["brightness", "tint"]
    assert set(quantiles(scores)) == {"brightness", "tint_red", "tint_green", "tint_blue"}
    assert set(class_shares(scores)) == {"tint"}
    with pytest.raises(ValueError, match="purple"):
        run_filter(str(tmp_path / "scores"), 'tint == "purple"', str(tmp_path / "none"), {})
    kept = run_filter(str(tmp_path / "scores"), 'tint != "red" and brightness > -100', str(tmp_path / "kept"), {})
    tints = pq.read_table(tmp_path / "scores" / "part-0.parquet")["tint"].to_pylist()
    assert kept.to_dict()["samples"] == {"seen": 12, "kept": sum(t != "red" for t in tints)}
