"""The released-checkpoint layout, built here with transformers CLIP + peft LoRA (tiny, random weights,
non-zero LoRA B), imported, and compared output for output with the reference module."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from perceptclip.model.artifact import ArtifactError, load_artifact
from perceptclip.model.official import CheckpointLayoutError, import_official
from perceptclip.model.reference import resolve_model
from perceptclip.model.scorer import Scorer
from support.release import IMAGE, LAYERS, RANK, write_release


@pytest.fixture(scope="module", params=[("iqa", 1), ("emotion", 8)], ids=["1-output", "8-class"])
def release(request, tmp_path_factory):
    return write_release(*request.param, tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def iqa_release(tmp_path_factory):
    return write_release("iqa", 1, tmp_path_factory.mktemp("release"))


def test_release_layout_has_the_documented_keys(release):
    _, _, path = release
    keys = set(torch.load(path, weights_only=True))
    assert "proj.weight" in keys and "mlp.fc3.bias" in keys
    assert "model.base_model.model.encoder.layers.1.self_attn.v_proj.lora_B.default.weight" in keys
    assert "model.base_model.model.pre_layrnorm.weight" in keys


def test_imported_model_matches_reference_outputs(release, tmp_path):
    task, ref, path = release
    meta = import_official(path, task, str(tmp_path / "model"))
    assert meta.model.backbone.vision["layers"] == LAYERS and meta.model.lora.r == RANK
    model, _ = load_artifact(str(tmp_path / "model"))
    torch.manual_seed(0)
    pixels = torch.randn(5, 3, IMAGE, IMAGE)
    with torch.no_grad():
        expected = ref(pixels)
        unmerged = model(pixels)
        merged = model.merge_lora()(pixels)
    for got in (unmerged, merged):
        rel = ((got - expected).abs().max() / expected.abs().max()).item()
        assert rel < 1e-5, rel
    # the LoRA really matters here: without it the outputs differ
    with torch.no_grad():
        ref.model.disable_adapter_layers()
        plain = ref(pixels)
        ref.model.enable_adapter_layers()
    assert (plain - expected).abs().max() > 1e-3


def test_import_official_cli_then_predict(release, tmp_path):
    from click.testing import CliRunner

    from perceptclip.cli import main
    from support.images import image_bytes, make_image

    task, _, path = release
    out = tmp_path / "model"
    result = CliRunner().invoke(main, ["import-official", str(path), "--task", task, "--output", str(out)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["task"]["name"] == task and config["provenance"]["file"] == path.name
    img = tmp_path / "a.jpg"
    img.write_bytes(image_bytes(make_image(1, (80, 60))))
    result = CliRunner().invoke(main, ["predict", str(img), "--model", str(out)])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output.strip().splitlines()[-1])
    assert row["path"] == str(img)
    if task == "emotion":
        assert row["emotion"] in row["emotion_probs"] and abs(sum(row["emotion_probs"].values()) - 1) < 1e-5
    else:
        assert isinstance(row["iqa"], float)


def test_wrong_task_for_the_head_is_refused(release, tmp_path):
    task, _, path = release
    other = "emotion" if task == "iqa" else "memorability"
    with pytest.raises(CheckpointLayoutError, match="head of size .* but task"):
        import_official(path, other, str(tmp_path / "m"))


def test_other_layouts_get_a_clear_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointLayoutError, match="not the PerceptCLIP release layout.*missing model.base_model"):
        import_official(path, "iqa", str(tmp_path / "m"))
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(CheckpointLayoutError, match="weights_only"):
        import_official(text, "iqa", str(tmp_path / "m"))
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        import_official(tmp_path / "missing.pth", "iqa", str(tmp_path / "m"))


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_carrying_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"proj.weight": _RunsCode()}, f)
    with pytest.raises(CheckpointLayoutError, match="weights_only"):
        import_official(path, "iqa", str(tmp_path / "m"))
    assert "this must never run" not in capsys.readouterr().out


def test_builtin_name_offline_says_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    with pytest.raises(ArtifactError) as err:
        resolve_model("perceptclip-memorability")
    message = str(err.value)
    assert "perceptCLIP_Memorability.pth" in message and "PerceptCLIP/PerceptCLIP_Memorability" in message
    assert "perceptclip import-official perceptCLIP_Memorability.pth --task memorability" in message


@pytest.mark.slow
def test_builtin_name_found_in_the_hub_cache_is_converted_once(iqa_release, tmp_path):
    """An offline machine whose Hugging Face cache already holds the release file converts it once, and
    resolves the name from the converted copy after. (Slow: the conversion runs in a fresh interpreter
    that imports torch, open_clip and transformers.)"""
    _, ref, path = iqa_release
    cache = tmp_path / "hf"
    snapshot = cache / "models--PerceptCLIP--PerceptCLIP_IQA" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "perceptCLIP_IQA.pth").write_bytes(path.read_bytes())
    (cache / "models--PerceptCLIP--PerceptCLIP_IQA" / "refs").mkdir()
    (cache / "models--PerceptCLIP--PerceptCLIP_IQA" / "refs" / "main").write_text("0" * 40)
    # huggingface_hub reads its environment at import: a fresh process, as on a real offline machine
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PERCEPTCLIP_CACHE": str(tmp_path / "pc")}
    resolve = [sys.executable, "-c",
               "from perceptclip.model.reference import resolve_model; print(resolve_model('perceptclip-iqa'))"]
    first = subprocess.run(resolve, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert first.startswith(str(tmp_path / "pc"))
    (snapshot / "perceptCLIP_IQA.pth").unlink()          # converted once: the cache no longer needs the hub
    again = subprocess.run(resolve, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert again == first
    scorer = Scorer.load(first, device="cpu")
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        assert torch.allclose(scorer.model(pixels), ref(pixels), rtol=1e-5, atol=1e-6)


def test_unknown_builtin_name(tmp_path):
    with pytest.raises(ArtifactError, match="unknown built-in model 'perceptclip-aesthetics'"):
        resolve_model("perceptclip-aesthetics")
