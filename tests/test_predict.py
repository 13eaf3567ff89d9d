import json

import numpy as np
from click.testing import CliRunner

from perceptclip.cli import main
from perceptclip.model.artifact import load_artifact
from perceptclip.model.preprocess import decode_image, normalize
from support.images import image_bytes, make_image


def _images(tmp_path, n=3):
    paths = []
    for i in range(n):
        p = tmp_path / f"img{i}.jpg"
        p.write_bytes(image_bytes(make_image(i, (70 + 10 * i, 50))))
        paths.append(str(p))
    return paths


def test_predict_prints_one_json_line_per_image_with_every_model(tmp_path, iqa_artifact, emotion_artifact):
    paths = _images(tmp_path)
    result = CliRunner().invoke(main, ["predict", *paths, "--model", iqa_artifact, "--model", emotion_artifact])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [r["path"] for r in rows] == paths
    for r in rows:
        assert isinstance(r["iqa"], float)
        assert r["emotion"] == max(r["emotion_probs"], key=r["emotion_probs"].get)
        assert abs(sum(r["emotion_probs"].values()) - 1) < 1e-5


def test_predict_score_equals_the_model_applied_by_hand(tmp_path, memorability_artifact):
    import torch

    path = _images(tmp_path, 1)[0]
    result = CliRunner().invoke(main, ["predict", path, "--model", memorability_artifact])
    got = json.loads(result.output)["memorability"]
    model, meta = load_artifact(memorability_artifact)
    img = decode_image(open(path, "rb").read())
    from torchvision import transforms as T

    x = normalize(T.PILToTensor()(T.CenterCrop(32)(T.Resize(32)(img))).unsqueeze(0), meta.preprocess.mean,
                  meta.preprocess.std)
    with torch.no_grad():
        expected = model(x)[0, 0].item()
    assert np.isclose(got, expected, rtol=1e-5, atol=1e-6)


def test_unreadable_images_get_an_error_and_the_rest_still_print(tmp_path, iqa_artifact):
    good = _images(tmp_path, 2)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    missing = str(tmp_path / "missing.jpg")
    result = CliRunner().invoke(main, ["predict", good[0], str(text), missing, good[1], "--model", iqa_artifact])
    assert result.exit_code == 1
    rows = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [r["path"] for r in rows] == [good[0], str(text), missing, good[1]]
    assert rows[1]["error"].startswith("not_an_image") and "iqa" not in rows[1]
    assert rows[2]["error"].startswith("missing")
    assert isinstance(rows[0]["iqa"], float) and isinstance(rows[3]["iqa"], float)


def test_model_errors_are_clear(tmp_path, iqa_artifact):
    path = _images(tmp_path, 1)[0]
    result = CliRunner().invoke(main, ["predict", path, "--model", str(tmp_path / "no-model")])
    assert result.exit_code != 0 and "no such model directory" in result.output
    result = CliRunner().invoke(main, ["predict", path, "--model", iqa_artifact, "--model", iqa_artifact])
    assert result.exit_code != 0 and "NAME=MODEL" in result.output
    result = CliRunner().invoke(main, ["predict", path, "--model", iqa_artifact, "--model", f"iqa2={iqa_artifact}"])
    assert result.exit_code == 0
    row = json.loads(result.output)
    assert row["iqa"] == row["iqa2"]
