import json

import pytest
import torch

from perceptclip.core.tasks import TASKS
from perceptclip.model.artifact import ArtifactError, ArtifactMeta, load_artifact, read_meta, save_artifact
from perceptclip.model.debug import tiny_model


def test_save_and_load_round_trip_exactly(tmp_path):
    model = tiny_model("emotion", seed=4)
    meta = ArtifactMeta.for_task("emotion", model.cfg, provenance={"source": "test"})
    save_artifact(model, meta, str(tmp_path / "m"))
    loaded, loaded_meta = load_artifact(str(tmp_path / "m"))
    assert loaded_meta.to_dict() == meta.to_dict()
    original, again = model.state_dict(), loaded.state_dict()
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["format_version"] == 2 and config["task"] == TASKS["emotion"].definition()
    assert config["model"]["lora"] == {"r": 4, "alpha": 8.0, "dropout": 0.1}
    assert config["model"]["head"]["size"] == 8 and config["preprocess"]["kind"] == "resize_center_crop"


def test_weights_that_do_not_match_the_checksum_are_refused(tmp_path):
    model = tiny_model("iqa")
    save_artifact(model, ArtifactMeta.for_task("iqa", model.cfg), str(tmp_path / "m"))
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        load_artifact(str(tmp_path / "m"))


def test_a_merged_model_cannot_be_saved(tmp_path):
    model = tiny_model("iqa").merge_lora()
    with pytest.raises(ArtifactError, match="merged"):
        save_artifact(model, ArtifactMeta.for_task("iqa", model.cfg), str(tmp_path / "m"))


def test_missing_and_malformed_artifacts_have_clear_errors(tmp_path):
    with pytest.raises(ArtifactError, match="no such model directory"):
        load_artifact(str(tmp_path / "nowhere"))
    (tmp_path / "bad").mkdir()
    with pytest.raises(ArtifactError, match="no config.json"):
        read_meta(str(tmp_path / "bad"))
    (tmp_path / "bad" / "config.json").write_text('{"format": "something-else"}')
    with pytest.raises(ArtifactError, match="not a perceptclip model config"):
        read_meta(str(tmp_path / "bad"))
