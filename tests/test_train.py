"""Fine-tuning: config validation, losses and rows as plain code; then real Ray Train runs of a tiny
model on a synthetic perceptual task (the label is a known amount of noise added to the image)."""

import json
import os
import signal
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from perceptclip.cli import main
from perceptclip.core.metrics import srcc
from perceptclip.inputs.shards import write_shard
from perceptclip.model.preprocess import PreprocessConfig
from perceptclip.training.augment import AugmentConfig, random_crop
from perceptclip.training.config import TrainConfig, parse_datasets
from perceptclip.training.data import shard_rows
from perceptclip.training.losses import plcc_loss, task_loss
from perceptclip.training.train import train
from support.images import image_bytes, make_image
from support.processes import raylet_pid, worker_pids
from support.shards import write_labelled_shard
from support.waiting import wait_for

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "train" / "smoke.yaml"


# ---------------------------------------------------------------------------------------------- data

def noise_level(seed: int) -> float:
    return float(np.random.default_rng(seed).uniform(0, 60))


def noisy_image(seed: int, size=(48, 48)) -> Image.Image:
    """A generated image with Gaussian noise of a known strength: the distortion the model must judge."""
    img = np.asarray(make_image(seed, size), dtype=np.float64)
    noise = np.random.default_rng(seed + 10_000).normal(0, noise_level(seed), img.shape)
    return Image.fromarray(np.clip(img + noise, 0, 255).astype(np.uint8))


def quality(seed: int) -> float:
    return 5 - noise_level(seed) / 15          # a MOS-like label: less noise, better quality


def write_shards(prefix: Path, seeds, per_shard: int = 40, label=quality) -> list[str]:
    return [write_labelled_shard(f"{prefix}-{start // per_shard:06d}.tar",
                                 [(f"s{seed:05d}", image_bytes(noisy_image(seed), "PNG"), {"label": label(seed)})
                                  for seed in seeds[start:start + per_shard]], ext="png")
            for start in range(0, len(seeds), per_shard)]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return {
        "train": write_shards(root / "train", list(range(400))),
        "val": write_shards(root / "val", list(range(1000, 1080))),
        "test": write_shards(root / "test", list(range(2000, 2060)), per_shard=30),
    }


@pytest.fixture(scope="module")
def few_shards(tmp_path_factory):
    """Three training shards and two validation shards of two samples each, for the checks made before any
    sample is read: they see shard lists, not samples."""
    root = tmp_path_factory.mktemp("few")
    return {"train": write_shards(root / "train", list(range(6)), per_shard=2),
            "val": write_shards(root / "val", list(range(1000, 1004)), per_shard=2)}


def spec(paths: list[str]) -> str:
    return ",".join(paths) if len(paths) == 1 else paths[0].rsplit("-", 1)[0] + f"-{{{0:06d}..{len(paths) - 1:06d}}}.tar"


# ---------------------------------------------------------------------------------------------- config

def test_paper_configs_hold_the_papers_recipe():
    for task, lr in (("iqa", 5e-5), ("memorability", 5e-5), ("emotion", 1e-4)):
        cfg = TrainConfig.load(str(REPO / "configs" / "train" / f"{task}.yaml"))
        assert cfg.task.name == task and cfg.lr == lr and cfg.batch_size == 32
        assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.dropout) == (16, 8.0, 0.1)
        assert cfg.model.backbone == "ViT-L-14-quickgelu" and cfg.model.pretrained == "openai"
        assert cfg.model.head_hidden == [512, 256] and cfg.precision == "auto"
    assert TrainConfig(task="emotion").lr == 1e-4      # the task's rate when the config names none


def test_the_rayjobs_training_config_is_valid_and_uses_its_gpus():
    import yaml

    docs = list(yaml.safe_load_all((REPO / "jobs" / "train-rayjob.yaml").read_text()))
    cfg = TrainConfig.from_mapping(yaml.safe_load(docs[0]["data"]["train.yaml"]))
    workers = docs[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers == workers["replicas"]
    assert "perceptclip train --config /etc/perceptclip/train.yaml" in docs[1]["spec"]["entrypoint"]


@pytest.mark.parametrize("raw, message", [
    ({"task": "iqa", "epochs": 0}, "epochs: must be an integer >= 1, got 0"),
    ({"task": "iqa", "model": {"lora": {"r": "sixteen"}}}, "model.lora.r: must be an integer, got 'sixteen'"),
    ({"task": "iqa", "model": {"lora": {"r": 0}}}, "model.lora.r: must be an integer >= 1, got 0"),
    ({"task": "iqa", "model": {"head_dropout": 1}}, "model.head_dropout: must be a number < 1, got 1.0"),
    ({"task": "iqa", "scaling": {"gpus": 2}},
     "scaling.gpus: unknown option; known: cpus_per_worker, in_process, num_workers, use_gpu"),
    ({"task": "iqa", "scaling": {"num_workers": 2, "in_process": True}},
     "scaling.in_process: trains in this process, one worker: set scaling.num_workers: 1 (got 2)"),
    ({"task": "iqa", "scaling": {"num_workers": 0}}, "scaling.num_workers: must be an integer >= 1, got 0"),
    ({"task": "iqa", "precision": "fp8"}, "precision: must be one of auto, bf16, fp32, got 'fp8'"),
    ({"task": "iqa", "learning_rate": "fast"}, "learning_rate: must be a number or null, got 'fast'"),
    ({"task": "iqa", "batch_size": 30, "scaling": {"num_workers": 4}},
     "batch_size: must be a multiple of scaling.num_workers (4), got 30"),
    ({"task": "colour"}, "task: unknown task 'colour'; built-in tasks: emotion, iqa, memorability, or define one "
                         "(name, kind, labels, ...)"),
    ({"task": {"name": "colour", "kind": "classification", "labels": ["red"]}},
     "task.labels: a classification needs two or more classes, got ['red']"),
])
def test_a_bad_config_value_fails_at_start_naming_the_field_and_the_value(raw, message, tmp_path):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError) as info:
        TrainConfig.load(str(path))
    assert str(info.value) == f"{path}: {message}"


