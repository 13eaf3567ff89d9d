"""The scoring job end to end on a local Ray cluster: shards written here, tiny real models, local
folders and a real S3 server (moto) on loopback."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from perceptclip.cli import main
from perceptclip.core.storage import storage_options
from perceptclip.inputs.shards import read_shard, shard_bytes, write_shard
from perceptclip.scoring.config import ScoreConfig, load_score_config
from perceptclip.scoring.job import run_score
from support.images import image_bytes, make_image

REPO = Path(__file__).resolve().parents[1]
FORMATS = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")]


def good_samples(shard: int, n: int) -> list[dict]:
    """img2dataset's layout: key.<image>, key.json (url, caption), key.txt (caption)."""
    out = []
    for i in range(n):
        ext, fmt = FORMATS[i % len(FORMATS)]
        key = f"{shard:05d}{i:04d}"
        img = make_image(shard * 100 + i, size=(40 + 8 * i, 48), mode="RGBA" if fmt == "PNG" else "RGB")
        out.append({"__key__": key, ext: image_bytes(img, fmt),
                    "json": json.dumps({"url": f"https://example.com/{key}.{ext}", "key": key}).encode(),
                    "txt": f"caption {key}".encode()})
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four good shards (one with a corrupt image and one sample with no image at all, one empty) and
    three broken ones: truncated, not a tar, missing."""
    root = tmp_path_factory.mktemp("shards")
    contents = {f"shard-{i:06d}": good_samples(i, 7) for i in range(3)}
    contents["shard-000001"][2]["jpg"] = b"\xff\xd8\xff\xe0 this is not really a JPEG"
    contents["shard-000001"][4] = {"__key__": contents["shard-000001"][4]["__key__"], "json": b"{}"}
    contents["shard-000003"] = []
    for name, samples in contents.items():
        write_shard(str(root / f"{name}.tar"), samples)
    data = shard_bytes(good_samples(9, 5))
    (root / "broken-truncated.tar").write_bytes(data[: len(data) // 2])
    (root / "broken-notatar.tar").write_bytes(b"<html>404 Not Found</html>" * 30)
    broken = [str(root / "broken-truncated.tar"), str(root / "broken-notatar.tar"), str(root / "missing.tar")]
    return {"root": root, "contents": contents, "good": str(root / "shard-*.tar"), "broken": broken}


@pytest.fixture(scope="module")
def first_run(dataset, iqa_artifact, emotion_artifact, ray_local, tmp_path_factory):
    """``perceptclip score`` as a user runs it, joining the test's Ray cluster through --address."""
    out = tmp_path_factory.mktemp("scores")
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, "-c", "from perceptclip.cli import main; main()", "score",
           "--input", dataset["good"], *sum((["--input", b] for b in dataset["broken"]), []),
           "--output", str(out), "--model", iqa_artifact, "--model", emotion_artifact, "--address", address]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.stdout, proc.stderr[-3000:]
    return {"out": out, "proc": proc, "summary": json.loads(proc.stdout)}


@pytest.fixture
def first_run_copy(first_run, tmp_path) -> Path:
    """A copy of the first run's output for a test that runs the job again over it: the first run's own
    output stays as that run left it (one run summary, its run id in every table), whatever ran before."""
    return Path(shutil.copytree(first_run["out"], tmp_path / "scores"))


@pytest.mark.slow
def test_every_sample_is_one_row_and_broken_shards_fail(first_run, dataset):
    proc, summary, out = first_run["proc"], first_run["summary"], first_run["out"]
    assert proc.returncode == 1                      # some shards failed
    assert "[1/7]" in proc.stderr                    # progress while running
    assert summary["shards"] == {"planned": 7, "done": 4, "skipped": 0, "failed": 3}
    failed = {Path(f["shard"]).name: f["reason"] for f in summary["failed_shards"]}
    assert failed == {"broken-truncated.tar": "truncated", "broken-notatar.tar": "not_a_tar",
                      "missing.tar": "missing"}
    for name in ("broken-truncated", "broken-notatar", "missing"):
        assert not (out / f"{name}.parquet").exists() and not (out / "_markers" / f"{name}.json").exists()
    total = 0
    for name, samples in dataset["contents"].items():
        table = pq.read_table(out / f"{name}.parquet")
        assert table["key"].to_pylist() == [s["__key__"] for s in samples]
        assert set(table["shard"].to_pylist()) <= {str(dataset["root"] / f"{name}.tar")}
        marker = json.loads((out / "_markers" / f"{name}.json").read_text())
        assert marker["rows"] == table.num_rows == len(samples)
        total += len(samples)
    assert summary["samples"] == {"total": total, "ok": total - 2, "error": 2,
                                  "errors_by_reason": {"corrupt": 1, "no_image": 1}}
    runs = list((out / "_runs").glob("*.json"))
    assert len(runs) == 1 and json.loads(runs[0].read_text())["run_id"] == summary["run_id"]


