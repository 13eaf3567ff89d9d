"""One image, one score: an image's scores are the same bits whatever batch it is scored in, its position
there, the shard, the block size, the number of actors, and whether it came through ``Scorer``,
``predict``, the job's stages or the job itself. Each promise is first shown to fail without the padding
(``batch=0``: one unpadded model call per batch), on a model wide enough for that to happen."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from perceptclip.model.batching import canonical_batch
from perceptclip.model.config import BackboneConfig, ModelConfig
from perceptclip.model.preprocess import decode_image
from perceptclip.model.scorer import Scorer
from support.images import image_bytes, make_image
from support.wide_model import make_wide_artifact

OTHERS = (1, 6, 15, 32, 63)            # batches of 2, 7, 16, 33 and 64 images


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return make_wide_artifact(str(tmp_path_factory.mktemp("models") / "wide"), "memorability", seed=4)


@pytest.fixture(scope="module")
def wide_iqa(tmp_path_factory):
    return make_wide_artifact(str(tmp_path_factory.mktemp("models") / "wide-iqa"), "iqa", seed=5, crops=3)


def photos(count: int, seed: int = 0) -> list:
    return [decode_image(image_bytes(make_image(seed + i, (96 + 8 * (i % 4), 80)))) for i in range(count)]


def placements(scorer: Scorer, images: list) -> dict[str, bytes]:
    """The first image's outputs, as bytes: alone, then first and last in batches with the others."""
    crops = [scorer.preprocess(img) for img in images]
    found = {"alone": scorer.score(crops[:1])[0].tobytes()}
    for others in OTHERS:
        batch = crops[1:1 + others]
        found[f"first of {others + 1}"] = scorer.score(crops[:1] + batch)[0].tobytes()
        found[f"last of {others + 1}"] = scorer.score(batch + crops[:1])[-1].tobytes()
    return found


def test_the_canonical_batch_is_per_device_and_model_cost():
    from perceptclip.model.debug import tiny_model_config

    vit_l, vit_b = ModelConfig(), ModelConfig(backbone=BackboneConfig.from_open_clip("ViT-B-16", None))
    assert canonical_batch("cpu", vit_l) == canonical_batch("cpu", vit_b) == 1     # one image stays as fast
    assert canonical_batch("cpu", tiny_model_config()) == 8
    assert canonical_batch("cuda", vit_l) == canonical_batch("cuda", tiny_model_config()) == 64


def test_unpadded_calls_change_an_images_bits(wide):
    """The premise: without padding this model gives one image several float32 values."""
    found = placements(Scorer.load(wide, device="cpu", batch=0), photos(64))
    assert len(set(found.values())) > 1, "the model is too small to show batch dependence"


@pytest.mark.parametrize("batch", [None, 8])
def test_padded_calls_give_an_image_the_same_bits_in_any_batch(wide, batch):
    scorer = Scorer.load(wide, device="cpu", batch=batch)
    assert scorer.batch == (2 if batch is None else batch)
    found = placements(scorer, photos(64))
    assert len(set(found.values())) == 1, {k: np.frombuffer(v, np.float32) for k, v in found.items()}


def test_several_crops_an_image_too(wide_iqa):
    """iqa averages 3 crops an image: crop counts that do not fill a call are padded as well."""
    assert len(set(placements(Scorer.load(wide_iqa, device="cpu", batch=0), photos(34)).values())) > 1
    found = placements(Scorer.load(wide_iqa, device="cpu"), photos(34))
    assert len(set(found.values())) == 1


def test_predict_and_the_jobs_stages_give_the_bits_of_one_image_alone(wide, tmp_path):
    """``predict`` in batches of 3 and the job's stages (blocks of 5, two shards holding the images in
    other orders) give every image the value it gets scored alone."""
    from perceptclip.inputs.shards import write_shard
    from perceptclip.model.predict import predict
    from support.scoring import score_here

    data = [image_bytes(make_image(50 + i, (90 + 4 * i, 72))) for i in range(12)]
    paths = []
    for i, d in enumerate(data):
        paths.append(str(tmp_path / f"{i:02d}.jpg"))
        Path(paths[-1]).write_bytes(d)
    shards = [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    write_shard(shards[0], [{"__key__": f"{i:02d}", "jpg": data[i]} for i in range(7)])
    write_shard(shards[1], [{"__key__": f"{i:02d}", "jpg": data[i]} for i in reversed(range(3, 12))])
    scorer = Scorer.load(wide, device="cpu")
    alone = {f"{i:02d}": np.float32(scorer.score([scorer.preprocess(decode_image(d))])[0, 0])
             for i, d in enumerate(data)}

    predicted = {Path(row["path"]).stem: np.float32(row["memorability"])
                 for row in predict(paths, [scorer], batch_size=3)}
    assert predicted == alone

    score_here(shards, [wide], str(tmp_path / "scores"), block_rows=5)
    for name in ("a", "b"):
        table = pq.read_table(tmp_path / "scores" / f"{name}.parquet").to_pydict()
        for key, value in zip(table["key"], table["memorability"]):
            assert np.float32(value).tobytes() == alone[key].tobytes(), (name, key)


@pytest.mark.gpu
def test_on_cuda_in_bf16_an_image_keeps_its_bits(wide, wide_iqa):
    for artifact in (wide, wide_iqa):
        scorer = Scorer.load(artifact, device="cuda")
        assert scorer.precision == "bf16" and scorer.batch == 64
        found = placements(scorer, photos(70))
        assert len(set(found.values())) == 1, {k: np.frombuffer(v, np.float32) for k, v in found.items()}