def test_dataset_arguments_name_the_heads():
    assert parse_datasets(["s3://b/x-{0..3}.tar"], "--train") == {"default": "s3://b/x-{0..3}.tar"}
    assert parse_datasets(["koniq=a.tar", "spaq=b.tar"], "--train") == {"koniq": "a.tar", "spaq": "b.tar"}
    with pytest.raises(ValueError, match="two sets are named"):
        parse_datasets(["a.tar", "b.tar"], "--train")


def test_a_run_in_this_process_that_asks_for_a_gpu_or_a_cluster_fails_before_writing(few_shards, tmp_path,
                                                                                      monkeypatch):
    """--in-process with a config that wants a GPU this process does not see, or with --address: a clear
    error naming the setting, and the output is not even made."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dest = tmp_path / "run"
    sets = ["--train", few_shards["train"][0], "--val", few_shards["val"][0], "--output", str(dest), "--in-process"]
    gpu = smoke_config(tmp_path, scaling={"num_workers": 1, "use_gpu": True, "cpus_per_worker": 1})
    result = CliRunner().invoke(main, ["train", "--config", str(gpu), *sets])
    assert result.exit_code != 0 and "scaling.use_gpu: this process sees no GPU" in result.output, result.output
    result = CliRunner().invoke(main, ["train", "--config", str(SMOKE), *sets, "--address", "10.0.0.1:6379"])
    assert result.exit_code != 0 and "joins no Ray cluster" in result.output, result.output
    assert not dest.exists()


def test_a_local_machine_that_cannot_place_the_workers_fails_at_start():
    from perceptclip.training.config import WorkersConfig
    from perceptclip.training.train import check_local_resources

    with pytest.raises(ValueError, match="scaling.use_gpu: 1 GPU worker"):
        check_local_resources(WorkersConfig(use_gpu=True), {"CPU": 16.0})
    with pytest.raises(ValueError, match="scaling.cpus_per_worker"):
        check_local_resources(WorkersConfig(num_workers=2, cpus_per_worker=1.0), {"CPU": 2.0})
    check_local_resources(WorkersConfig(num_workers=1, cpus_per_worker=1.0), {"CPU": 2.0})
    check_local_resources(WorkersConfig(num_workers=4, use_gpu=True, cpus_per_worker=8), {"CPU": 64.0, "GPU": 4.0})


# ---------------------------------------------------------------------------------------------- losses

def test_plcc_loss_ignores_the_labels_scale_and_shift():
    torch.manual_seed(0)
    pred, target = torch.randn(16), torch.randn(16)
    assert plcc_loss(pred, target) == pytest.approx(float(plcc_loss(pred, 3 * target + 7)), abs=1e-5)
    assert float(plcc_loss(target * 2, target)) == pytest.approx(0.0, abs=1e-5)
    assert float(plcc_loss(-target, target)) == pytest.approx(2.0, abs=1e-5)


def test_task_loss_uses_only_valid_rows_and_keeps_the_graph_when_none_are():
    out = torch.randn(4, 1, requires_grad=True)
    target = torch.tensor([0.1, 0.5, 0.9, 123.0])
    valid = torch.tensor([True, True, True, False])
    masked = task_loss("mse", out, target, valid)
    assert float(masked) == pytest.approx(float(((out.detach()[:3, 0] - target[:3]) ** 2).mean()))
    empty = task_loss("plcc", out, target, torch.tensor([True, False, False, False]))
    empty.backward()                      # every worker must still run a backward, even with no loss
    assert float(empty) == 0.0 and out.grad is not None
    logits = torch.randn(3, 8)
    ce = task_loss("cross_entropy", logits, torch.tensor([1.0, 7.0, 0.0]), torch.ones(3, dtype=torch.bool))
    assert float(ce) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, torch.tensor([1, 7, 0]))))


def test_init_from_a_model_keeps_its_backbone_and_lora_and_copies_its_head_to_every_head(iqa_artifact):
    from perceptclip.model.artifact import load_artifact
    from perceptclip.training.train import init_model_config
    from perceptclip.training.worker import build_model

    cfg = TrainConfig(task="iqa", init=iqa_artifact)
    model_cfg = init_model_config(cfg, ("koniq", "spaq"))
    model = build_model(model_cfg, seed=0, init=iqa_artifact)
    source, _ = load_artifact(iqa_artifact)
    state, reference = model.state_dict(), source.state_dict()
    for name, tensor in reference.items():
        if name.startswith("heads.default."):
            for head in ("koniq", "spaq"):
                assert torch.equal(state[name.replace("heads.default.", f"heads.{head}.")], tensor)
        else:
            assert torch.equal(state[name], tensor), name          # base weights and the trained LoRA
    assert list(model.heads) == ["koniq", "spaq"] and model_cfg.lora == source.cfg.lora


# ---------------------------------------------------------------------------------------------- rows

def test_shard_rows_turn_every_sample_into_a_row(tmp_path):
    path = tmp_path / "mixed-000000.tar"
    write_shard(str(path), [
        {"__key__": "good", "jpg": image_bytes(make_image(1, (80, 60))), "json": b'{"label": "fear"}'},
        {"__key__": "index", "png": image_bytes(make_image(2), "PNG"), "json": b'{"label": 3}'},
        {"__key__": "broken", "jpg": b"\xff\xd8 not really", "json": b'{"label": "awe"}'},
        {"__key__": "nolabel", "jpg": image_bytes(make_image(3)), "json": b'{"score": 1}'},
        {"__key__": "unknown", "jpg": image_bytes(make_image(4)), "json": b'{"label": "boredom"}'},
        {"__key__": "deep", "jpg": image_bytes(make_image(5)), "json": b"[" * 100_000},
    ])
    pre = PreprocessConfig(kind="resize_center_crop", size=32)
    rows = {r["key"]: r for r in shard_rows({"url": str(path)}, "emotion", pre, AugmentConfig())}
    assert list(rows) == ["good", "index", "broken", "nolabel", "unknown", "deep"]
    assert rows["good"]["error"] == "" and rows["good"]["target"] == 6.0      # fear is class 6
    assert rows["index"]["target"] == 3.0 and rows["good"]["pixels"].shape == (1, 3, 32, 32)
    assert "not_an_image" in rows["broken"]["error"] and "no label" in rows["nolabel"]["error"]
    assert "boredom" in rows["unknown"]["error"] and rows["unknown"]["pixels"].shape == (1, 3, 32, 32)
    assert "nested too deeply" in rows["deep"]["error"]
    assert [r["reason"] for r in rows.values()] == ["", "", "not_an_image", "bad_label", "bad_label", "bad_label"]
    missing = shard_rows({"url": str(tmp_path / "nope.tar")}, "emotion", pre, None)
    assert len(missing) == 1 and missing[0]["error"].startswith("missing")
    assert missing[0]["reason"] == "shard_missing"


def test_training_crops_are_drawn_from_the_rows_seed(tmp_path):
    (path,) = write_shards(tmp_path / "crops", list(range(6)))
    pre = PreprocessConfig(kind="multi_crop", size=32, crops=3, max_side=256)

    def pixels(seed: int) -> np.ndarray:
        return np.stack([r["pixels"] for r in shard_rows({"url": path, "seed": seed}, "iqa", pre, AugmentConfig())])

    assert np.array_equal(pixels(7), pixels(7))          # the same shard in the same epoch: the same crops
    assert not np.array_equal(pixels(7), pixels(8))


def test_iqa_rows_crop_the_unresized_image():
    img = make_image(5, (120, 90))
    pre = PreprocessConfig(kind="multi_crop", size=32, crops=3, max_side=256)
    arr = np.asarray(img)
    crop = random_crop(img, pre, AugmentConfig(flip=False), np.random.default_rng(0))[0].permute(1, 2, 0).numpy()
    found = any((arr[y:y + 32, x:x + 32] == crop).all() for y in range(90 - 31) for x in range(120 - 31))
    assert found, "an iqa training crop must be a window of the original pixels"


# ---------------------------------------------------------------------------------------------- Ray Train

@pytest.mark.slow
def test_it_learns_the_synthetic_task_and_the_export_scores(ray_local, synthetic, s3_server, tmp_path):
    """The smoke config on the synthetic task, in this process, checkpointing to S3; the exported model
    is then evaluated on held-out images and scored by ``perceptclip score``."""
    fs = s3_server.filesystem()
    dest = f"{s3_server.bucket()}/runs/smoke"
    result = CliRunner().invoke(main, ["train", "--config", str(SMOKE), "--train", spec(synthetic["train"]),
                                       "--val", spec(synthetic["val"]), "--output", dest, "--in-process"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    history = json.loads(fs.cat(f"{dest[5:]}/metrics.json"))
    assert [r["epoch"] for r in history] == list(range(15)) and summary["epochs"] == 15
    assert all(r["val"]["default"]["n"] == 80 and r["train_samples"] == 400 for r in history)
    assert summary["best_epoch"] == max(history, key=lambda r: r["score"])["epoch"]
    assert summary["model"] == f"{dest}/model"
    checkpoint = sorted(fs.ls(f"{dest[5:]}/checkpoints"))[-1]
    assert checkpoint.endswith("epoch-0014")
    # checkpoints hold LoRA and heads only: a few tensors, not the backbone
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(checkpoint)) == [
        "best.safetensors", "optimizer.pt", "state.json", "trainable.safetensors"]

    # held-out images, scored by the exported artifact through the evaluation path
    ev = CliRunner().invoke(main, ["evaluate", "--model", f"{dest}/model", "--data", spec(synthetic["test"]),
                                   "--bootstrap", "200", "--output", str(tmp_path / "eval.json")])
    assert ev.exit_code == 0, ev.output
    metrics = json.loads(ev.stdout.strip().splitlines()[-1])
    assert metrics["n"] == 60 and metrics["srcc"] >= 0.6, metrics
    assert json.loads((tmp_path / "eval.json").read_text()) == metrics

    # ... and through the scoring job, straight from S3, which must agree with the evaluation. The
    # cluster's workers started before the S3 credentials were set: the job must hand them its own.
    out = tmp_path / "scores"
    scored = CliRunner().invoke(main, ["score", "--input", spec(synthetic["test"]), "--output", str(out),
                                       "--model", f"{dest}/model"])
    assert scored.exit_code == 0, scored.output
    table = pq.read_table([str(p) for p in sorted(out.glob("*.parquet"))]).to_pylist()
    labels = {f"s{seed:05d}": quality(seed) for seed in range(2000, 2060)}
    assert len(table) == 60 and all(row["status"] == "ok" for row in table)
    assert srcc([row["iqa"] for row in table], [labels[row["key"]] for row in table]) == pytest.approx(
        metrics["srcc"], abs=1e-6)


def _train_worker_pids() -> list[int]:
    """The live Ray Train worker processes of this test's own cluster (other Ray clusters may share the
    machine)."""
    return worker_pids(raylet_pid(), "RayTrainWorker")


def _latest_checkpoint(dest: Path) -> str | None:
    """The latest checkpoint Ray Train has registered for the run in ``dest`` (what a restart resumes
    from); None also while Ray Train rewrites its snapshot, which it does in place."""
    try:
        latest = json.loads((dest / "checkpoints" / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    latest = latest.get("latest_checkpoint_result")
    return latest["checkpoint_dir_name"] if latest else None


@pytest.mark.slow
def test_two_workers_two_datasets_a_lost_worker_restarts_the_group_without_repeating_epochs(ray_local, synthetic,
                                                                                          tmp_path):
    """Two workers (gloo DDP), two training sets with a head each; a worker SIGKILLed after a checkpoint:
    Ray Train restarts the whole group (max_failures) from the latest checkpoint, the finished epochs
    are not trained again, and validation gathers both workers' predictions over whole sets. (A failed
    run resumed by the same command: the test below.)"""
    from perceptclip.training.evaluate import evaluate

    # the second set rates the same kind of images the opposite way: only its own head can fit it
    second = write_shards(tmp_path / "second" / "train", list(range(300, 500)), label=lambda s: -quality(s))
    second_val = write_shards(tmp_path / "second" / "val", list(range(1100, 1120)), label=lambda s: -quality(s))
    cfg = TrainConfig.load(str(SMOKE))
    cfg.epochs = 6
    cfg.batch_size = 32                        # 16 per worker: the PLCC loss needs more than a handful
    cfg.learning_rate = 3e-3
    cfg.max_failures = 1
    cfg.scaling.num_workers = 2
    cfg.scaling.cpus_per_worker = 0.5          # leaves the shared 2-CPU cluster room for the data tasks
    dest = tmp_path / "run"
    run = {}
    thread = threading.Thread(target=lambda: run.update(summary=train(
        cfg, {"first": spec(synthetic["train"]), "second": spec(second)},
        {"first": spec(synthetic["val"]), "second": spec(second_val)}, str(dest))))
    thread.start()
    latest = wait_for(lambda: _latest_checkpoint(dest), 240, "the first checkpoint", every=0.2)
    # what the run had finished when the worker was lost: the history kept in its latest registered checkpoint
    done_before = json.loads((dest / "checkpoints" / latest / "state.json").read_text())["history"]
    workers = _train_worker_pids()
    assert len(workers) == 2 and 1 <= len(done_before) < 6
    os.kill(workers[1], signal.SIGKILL)
    thread.join(timeout=400)
    summary = run["summary"]                 # absent if the run failed instead of retrying
    history = json.loads((dest / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == list(range(6))
    assert history[:len(done_before)] == done_before, "finished epochs must not run again"
    resumed = [r["resumed_after_epoch"] for r in history if "resumed_after_epoch" in r]
    assert len(resumed) == 1 and resumed[0] >= len(done_before) - 1     # the restarted group resumed once
    for r in history:                        # validation gathered from both workers, whole sets
        assert r["val"]["first"]["n"] == 80 and r["val"]["second"]["n"] == 20
        assert r["train_samples"] == 600
    assert summary["epochs"] == 6 and set(summary["val"]) == {"first", "second"}
    checkpoints = sorted(p.name for p in (dest / "checkpoints").iterdir() if p.name.startswith("epoch-"))
    assert checkpoints == ["epoch-0004", "epoch-0005"]                  # keep_checkpoints: 2

    config = json.loads((dest / "model" / "config.json").read_text())
    assert config["model"]["heads"] == ["first", "second"]
    first = evaluate(str(dest / "model"), synthetic["test"], resamples=0)
    other = evaluate(str(dest / "model"), synthetic["test"], head="second", resamples=0)
    assert first["head"] == "first" and other["head"] == "second"
    assert first["srcc"] > 0.3 and other["srcc"] < -0.3, (first["srcc"], other["srcc"])


@pytest.mark.slow
def test_the_rows_a_worker_reads_in_an_epoch_depend_only_on_the_seed_the_epoch_and_its_rank(ray_local, synthetic,
                                                                                            monkeypatch):
    """What makes several workers reproducible: each reads whole shards, dealt from an order drawn
    from (seed, epoch), with crops seeded per shard; read again, an epoch gives every worker the same
    rows in the same order, read by Ray Data tasks (with the order preserved, as each worker sets it) or
    in this process alike."""
    import ray.data

    from perceptclip.training.data import epoch_items
    from perceptclip.training.session import local_read, ray_read

    monkeypatch.setattr(ray.data.DataContext.get_current().execution_options, "preserve_order", True)
    pre = PreprocessConfig(kind="multi_crop", size=32, crops=3, max_side=256)
    urls = synthetic["train"][:5]
    shard = partial(shard_rows, task="iqa", pre=pre, aug=AugmentConfig(), storage_options={})

    def rows(epoch: int, rank: int, read=ray_read) -> tuple[list[str], np.ndarray]:
        chunks = list(read(epoch_items(urls, epoch, 0, rank, 2), shard))
        return [k for c in chunks for k in c["key"]], np.concatenate([c["pixels"] for c in chunks])

    first = {rank: rows(1, rank) for rank in (0, 1)}
    for rank in (0, 1):
        for again in (rows(1, rank), rows(1, rank, local_read)):
            assert again[0] == first[rank][0] and np.array_equal(again[1], first[rank][1])
    assert sorted(first[0][0] + first[1][0]) == [f"s{seed:05d}" for seed in range(200)]    # each sample once
    assert {len(first[0][0]), len(first[1][0])} == {80, 120}                              # 3 shards and 2
    later = rows(2, 0)
    assert later[0] != first[0][0] or not np.array_equal(later[1], first[0][1])          # a new epoch is new


def test_an_epochs_batches_depend_on_its_rows_and_seed_not_on_how_they_are_cut():
    """The batches a worker trains on: the same rows in chunks of any size (Ray Data's blocks, one
    shard at a time) give the same batches; every row once; another seed, another order."""
    from perceptclip.training.data import shuffled_batches

    rows = {"key": np.array([f"k{i}" for i in range(103)]), "pixels": np.arange(103 * 2).reshape(103, 2)}

    def batches(cut: int, seed: int = 7) -> list[list[str]]:
        chunks = ({k: v[i:i + cut] for k, v in rows.items()} for i in range(0, 103, cut))
        out = list(shuffled_batches(chunks, 10, seed))
        assert all(np.array_equal(b["pixels"][:, 0] // 2, [int(k[1:]) for k in b["key"]]) for b in out)
        return [b["key"].tolist() for b in out]

    first = batches(103)
    assert [len(b) for b in first] == [10] * 10 + [3]
    assert sorted(k for b in first for k in b) == sorted(rows["key"].tolist())
    assert batches(1) == batches(7) == batches(64) == first
    assert batches(103, seed=8) != first


@pytest.mark.slow
def test_a_run_whose_worker_was_killed_is_resumed_by_the_same_command_and_exports_the_uninterrupted_model(
        ray_local, synthetic, tmp_path):
    """The same seed trained twice: once on Ray Train with its worker SIGKILLed after its first registered
    checkpoint (max_failures 0: the run fails), then the same call again, which resumes after the latest
    checkpoint the killed run registered; and once uninterrupted, in this process (which trains what one
    Ray Train worker trains: ``test_a_run_in_this_process_trains_what_one_ray_train_worker_trains``). Both
    must export the same model. One worker: the rows each of several workers reads are checked above."""
    from safetensors.torch import load_file

    from perceptclip.model.scorer import Scorer

    cfg = TrainConfig.load(str(SMOKE))
    cfg.epochs = 3
    cfg.keep_checkpoints = 3
    cfg.scaling.cpus_per_worker = 0.5          # one torch thread, as in this process; room for the data tasks
    # 240 samples: an epoch takes long enough that the kill lands before the last one ends
    sets = ({"default": spec(synthetic["train"][:6])}, {"default": spec(synthetic["val"][:1])})
    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"
    failure = {}

    def first_run():
        try:
            train(cfg, *sets, str(interrupted))
        except Exception as e:          # the killed run must fail: max_failures is 0 in smoke.yaml
            failure["error"] = e

    earlier = set(_train_worker_pids())            # an earlier test's workers may still be stopping
    thread = threading.Thread(target=first_run)
    thread.start()
    wait_for(lambda: set(_train_worker_pids()) - earlier, 240, "the run's worker", every=0.2)
    (victim,) = set(_train_worker_pids()) - earlier
    # Ray Train registers what the worker reported each time it polls: epoch 0's checkpoint, or 0 and 1 at once
    wait_for(lambda: _latest_checkpoint(interrupted), 240, "the first registered checkpoint", every=0.2)
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=300)
    assert "error" in failure, "the interrupted run should have failed"
    # the latest checkpoint the killed run registered: one of the first two epochs
    latest = _latest_checkpoint(interrupted)
    done = int(latest.rsplit("-", 1)[1]) + 1
    assert done < 3, latest
    before = json.loads((interrupted / "checkpoints" / latest / "state.json").read_text())["history"]
    resumed = train(cfg, *sets, str(interrupted))
    cfg.scaling.in_process = True
    uninterrupted = train(cfg, *sets, str(reference))
    assert resumed == {**uninterrupted, "model": str(interrupted / "model")}

    history = json.loads((interrupted / "metrics.json").read_text())
    assert history[:done] == before, "finished epochs must not run again"
    # the rerun started from that checkpoint: the next epoch was trained from its weights and optimiser state
    assert [r.get("resumed_after_epoch") for r in history] == [None] * done + [done - 1] + [None] * (2 - done)
    run_only = ("train_seconds", "seconds", "resumed_after_epoch")
    untimed = [[{k: v for k, v in r.items() if k not in run_only}
                for r in json.loads((d / "metrics.json").read_text())] for d in (interrupted, reference)]
    assert untimed[0] == untimed[1]                 # the same losses and validation metrics, epoch by epoch

    def max_difference(a: dict, b: dict) -> float:
        assert a.keys() == b.keys()
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    models = [load_file(str(d / "model" / "model.safetensors")) for d in (interrupted, reference)]
    assert max_difference(*models) <= 1e-5
    last = [load_file(str(d / "checkpoints" / "epoch-0002" / "trainable.safetensors"))
            for d in (interrupted, reference)]
    assert max_difference(*last) <= 1e-5
    # ... and the epochs after the kill did change the model, so the comparison above is not vacuous
    first = load_file(str(interrupted / "checkpoints" / "epoch-0000" / "trainable.safetensors"))
    assert max_difference(first, last[0]) > 1e-3

    images = [noisy_image(seed) for seed in range(2000, 2012)]
    scores = []
    for d in (interrupted, reference):
        scorer = Scorer.load(str(d / "model"))
        scores.append(scorer.score([scorer.preprocess(img) for img in images]))
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-5)


# ---------------------------------------------------------------------------------------------- no silent harm

def smoke_config(tmp_path: Path, **changes) -> Path:
    """The smoke config with ``changes``, as a file for the command line."""
    import yaml

    raw = {**yaml.safe_load(SMOKE.read_text()), **changes}
    path = tmp_path / f"smoke-{len(list(tmp_path.glob('smoke-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def unlabelled_shard(path: Path, count: int = 10) -> str:
    return write_labelled_shard(path, [(f"u{i:03d}", image_bytes(noisy_image(i), "PNG"), {"other": i})
                                       for i in range(count)], ext="png")


def test_the_output_may_not_hold_the_runs_shards(few_shards, tmp_path):
    """Checked before Ray starts or anything is written."""
    cfg = TrainConfig.load(str(SMOKE))
    shards = Path(few_shards["train"][0]).parent
    with pytest.raises(ValueError, match="--output: .* holds the training shards .* apart"):
        train(cfg, {"default": few_shards["train"][0]}, {"default": few_shards["val"][0]}, str(shards))
    assert not (shards / "run.json").exists() and not (shards / "checkpoints").exists()


def test_a_run_record_refuses_another_config_or_other_data_and_names_what_changed(few_shards, tmp_path):
    from perceptclip.training.train import begin_run

    cfg = TrainConfig.load(str(SMOKE))
    sets = {"default": few_shards["train"][:2]}, {"default": few_shards["val"][:1]}
    dest = str(tmp_path / "run")
    other = TrainConfig.load(str(SMOKE))
    other.seed = 7
    begin_run(other, *sets, dest, restart=False)
    begin_run(cfg, *sets, dest, restart=False)      # nothing trained yet (the run failed at start): replaced
    (tmp_path / "run" / "checkpoints" / "epoch-0000").mkdir(parents=True)      # as the first epoch leaves it
    begin_run(cfg, *sets, dest, restart=False)                  # the same run: resumed
    operational = TrainConfig.load(str(SMOKE))
    operational.max_failures, operational.keep_checkpoints = 2, 5
    begin_run(operational, *sets, dest, restart=False)          # how it is run, not what it trains
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    del record["config"]["scaling"]["in_process"]               # a record written before the setting existed
    (tmp_path / "run" / "run.json").write_text(json.dumps(record))
    begin_run(cfg, *sets, dest, restart=False)                  # ran with its default: the same run
    here = TrainConfig.load(str(SMOKE))
    here.scaling.in_process = True                              # its checkpoints are Ray Train's
    with pytest.raises(ValueError, match=r"scaling.in_process: false -> true"):
        begin_run(here, *sets, dest, restart=False)
    fewer = TrainConfig.load(str(SMOKE))
    fewer.epochs, fewer.learning_rate = 2, 0.1
    with pytest.raises(ValueError) as info:
        begin_run(fewer, *sets, dest, restart=False)
    assert "epochs: 15 -> 2" in str(info.value) and "learning_rate: 0.002 -> 0.1" in str(info.value)
    assert "--restart" in str(info.value)
    with pytest.raises(ValueError, match=r"train.default: 2 shards -> 3 shards"):
        begin_run(cfg, {"default": few_shards["train"][:3]}, sets[1], dest, restart=False)
    with pytest.raises(ValueError, match=r"val.default: other shards"):
        begin_run(cfg, sets[0], {"default": few_shards["val"][1:2]}, dest, restart=False)
    begin_run(fewer, *sets, dest, restart=True)                 # discarded, and recorded anew
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["epochs"] == 2


def test_an_earlier_run_without_a_record_is_not_resumed(tmp_path, few_shards):
    from perceptclip.training.train import begin_run

    cfg = TrainConfig.load(str(SMOKE))
    (tmp_path / "run" / "checkpoints" / "epoch-0003").mkdir(parents=True)
    with pytest.raises(ValueError, match="no record of its settings.*--restart"):
        begin_run(cfg, {"default": few_shards["train"][:1]}, {"default": few_shards["val"][:1]}, str(tmp_path / "run"),
                  restart=False)
    assert (tmp_path / "run" / "checkpoints" / "epoch-0003").exists()


def test_a_set_that_cannot_be_used_stops_the_run(tmp_path):
    """The decision after every epoch, from the epoch's record (the same on every worker)."""
    from perceptclip.training.validation import run_problems

    provenance = {"train": {"a": "a/*.tar", "b": "b/"}, "val": {"a": "va/*.tar"}}
    record = {"train_sets": {"a": {"n": 40, "errors": 0, "error_reasons": {}},
                             "b": {"n": 0, "errors": 1, "error_reasons": {"shard_missing": 1}}},
              "val": {"a": {"srcc": None, "n": 20, "unusable": "all 20 usable labels are equal (0.5)",
                            "errors": 0, "error_reasons": {}}}}
    problems = run_problems(record, provenance)
    assert problems == ("training set 'b' (b/): no usable sample (shard_missing 1); validation set 'a' (va/*.tar): "
                        "all 20 usable labels are equal (0.5) (unusable samples: none)")
    record["train_sets"]["b"]["n"] = 3
    record["val"]["a"] = {"srcc": None, "n": 20, "undefined": "all 20 predictions are equal (0.1)", "errors": 0,
                          "error_reasons": {}}
    assert run_problems(record, provenance) is None             # the model's doing: that epoch has no score