@pytest.mark.slow
def test_error_rows_and_table_contents(first_run, dataset):
    table = pq.read_table(first_run["out"] / "shard-000001.parquet").to_pylist()
    corrupt, no_image = table[2], table[4]
    assert corrupt["status"] == "error" and corrupt["error"].startswith("corrupt:")
    assert corrupt["iqa"] is None and corrupt["emotion"] is None and corrupt["width"] is None
    assert no_image["status"] == "error" and no_image["error"].startswith("no_image:")
    good = table[0]
    key = good["key"]
    assert good["status"] == "ok" and good["error"] is None
    assert (good["width"], good["height"]) == (40, 48)
    assert good["url"] == f"https://example.com/{key}.jpg" and good["caption"] == f"caption {key}"
    assert isinstance(good["iqa"], float)
    assert good["emotion"] in ("amusement", "awe", "contentment", "excitement", "anger", "disgust", "fear", "sadness")
    assert sum(good[f"emotion_{label}"] for label in ("amusement", "awe", "contentment", "excitement", "anger",
                                                      "disgust", "fear", "sadness")) == pytest.approx(1, abs=1e-5)
    empty = pq.read_table(first_run["out"] / "shard-000003.parquet")
    assert empty.num_rows == 0 and "emotion_awe" in empty.column_names


@pytest.mark.slow
def test_marker_and_provenance(first_run, iqa_artifact):
    import hashlib

    out = first_run["out"]
    marker = json.loads((out / "_markers" / "shard-000000.json").read_text())
    data = (out / "shard-000000.parquet").read_bytes()
    assert marker["sha256"] == hashlib.sha256(data).hexdigest() and marker["bytes"] == len(data)
    assert [m["name"] for m in marker["models"]] == ["iqa", "emotion"]
    meta = json.loads(pq.read_schema(out / "shard-000000.parquet").metadata[b"perceptclip"])
    config = json.loads((Path(iqa_artifact) / "config.json").read_text())
    assert meta["run_id"] == first_run["summary"]["run_id"]
    iqa = meta["models"][0]
    assert iqa["task"] == "iqa" and iqa["weights_sha256"] == config["weights"]["sha256"]
    assert iqa["higher_is_better"] is True and iqa["preprocess"]["kind"] == "multi_crop"
    assert meta["models"][1]["labels"][0] == "amusement"


@pytest.mark.slow
def test_scores_equal_predict(first_run, dataset, iqa_artifact, emotion_artifact, tmp_path):
    samples = dataset["contents"]["shard-000002"]
    paths = []
    for s in samples:
        ext = next(e for e in s if e in ("jpg", "png", "webp"))
        paths.append(tmp_path / f"{s['__key__']}.{ext}")
        paths[-1].write_bytes(s[ext])
    result = CliRunner().invoke(main, ["predict", *map(str, paths), "--model", iqa_artifact,
                                       "--model", emotion_artifact])
    assert result.exit_code == 0, result.output
    predicted = [json.loads(line) for line in result.stdout.splitlines()]
    table = pq.read_table(first_run["out"] / "shard-000002.parquet").to_pylist()
    for row, pred in zip(table, predicted, strict=True):
        assert row["iqa"] == pytest.approx(pred["iqa"], abs=1e-5)
        assert row["emotion"] == pred["emotion"]
        for label, p in pred["emotion_probs"].items():
            assert row[f"emotion_{label}"] == pytest.approx(p, abs=1e-5)


@pytest.mark.slow
def test_rerun_skips_committed_shards_before_reading_them(first_run_copy, dataset, iqa_artifact, emotion_artifact):
    out = first_run_copy
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    cfg = ScoreConfig(input=[dataset["good"]], output=str(out), models=[iqa_artifact, emotion_artifact])
    # the shards are replaced by garbage: a rerun that read them would fail
    moved = {}
    for name in dataset["contents"]:
        path = dataset["root"] / f"{name}.tar"
        moved[path] = path.read_bytes()
        path.write_bytes(b"garbage")
    try:
        summary = run_score(cfg).to_dict()
    finally:
        for path, data in moved.items():
            path.write_bytes(data)
    assert summary["shards"] == {"planned": 4, "done": 0, "skipped": 4, "failed": 0}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == before


