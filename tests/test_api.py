"""The Python API on a local Ray cluster: ``perceptclip.score`` runs the job as the command line does, and
``perceptclip.add_scores`` adds score columns to a user's dataset (``read_images`` over a folder,
``read_parquet`` of bytes, ``from_items``) with the bits ``score`` gives the same images, whatever the
blocks, batches and actors; a bad image is an error value in its row."""

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import perceptclip
from perceptclip.inputs.shards import write_shard
from perceptclip.model.preprocess import decode_image
from perceptclip.model.scorer import Scorer
from support.images import image_bytes, make_image
from support.wide_model import make_wide_artifact

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
COUNT = 13


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """13 JPEGs of several sizes in a folder and, the same bytes, in two shards."""
    root = tmp_path_factory.mktemp("photos")
    data = {f"{i:02d}": image_bytes(make_image(70 + i, (88 + 6 * (i % 5), 72))) for i in range(COUNT)}
    (root / "folder").mkdir()
    for key, d in data.items():
        (root / "folder" / f"{key}.jpg").write_bytes(d)
    keys = sorted(data)
    write_shard(str(root / "shards" / "a.tar"), [{"__key__": k, "jpg": data[k]} for k in keys[:6]])
    write_shard(str(root / "shards" / "b.tar"), [{"__key__": k, "jpg": data[k]} for k in keys[6:]])
    return {"root": root, "data": data}


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return make_wide_artifact(str(tmp_path_factory.mktemp("models") / "wide"), "memorability", seed=6)


@pytest.fixture(scope="module")
def alone(photos, wide):
    """Each image's score, scored by itself in this process."""
    scorer = Scorer.load(wide, device="cpu")
    return {k: np.float32(scorer.score([scorer.preprocess(decode_image(d))])[0, 0]) for k, d in photos["data"].items()}


def scores_by_key(table: dict, key: str = "key", column: str = "memorability") -> dict:
    return {Path(str(k)).stem: np.float32(v) for k, v in zip(table[key], table[column])}


@pytest.mark.parametrize("settings", [{"block_rows": 3, "batch_size": 5, "actors": 1},
                                      {"block_rows": 16, "batch_size": 64, "actors": 2, "cpus_per_actor": 0.5}])
def test_score_from_python_gives_every_image_its_own_bits(photos, wide, alone, ray_local, tmp_path, settings):
    summary = perceptclip.score(input=str(photos["root"] / "shards"), output=str(tmp_path / "out"), models=[wide],
                                **settings)
    assert summary.ok and len(summary.done) == 2 and summary.to_dict()["samples"]["total"] == COUNT
    table = pq.read_table(tmp_path / "out").to_pydict()
    assert scores_by_key(table) == alone


def test_score_from_python_refuses_a_bad_setting_before_any_work(photos, wide, tmp_path):
    with pytest.raises(ValueError, match="batch_size: must be an integer >= 1, got 0"):
        perceptclip.score(input=str(photos["root"] / "shards"), output=str(tmp_path / "out"), models=[wide],
                          batch_size=0)
    assert not (tmp_path / "out").exists()


def test_add_scores_on_read_images_gives_the_bits_of_score(photos, wide, alone, ray_local):
    ds = ray_local.data.read_images(str(photos["root"] / "folder"), include_paths=True)
    rows = perceptclip.add_scores(ds, [wide], batch_size=4).take_all()
    assert len(rows) == COUNT and all(r["error"] is None for r in rows)
    assert scores_by_key({"path": [r["path"] for r in rows], "memorability": [r["memorability"] for r in rows]},
                         key="path") == alone