@pytest.mark.slow
def test_training_sets_without_a_usable_sample_fail_the_run_naming_them_and_export_nothing(synthetic,
                                                                                          tmp_path):
    """Training sets none of whose samples can be used stop the run after its first epoch, naming each such
    set and why (a folder means its shards); the usable set is not named, and nothing is exported. The
    worker records the failure in the history, where the driver reads it on Ray Train as in this process."""
    unlabelled_shard(tmp_path / "unlabelled" / "train-000000.tar")
    dest = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "train", "--config", str(smoke_config(tmp_path, epochs=2)),
        "--train", f"nolabels={tmp_path / 'unlabelled' / 'train-000000.tar'}",
        "--train", f"folder={tmp_path / 'unlabelled'}/", "--train", f"good={synthetic['train'][0]}",
        "--val", f"good={synthetic['val'][0]}", "--output", str(dest), "--in-process"])
    assert result.exit_code != 0
    assert "training set 'nolabels'" in result.output and "no usable sample (bad_label 10)" in result.output
    # a folder means its shards: the same unlabelled shard, read through its folder
    assert f"training set 'folder' ({tmp_path / 'unlabelled'}/): no usable sample (bad_label 10)" in result.output
    assert "'good'" not in result.output
    assert not (dest / "model").exists()
    history = json.loads((dest / "metrics.json").read_text())
    assert len(history) == 1 and history[0]["train_sets"]["nolabels"]["error_reasons"] == {"bad_label": 10}