@pytest.mark.slow
def test_deleted_marker_reruns_exactly_that_shard(first_run_copy, dataset, iqa_artifact, emotion_artifact,
                                                  ray_local):
    out = first_run_copy
    original = pq.read_table(out / "shard-000002.parquet")
    (out / "_markers" / "shard-000002.json").unlink()
    (out / "shard-000002.parquet").write_bytes(b"half-written orphan")    # a crash between the two writes
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet") if p.name != "shard-000002.parquet"}
    cfg = ScoreConfig(input=[dataset["good"]], output=str(out), models=[iqa_artifact, emotion_artifact])
    summary = run_score(cfg).to_dict()
    assert summary["shards"] == {"planned": 4, "done": 1, "skipped": 3, "failed": 0}
    assert [Path(o).name for o in summary["outputs"]] == ["shard-000002.parquet"]
    again = pq.read_table(out / "shard-000002.parquet")
    assert again.to_pylist() == original.to_pylist()
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet") if p.name != "shard-000002.parquet"} == before


@pytest.mark.slow
def test_overwrite_redoes_all(first_run_copy, dataset, iqa_artifact, emotion_artifact, ray_local):
    out = first_run_copy
    before = {p.name: pq.read_table(p).to_pylist() for p in out.glob("*.parquet")}
    cfg = ScoreConfig(input=[dataset["good"]], output=str(out), models=[iqa_artifact, emotion_artifact],
                      overwrite=True, batch_size=3, block_rows=2)
    summary = run_score(cfg).to_dict()
    assert summary["shards"] == {"planned": 4, "done": 4, "skipped": 0, "failed": 0}
    for name, rows in before.items():
        again = pq.read_table(out / name).to_pylist()
        assert len(again) == len(rows)
        for new, old in zip(again, rows):                     # the same scores, whatever the batching
            assert new == {k: pytest.approx(v, abs=1e-5) if isinstance(v, float) else v for k, v in old.items()}
        marker = json.loads((out / "_markers" / name.replace(".parquet", ".json")).read_text())
        assert marker["run_id"] == summary["run_id"]


@pytest.mark.slow
def test_decoding_on_the_model_device_gives_the_rows_of_the_cpu_path(first_run, dataset, iqa_artifact,
                                                                     emotion_artifact, ray_local, tmp_path):
    """decode: device on this CPU-only machine: the actor decodes with torchvision on its device (the
    CPU here), PNG, WebP and the broken JPEG go through the per-image fallback; same rows, same errors."""
    cfg = ScoreConfig(input=[dataset["good"]], output=str(tmp_path), models=[iqa_artifact, emotion_artifact],
                      decode="device", batch_size=4)
    summary = run_score(cfg).to_dict()
    assert summary["shards"] == {"planned": 4, "done": 4, "skipped": 0, "failed": 0}
    for name in dataset["contents"]:
        cpu = pq.read_table(first_run["out"] / f"{name}.parquet").to_pylist()
        device = pq.read_table(tmp_path / f"{name}.parquet").to_pylist()
        assert [r["key"] for r in device] == [r["key"] for r in cpu]
        for new, old in zip(device, cpu):
            for column in ("status", "error", "width", "height", "url", "caption"):
                assert new[column] == old[column], (name, new["key"], column)
            if old["status"] == "ok":
                # iqa's crops are slices of the decoded image: identical; emotion's resize differs by a level or two
                assert new["iqa"] == pytest.approx(old["iqa"], abs=1e-5)
                for label in ("amusement", "fear", "sadness"):
                    assert new[f"emotion_{label}"] == pytest.approx(old[f"emotion_{label}"], abs=2e-3)