def test_add_scores_on_parquet_bytes_keeps_every_row_and_says_why_one_failed(photos, wide, alone, ray_local,
                                                                               tmp_path):
    keys = sorted(photos["data"])
    images = [photos["data"][k] for k in keys] + [b"not an image", None, b""]
    ids = keys + ["garbage", "null", "empty"]
    pq.write_table(pa.table({"id": ids, "image": pa.array(images, pa.binary())}), tmp_path / "photos.parquet",
                   row_group_size=4)
    ds = ray_local.data.read_parquet(str(tmp_path / "photos.parquet"))
    rows = {r["id"]: r for r in perceptclip.add_scores(ds, [f"mem={wide}"], batch_size=3).take_all()}
    assert len(rows) == len(ids)
    assert {k: np.float32(rows[k]["mem"]) for k in keys} == alone
    assert rows["garbage"]["error"].startswith("not_an_image:") and rows["garbage"]["mem"] is None
    assert rows["null"]["error"].startswith("empty:") and rows["empty"]["error"].startswith("empty:")


def test_add_scores_on_items_takes_bytes_and_pixel_arrays(photos, wide, alone, ray_local):
    """A column holds bytes or arrays (Ray Data cannot mix them in one column): both give ``score``'s
    bits; an array that is not uint8 pixels is an error value in its row."""
    keys = sorted(photos["data"])[:3]
    pixels = [np.asarray(decode_image(photos["data"][k])) for k in keys]
    encoded = ray_local.data.from_items([{"name": k, "image": photos["data"][k]} for k in keys])
    arrays = ray_local.data.from_items([{"name": k, "image": p} for k, p in zip(keys, pixels)])
    floats = ray_local.data.from_items([{"name": "floats", "image": pixels[0].astype(np.float32)}])
    by_bytes = {r["name"]: np.float32(r["memorability"]) for r in perceptclip.add_scores(encoded, [wide]).take_all()}
    by_pixels = {r["name"]: np.float32(r["memorability"])
                 for r in perceptclip.add_scores(arrays, [wide], batch_size=2).take_all()}
    assert by_bytes == {k: alone[k] for k in keys} == by_pixels
    [row] = perceptclip.add_scores(floats, [wide]).take_all()
    assert row["error"].startswith("not_an_image: expected encoded bytes or HWC uint8 pixels")
    assert row["memorability"] is None


def test_add_scores_refuses_a_missing_image_column_or_a_taken_name(photos, wide, ray_local):
    ds = ray_local.data.from_items([{"picture": photos["data"]["00"], "memorability": 1.0}])
    with pytest.raises(ValueError, match=re.escape("image_column: the dataset has no column 'image'; "
                                                   "its columns: picture, memorability")):
        perceptclip.add_scores(ds, [wide])
    with pytest.raises(ValueError, match="already has a column 'memorability'; name the model NAME=MODEL"):
        perceptclip.add_scores(ds, [wide], image_column="picture")


def readme_python_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### From Python", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_python_examples_run(photos, ray_local, tmp_path, monkeypatch, capsys):
    """The README's examples as written, in a folder holding what they name; the released model's name
    stands for a wide test model of the same task."""
    import shutil

    model = make_wide_artifact(str(tmp_path / "models" / "iqa"), "iqa", seed=7)
    blocks = readme_python_blocks()
    assert len(blocks) >= 2, "the README's 'From Python' section lost its examples"
    shutil.copytree(photos["root"] / "shards", tmp_path / "demo-output" / "shards")
    shutil.copytree(photos["root"] / "folder", tmp_path / "photos")
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        # Ray's worker processes do not share this test's working directory: the folder read goes absolute
        block = block.replace('"perceptclip-iqa"', repr(model)).replace('"photos"', repr(str(tmp_path / "photos")))
        exec(compile(block, "README", "exec"), {})
    assert pq.read_table(tmp_path / "scores-py").num_rows == COUNT
    assert "'total': 13" in capsys.readouterr().out
    best = pq.read_table(tmp_path / "best-photos") if (tmp_path / "best-photos").exists() else None
    assert best is None or (best.column_names == ["path", "iqa"] and min(best["iqa"].to_pylist()) > 0.5)