@pytest.mark.slow
def test_a_validation_set_without_a_usable_sample_fails_the_run_and_exports_nothing(synthetic, tmp_path):
    """A validation set none of whose samples can be used fails the run naming it and why; its metrics are
    null, never NaN, and nothing is exported."""
    val = unlabelled_shard(tmp_path / "val" / "val-000000.tar", count=12)
    dest = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--config", str(smoke_config(tmp_path, epochs=2)),
                                       "--train", synthetic["train"][0], "--val", val, "--output", str(dest),
                                       "--in-process"])
    assert result.exit_code != 0
    assert f"validation set 'default' ({val}): no usable sample (unusable samples: bad_label 12)" in result.output
    assert not (dest / "model").exists()
    text = (dest / "metrics.json").read_text()
    assert "NaN" not in text and json.loads(text)[0]["val"]["default"]["srcc"] is None


@pytest.mark.slow
def test_a_rerun_with_another_config_is_refused_and_restart_starts_afresh(smoke_training, tmp_path):
    """Over a finished run of 2 epochs (the session's ``smoke_training``, copied), a rerun with 1 epoch is
    refused naming the change and leaves the run as it was; with --restart it trains afresh (in this
    process): 1 epoch, its history, checkpoints and record those of the new run only."""
    import shutil

    first = smoke_training["proc"]
    assert first.returncode == 0, first.stderr[-3000:]
    dest = Path(shutil.copytree(smoke_training["output"], tmp_path / "run"))
    sets = ["--train", smoke_training["train"], "--val", smoke_training["val"], "--output", str(dest)]
    model = (dest / "model" / "model.safetensors").read_bytes()
    changed = smoke_config(tmp_path, epochs=1)
    refused = CliRunner().invoke(main, ["train", "--config", str(changed), *sets])
    assert refused.exit_code != 0 and "epochs: 2 -> 1" in refused.output and "--restart" in refused.output
    assert (dest / "model" / "model.safetensors").read_bytes() == model
    assert len(json.loads((dest / "metrics.json").read_text())) == 2

    restarted = CliRunner().invoke(main, ["train", "--config", str(changed), *sets, "--restart", "--in-process"])
    assert restarted.exit_code == 0, restarted.output
    assert json.loads(restarted.stdout.strip().splitlines()[-1])["epochs"] == 1
    history = json.loads((dest / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [0] and "resumed_after_epoch" not in history[0]
    assert sorted(p.name for p in (dest / "checkpoints").iterdir()) == ["epoch-0000"]
    assert json.loads((dest / "run.json").read_text())["config"]["epochs"] == 1


@pytest.mark.slow
def test_a_run_in_this_process_trains_what_one_ray_train_worker_trains(smoke_training, tmp_path):
    """The session's ``smoke_training`` (Ray Train, one worker, 2 epochs) again with --in-process: the same
    epochs (losses, scores, samples) and the same exported weights. Its checkpoints are the session's
    own, and a rerun resumes from them."""
    from safetensors.torch import load_file

    ray_run = smoke_training["proc"]
    assert ray_run.returncode == 0, ray_run.stderr[-3000:]
    dest = tmp_path / "here"
    args = ["train", "--config", str(smoke_training["config"]), "--train", smoke_training["train"],
            "--val", smoke_training["val"], "--output", str(dest), "--in-process"]
    here = CliRunner().invoke(main, args)
    assert here.exit_code == 0, here.output
    keys = ("epoch", "train_loss", "score", "train_samples", "best_epoch")
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (dest, smoke_training["output"]))
    assert len(ours) == len(theirs) == 2
    for mine, ray_s in zip(ours, theirs):
        assert [mine[k] for k in keys] == pytest.approx([ray_s[k] for k in keys], rel=1e-5), (mine, ray_s)
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (dest, smoke_training["output"]))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert sorted(p.name for p in (dest / "checkpoints").iterdir()) == ["epoch-0000", "epoch-0001"]
    again = CliRunner().invoke(main, args)          # every epoch done: resumed after the last, nothing trained
    assert again.exit_code == 0, again.output
    assert len(json.loads((dest / "metrics.json").read_text())) == 2