@pytest.mark.slow
def test_s3_end_to_end(s3_server, iqa_artifact, ray_local):
    bucket = s3_server.bucket()
    options = storage_options()
    contents = {f"part-{i:03d}": good_samples(10 + i, 5) for i in range(3)}
    contents["part-001"][2]["webp"] = b"RIFF....WEBPVP8 broken"
    for name, samples in contents.items():
        write_shard(f"{bucket}/shards/{name}.tar", samples, options)
    fs = s3_server.filesystem()
    fs.pipe_file(f"{bucket[5:]}/lists/nightly.txt", f"{bucket}/shards/part-{{000..002}}.tar\n".encode())
    cfg = load_score_config(None, input=[f"{bucket}/lists/nightly.txt"], output=f"{bucket}/scores",
                            models=[f"quality={iqa_artifact}"])
    summary = run_score(cfg).to_dict()
    assert summary["shards"] == {"planned": 3, "done": 3, "skipped": 0, "failed": 0}
    assert summary["samples"]["errors_by_reason"] == {"corrupt": 1}
    for name, samples in contents.items():
        with fs.open(f"{bucket[5:]}/scores/{name}.parquet", "rb") as f:
            table = pq.read_table(f)
        assert table["key"].to_pylist() == [s["__key__"] for s in samples]
        assert "quality" in table.column_names and "iqa" not in table.column_names   # NAME=MODEL
        assert fs.exists(f"{bucket[5:]}/scores/_markers/{name}.json")
    # nothing written anywhere carries the credentials
    for path in fs.find(f"{bucket[5:]}/scores"):
        body = fs.cat_file(path)
        assert b"testing-secret" not in body and b'"testing"' not in body
    # a nightly run over a grown bucket scores only the new shard
    write_shard(f"{bucket}/shards/part-003.tar", good_samples(20, 2), options)
    cfg.input = [f"{bucket}/shards/part-*.tar"]
    summary = run_score(cfg).to_dict()
    assert summary["shards"] == {"planned": 4, "done": 1, "skipped": 3, "failed": 0}
    assert len(read_shard(f"{bucket}/shards/part-003.tar", options)) == 2
    # curation from and to the object store
    from perceptclip.curation.filter import run_filter

    curated = run_filter(f"{bucket}/scores", "quality > -1000", f"{bucket}/curated", options).to_dict()
    assert curated["shards"]["done"] == 4 and curated["samples"] == {"seen": 17, "kept": 16}
    kept = read_shard(f"{bucket}/curated/part-001.tar", options)
    assert [s["__key__"] for s in kept] == [s["__key__"] for i, s in enumerate(contents["part-001"]) if i != 2]
    assert all("quality" in json.loads(s["json"]) for s in kept)


def test_config_is_validated_at_the_edge(tmp_path):
    with pytest.raises(ValueError, match="^batch_size"):
        load_score_config(None, input=["a.tar"], output="out", models=["m"], batch_size=0)
    with pytest.raises(ValueError, match="^input"):
        load_score_config(None, output="out", models=["m"])
    with pytest.raises(ValueError, match="^storage.endpoint"):
        load_score_config(None, input=["a.tar"], output="o", models=["m"], storage={"endpoint": "x"})
    path = tmp_path / "c.yaml"
    path.write_text("input: [a.tar]\noutput: o\nmodels: [m]\nactors: two\n")
    with pytest.raises(ValueError, match=f"^{path}: actors"):          # the file's mistake names the file
        load_score_config(str(path))
    result = CliRunner().invoke(main, ["score", "--config", str(path)])
    assert result.exit_code != 0 and "actors" in result.output


def test_shards_with_the_same_name_are_refused_before_any_work(tmp_path, iqa_artifact):
    for d in ("a", "b"):
        write_shard(str(tmp_path / d / "shard-0.tar"), good_samples(0, 1))
    cfg = ScoreConfig(input=[str(tmp_path / "*" / "shard-0.tar")], output=str(tmp_path / "out"),
                      models=[iqa_artifact])
    with pytest.raises(ValueError, match="both write shard-0.parquet"):
        run_score(cfg)
    # the destination was checked first (it is writable) and nothing else was written there
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


def test_score_config_file_documents_every_option():
    import dataclasses

    import yaml

    from perceptclip.core.storage import StorageConfig

    text = (REPO / "configs" / "score.yaml").read_text()
    documented = yaml.safe_load(text)
    assert set(documented) == {f.name for f in dataclasses.fields(ScoreConfig)}
    assert set(documented["storage"]) == {f.name for f in dataclasses.fields(StorageConfig)}
    lines = text.splitlines()
    for name in documented:                  # every option has a comment right above it
        at = lines.index(f"{name}:") if f"{name}:" in lines else next(
            i for i, line in enumerate(lines) if line.startswith(f"{name}: "))
        assert lines[at - 1].startswith("#"), name


