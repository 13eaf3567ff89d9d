"""Evaluation with the scoring path, on shards written here, against tiny real artifacts."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from perceptclip.cli import main
from perceptclip.core.metrics import plcc, srcc
from perceptclip.core.tasks import EMOSET_LABELS
from perceptclip.model.preprocess import decode_image
from perceptclip.model.scorer import Scorer
from perceptclip.training.evaluate import evaluate
from support.images import image_bytes, make_image
from support.shards import write_labelled_shard


@pytest.fixture
def regression_shards(tmp_path):
    images = {f"k{i:03d}": image_bytes(make_image(i, (72, 56))) for i in range(24)}
    labels = {key: float(i % 7) / 7 for i, key in enumerate(images)}
    good = list(images)
    a = write_labelled_shard(tmp_path / "eval-000000.tar",
                             [(k, images[k], {"label": labels[k]}) for k in good[:12]]
                             + [("corrupt", b"\xff\xd8\xff garbage", {"label": 0.5})])
    b = write_labelled_shard(tmp_path / "eval-000001.tar",
                             [(k, images[k], {"label": labels[k]}) for k in good[12:]]
                             + [("nolabel", images["k000"], {"other": 1}), ("noimage", None, {"label": 0.1}),
                                ("deep", images["k001"], b"[" * 100_000)])
    return [a, b], images, labels


def test_regression_metrics_equal_the_scorers_own_outputs(iqa_artifact, regression_shards, tmp_path):
    shards, images, labels = regression_shards
    result = evaluate(iqa_artifact, shards + [str(tmp_path / "eval-000009.tar")], resamples=200, device="cpu")
    scorer = Scorer.load(iqa_artifact, device="cpu")
    keys = sorted(images)
    pred = scorer.score([scorer.preprocess(decode_image(images[k])) for k in keys])[:, 0]
    target = np.array([labels[k] for k in keys])
    assert result["n"] == 24 and result["task"] == "iqa"
    assert result["srcc"] == pytest.approx(srcc(pred, target), abs=1e-6)
    assert result["plcc"] == pytest.approx(plcc(pred, target), abs=1e-5)
    assert result["mse"] == pytest.approx(float(np.mean((pred - target) ** 2)), rel=1e-5)
    assert result["srcc_ci"][0] <= result["srcc"] <= result["srcc_ci"][1]
    assert result["plcc_ci"][0] <= result["plcc"] <= result["plcc_ci"][1]
    # nothing is dropped silently: the bad samples and the missing shard are counted by reason
    assert result["errors"] == 5
    assert result["error_reasons"] == {"not_an_image": 1, "bad_label": 2, "no_image": 1, "shard_missing": 1}


def test_classification_metrics_over_class_names_and_indices(emotion_artifact, tmp_path):
    samples = [(f"e{i}", image_bytes(make_image(100 + i)), {"label": EMOSET_LABELS[i % 8] if i % 2 else i % 8})
               for i in range(16)]
    shard = write_labelled_shard(tmp_path / "emo-000000.tar", samples)
    result = evaluate(emotion_artifact, shard, device="cpu")
    scorer = Scorer.load(emotion_artifact, device="cpu")
    pred = scorer.score([scorer.preprocess(decode_image(img)) for _, img, _ in samples]).argmax(1)
    target = np.array([i % 8 for i in range(16)])
    assert result["accuracy"] == pytest.approx(float((pred == target).mean()))
    assert np.array(result["confusion"]).shape == (8, 8) and np.array(result["confusion"]).sum() == 16
    assert result["labels"] == list(EMOSET_LABELS) and 0 <= result["macro_f1"] <= 1
    assert "srcc" not in result


def test_cli_evaluate_reads_shards_from_s3_and_writes_the_metrics_there(iqa_artifact, regression_shards, s3_server):
    shards, _, _ = regression_shards
    bucket = s3_server.bucket()
    fs = s3_server.filesystem()
    for path in shards:
        fs.put_file(path, f"{bucket[5:]}/data/{path.rsplit('/', 1)[1]}")
    data = f"{bucket}/data/eval-{{000000..000001}}.tar"
    result = CliRunner().invoke(main, ["evaluate", "--model", iqa_artifact, "--data", data,
                                       "--bootstrap", "100", "--device", "cpu", "--output", f"{bucket}/metrics.json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"srcc", "plcc", "mse", "srcc_ci", "plcc_ci"} <= set(printed) and printed["n"] == 24
    assert json.loads(fs.cat(f"{bucket[5:]}/metrics.json")) == printed


def strict_json(text: str):
    """``json.loads`` that refuses NaN and Infinity, which are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} is not valid JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("data", ["no labels", "a folder"])