@pytest.mark.slow
def test_a_worker_builds_a_model_from_its_configuration_without_transformers_or_timm(tmp_path):
    """A training worker builds the smoke config's model (a vision tower from configuration, no pretrained
    download) without importing transformers or timm, seconds of each worker's start; the same weights
    as this process, which imported both, builds (the whole runs agree: the test above). (Slow: a fresh
    interpreter that imports torch and open_clip.)"""
    from perceptclip.training.worker import build_model

    smoke = TrainConfig.load(str(SMOKE))
    cfg = smoke.model.model_config(smoke.task, ("default",))
    code = ("import sys, json\n"
            "from perceptclip.model.config import ModelConfig\n"
            "from perceptclip.training.worker import build_model\n"
            f"model = build_model(ModelConfig.from_mapping({cfg.to_mapping()!r}), 7, None)\n"
            f"__import__('torch').save(model.state_dict(), {str(tmp_path / 'state.pt')!r})\n"
            "print(json.dumps([m for m in ('transformers', 'timm') if m not in sys.modules]))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(run.stdout.strip().splitlines()[-1]) == ["transformers", "timm"]
    import open_clip  # noqa: F401  (this process imports it with transformers and timm)

    theirs, ours = torch.load(tmp_path / "state.pt"), build_model(cfg, 7, None).state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_an_epoch_whose_predictions_cannot_be_ranked_has_no_score_and_never_becomes_the_best():
    """Case 8's other half: a metric that cannot be computed is null (never NaN), and a model whose
    predictions are all equal is the model's doing: the run goes on, but that epoch has no score."""
    from collections import Counter

    from perceptclip.core.tasks import get_task
    from perceptclip.training.validation import epoch_score, set_metrics

    iqa = get_task("iqa")
    flat = set_metrics(iqa, [np.full((4, 1), 0.3)], [np.array([1.0, 2.0, 3.0, 4.0])], Counter({"bad_label": 1}))
    assert flat["srcc"] is None and flat["undefined"] == "all 4 predictions are equal (0.3)"
    assert flat["error_reasons"] == {"bad_label": 1} and "unusable" not in flat
    assert json.dumps(flat, allow_nan=False)
    ranked = set_metrics(iqa, [np.array([[0.1], [0.2]])], [np.array([1.0, 2.0])], Counter())
    assert epoch_score({"a": ranked, "b": flat}, iqa) is None and epoch_score({"a": ranked}, iqa) == pytest.approx(1.0)
    same = set_metrics(iqa, [np.array([[0.1], [0.2]])], [np.array([2.0, 2.0])], Counter())
    assert same["unusable"] == "all 2 usable labels are equal (2)"