@pytest.mark.slow
def test_a_model_that_cannot_load_stops_the_run_with_a_summary(dataset, iqa_artifact, ray_local, tmp_path):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(iqa_artifact, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + b"\0" * 64)     # config.json still reads fine
    cfg = ScoreConfig(input=[str(dataset["root"] / "shard-000000.tar")], output=str(tmp_path / "out"),
                      models=[str(broken)])
    with pytest.raises(Exception, match="sha256"):
        run_score(cfg)
    (run,) = (tmp_path / "out" / "_runs").glob("*.json")
    summary = json.loads(run.read_text())
    assert "sha256" in summary["aborted"] and summary["shards"]["done"] == 0
    assert not list((tmp_path / "out").glob("*.parquet"))


@pytest.mark.slow
def test_sample_fraction_scores_a_seeded_share_then_the_full_run_completes(tmp_path, iqa_artifact, ray_local):
    for i in range(10):
        write_shard(str(tmp_path / "in" / f"part-{i:06d}.tar"), good_samples(i, 2))
    spec = str(tmp_path / "in" / "part-{000000..000009}.tar")
    out = str(tmp_path / "out")
    result = CliRunner().invoke(main, ["score", "--input", spec, "--output", out, "--model", iqa_artifact,
                                       "--sample-fraction", "0.3"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["sample"] == {"fraction": 0.3, "seed": 0, "not_sampled": 7}
    assert summary["shards"]["done"] == 3
    sampled = sorted(p.name for p in (tmp_path / "out" / "_markers").glob("*.json"))
    again = load_score_config(None, input=[spec], output=str(tmp_path / "other"), models=[iqa_artifact],
                              sample_fraction=0.3)
    from perceptclip.scoring.plan import plan_shards

    # the same listing and seed plan the same sample, wherever it is written
    assert sorted(f"{Path(u).stem}.json" for u in plan_shards(again, storage_options(again.storage)).todo) == sampled
    full = run_score(load_score_config(None, input=[spec], output=out, models=[iqa_artifact])).to_dict()
    assert full["sample"] is None and full["shards"]["skipped"] == 3 and full["shards"]["done"] == 7
    with pytest.raises(ValueError, match=r"^sample_fraction: must be a number <= 1, got 1.5"):
        load_score_config(None, input=[spec], output=out, models=[iqa_artifact], sample_fraction=1.5)


def test_the_decode_tasks_import_no_torch():
    """Every decode task process imports this module; torch would add seconds to each one's start."""
    code = ("import sys, perceptclip.scoring.decode; "
            "print(sorted(m for m in ('torch', 'torchvision', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_driver_reads_a_models_config_without_importing_torch(iqa_artifact):
    """The driver resolves a run's models and reads their configs (columns, provenance) without torch: it
    would add seconds to the start of every command that names a model."""
    code = ("import sys, json, perceptclip.cli, perceptclip.scoring.job\n"
            "from perceptclip.model.reference import ModelSpec\n"
            f"spec = ModelSpec.resolve({iqa_artifact!r})\n"
            "print(json.dumps([spec.columns, spec.describe()['weights_sha256'],\n"
            "                  sorted(m for m in ('torch', 'torchvision', 'open_clip') if m in sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    columns, digest, imported = json.loads(out)
    assert columns == ["iqa"] and len(digest) == 64
    assert imported == []


@pytest.mark.slow
def test_the_model_actor_skips_importing_transformers_timm_and_torchs_compiler(iqa_artifact):
    """open_clip imports transformers and timm whenever they are installed, and torch's compiler through
    torchvision (seconds of a scoring run's start-up); the actor loads its models without them, scores as
    a process that imported everything does, and leaves all three importable and torchvision's stand-in
    for the compiler's function working. (Slow: a fresh interpreter that imports torch, open_clip,
    transformers and timm.)"""
    from perceptclip.model.scorer import Scorer

    code = (
        "import sys, json, numpy as np\n"
        "from perceptclip.scoring.job import ModelActor\n"
        f"actor = ModelActor([('iqa', {iqa_artifact!r}, None)], [0], 1)\n"
        "crops = np.random.default_rng(0).integers(0, 256, (3, 1, 3, 32, 32), dtype=np.uint8)\n"
        "scores = actor.scorers[0].score(list(crops)).tolist()\n"
        "skipped = [m for m in ('transformers', 'timm', 'torch._dynamo') if m not in sys.modules]\n"
        "skipped = skipped if 'open_clip' in sys.modules else []\n"
        "import transformers, timm\n"
        "supported = sys.modules['torchvision.ops.roi_align'].is_compile_supported('cpu')\n"
        "import torch._dynamo.utils\n"
        "print(json.dumps({'skipped': skipped, 'scores': scores, 'supported': supported,\n"
        "                  'real': torch._dynamo.utils.is_compile_supported('cpu')}))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["skipped"] == ["transformers", "timm", "torch._dynamo"]
    assert out["supported"] is out["real"] is True
    import open_clip  # noqa: F401  (this process imports it with transformers and timm, as the driver does)

    crops = np.random.default_rng(0).integers(0, 256, (3, 1, 3, 32, 32), dtype=np.uint8)
    expected = Scorer.load(iqa_artifact).score(list(crops))
    np.testing.assert_allclose(np.array(out["scores"]), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_overwrite_uncommits_a_committed_shard_that_can_no_longer_be_read(tmp_path, iqa_artifact, ray_local):
    """An output whose two shards are committed (by the job's steps in this process), then the job with
    --overwrite after one shard was damaged: that shard fails and loses its marker, so a plain rerun
    plans it again."""
    from perceptclip.scoring.plan import plan_shards
    from support.scoring import score_here

    for i in range(2):
        write_shard(str(tmp_path / "shards" / f"part-{i}.tar"), good_samples(20 + i, 3))
    cfg = dict(input=[str(tmp_path / "shards" / "*.tar")], output=str(tmp_path / "out"), models=[iqa_artifact])
    assert [r.ok for r in score_here(cfg["input"], cfg["models"], cfg["output"])] == [3, 3]
    damaged = tmp_path / "shards" / "part-1.tar"
    intact = damaged.read_bytes()
    damaged.write_bytes(intact[: len(intact) // 2])
    summary = run_score(ScoreConfig(**cfg, overwrite=True))
    assert not summary.ok and [r.shard for r in summary.failed] == [str(damaged)]
    # its old scores no longer describe the shard: uncommitted, so a plain rerun retries it
    assert sorted(p.name for p in (tmp_path / "out" / "_markers").glob("*.json")) == ["part-0.json"]
    damaged.write_bytes(intact)
    plan = plan_shards(ScoreConfig(**cfg), {})
    assert (plan.todo, plan.skipped) == ([str(damaged)], [str(tmp_path / "shards" / "part-0.tar")])


def test_an_output_that_holds_the_input_shards_is_refused_before_any_work(tmp_path, iqa_artifact):
    write_shard(str(tmp_path / "data" / "part-0.tar"), good_samples(30, 2))
    for output in (tmp_path / "data", tmp_path):
        cfg = ScoreConfig(input=[str(tmp_path / "data" / "*.tar")], output=str(output), models=[iqa_artifact])
        with pytest.raises(ValueError, match=f"^output: {output} holds input shards"):
            run_score(cfg)
    assert not list((tmp_path / "data").glob("*.parquet")) and not (tmp_path / "data" / "_markers").exists()


def test_a_score_column_named_as_a_carried_column_is_refused_at_start(iqa_artifact):
    from perceptclip.model.reference import ModelSpec, check_columns

    check_columns([ModelSpec.resolve(f"quality={iqa_artifact}")], ["id"])
    with pytest.raises(ValueError, match="models: a carried column would be called 'id'; name the model NAME=MODEL"):
        check_columns([ModelSpec.resolve(f"id={iqa_artifact}")], ["id"])


def test_a_mistake_in_a_score_config_file_names_the_file(tmp_path):
    path = tmp_path / "score.yaml"
    path.write_text("batch_size: 0\n")
    with pytest.raises(ValueError, match=f"^{path}: batch_size: must be an integer >= 1, got 0$"):
        load_score_config(str(path), input=["a.tar"], output="out", models=["m"])
    with pytest.raises(ValueError, match="^block_rows: must be an integer >= 1, got 0$"):     # not the file's
        load_score_config(None, input=["a.tar"], output="out", models=["m"], block_rows=0)


@pytest.mark.parametrize("kind", ["shards", "image files"])
def test_an_output_inside_an_input_folder_is_refused(tmp_path, iqa_artifact, kind):
    """The next run over the folder would read the score tables written there as input."""
    folder = tmp_path / "data"
    if kind == "shards":
        write_shard(str(folder / "shard-0.tar"), good_samples(0, 2))
    else:
        (folder / "a").mkdir(parents=True)
        (folder / "a" / "x.jpg").write_bytes(image_bytes(make_image(1)))
    cfg = ScoreConfig(input=[str(folder)], output=str(folder / "scores"), models=[iqa_artifact])
    with pytest.raises(ValueError, match=f"output: {folder}/scores lies inside the input folder {folder}"):
        run_score(cfg)
    assert not list((folder / "scores").rglob("*.parquet"))