def test_evaluate_with_no_usable_sample_fails_naming_the_reasons_and_writes_nothing(iqa_artifact, tmp_path, data):
    """Case 9 of "No silent harm": NaN metrics, n 0, exit 0, and NaN written into --output."""
    folder = tmp_path / "shards"
    shard = write_labelled_shard(folder / "eval-000000.tar",
                                 [(f"k{i}", image_bytes(make_image(i)), {"other": i}) for i in range(8)])
    spec = shard if data == "no labels" else str(folder)
    out = tmp_path / "metrics.json"
    result = CliRunner().invoke(main, ["evaluate", "--model", iqa_artifact, "--data", spec, "--device", "cpu",
                                       "--output", str(out)])
    assert result.exit_code != 0
    assert "no usable sample" in result.output and spec in result.output
    assert "bad_label 8" in result.output
    assert not out.exists()


def test_evaluate_fails_when_the_labels_cannot_be_ranked(iqa_artifact, tmp_path):
    shard = write_labelled_shard(tmp_path / "same-000000.tar",
                                 [(f"k{i}", image_bytes(make_image(i)), {"label": 0.5}) for i in range(5)])
    with pytest.raises(ValueError, match=r"srcc cannot be computed: all 5 usable labels are equal \(0.5\)"):
        evaluate(iqa_artifact, shard, device="cpu", resamples=0)


def test_metrics_that_cannot_be_computed_are_written_as_null_never_nan(iqa_artifact, tmp_path):
    """Two samples rank (srcc is +-1) but leave too few to bootstrap: the intervals are null."""
    shard = write_labelled_shard(tmp_path / "two-000000.tar",
                                 [(f"k{i}", image_bytes(make_image(i)), {"label": float(i)}) for i in range(2)])
    out = tmp_path / "metrics.json"
    result = CliRunner().invoke(main, ["evaluate", "--model", iqa_artifact, "--data", shard, "--device", "cpu",
                                       "--output", str(out)])
    assert result.exit_code == 0, result.output
    printed = strict_json(result.stdout.strip().splitlines()[-1])
    assert printed["n"] == 2 and printed["srcc_ci"] == [None, None]
    assert strict_json(out.read_text()) == printed


def test_evaluate_refuses_an_output_that_is_one_of_its_inputs(iqa_artifact, regression_shards, tmp_path):
    shards, _, _ = regression_shards
    before = open(shards[0], "rb").read()
    result = CliRunner().invoke(main, ["evaluate", "--model", iqa_artifact, "--data", shards[0], "--device", "cpu",
                                       "--output", shards[0]])
    assert result.exit_code != 0 and "apart" in result.output
    assert open(shards[0], "rb").read() == before
    inside = CliRunner().invoke(main, ["evaluate", "--model", iqa_artifact, "--data", shards[0], "--device", "cpu",
                                       "--output", f"{iqa_artifact}/config.json"])
    assert inside.exit_code != 0 and "apart" in inside.output


def test_a_float_is_not_a_class_label(emotion_artifact, tmp_path):
    """Case 10: an emotion model on float labels 0.0-4.0 used them as class indices (accuracy 0.0, n 8)."""
    shard = write_labelled_shard(tmp_path / "floats-000000.tar",
                                 [(f"e{i}", image_bytes(make_image(200 + i)), {"label": i / 2}) for i in range(9)])
    with pytest.raises(ValueError, match=r"no usable sample .*bad_label 9"):
        evaluate(emotion_artifact, shard, device="cpu")
    mixed = write_labelled_shard(tmp_path / "mixed-000000.tar",
                                 [("name", image_bytes(make_image(1)), {"label": "awe"}),
                                  ("index", image_bytes(make_image(2)), {"label": 3}),
                                  ("float", image_bytes(make_image(3)), {"label": 3.0}),
                                  ("true", image_bytes(make_image(4)), {"label": True})])
    result = evaluate(emotion_artifact, mixed, device="cpu")
    assert result["n"] == 2 and result["error_reasons"] == {"bad_label": 2}
