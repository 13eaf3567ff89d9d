import os

import pytest

# Tests never touch the network: the Hugging Face hub is offline for every test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; run on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # artifacts fetched from object storage and converted releases go to a per-session cache
    monkeypatch.setenv("PERCEPTCLIP_CACHE", str(tmp_path_factory.getbasetemp() / "perceptclip-cache"))


@pytest.fixture(scope="session")
def iqa_artifact(tmp_path_factory):
    from pipeline.testing import make_tiny_artifact

    return make_tiny_artifact(str(tmp_path_factory.mktemp("models") / "iqa"), task="iqa", seed=1)


@pytest.fixture(scope="session")
def emotion_artifact(tmp_path_factory):
    from pipeline.testing import make_tiny_artifact

    return make_tiny_artifact(str(tmp_path_factory.mktemp("models") / "emotion"), task="emotion", seed=2)


@pytest.fixture(scope="session")
def memorability_artifact(tmp_path_factory):
    from pipeline.testing import make_tiny_artifact

    return make_tiny_artifact(str(tmp_path_factory.mktemp("models") / "memorability"), task="memorability", seed=3)
