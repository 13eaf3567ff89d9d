"""The destination (``output.destination``): every command that writes opens its output there first. It
refuses, before writing anything, an output equal to, inside or around an input, and a rerun made
otherwise (unless ``--overwrite``, which removes what the earlier run made, and only that)."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from perceptclip.cli import main
from perceptclip.curation.filter import run_filter
from perceptclip.model.debug import make_tiny_artifact
from perceptclip.output.destination import OutputRefused
from perceptclip.scoring.config import ScoreConfig
from perceptclip.scoring.job import run_score
from support.images import image_bytes, make_image
from support.inputs import write_image_files
from support.scoring import score_here

EVERYTHING = "iqa > -1000"


def files(folder) -> list[str]:
    """Every file under ``folder``, relative, sorted (nothing: an empty list, also when it is absent)."""
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def score_folder(folder, dest, model: str) -> None:
    """Score a folder of image files into ``dest`` as the job does (virtual shards recorded, then scored)."""
    score_here([str(folder)], [model], str(dest), block_rows=4)


@pytest.fixture
def photos(tmp_path):
    write_image_files(tmp_path / "photos", ["a.jpg", "b.jpg", "sub/c.png"])
    return tmp_path / "photos"


# --- case 1: a curation written into (or around) the folder of images that was scored ----------------------

@pytest.mark.parametrize("where", ["the folder", "its parent", "inside it"])
def test_filter_into_or_around_the_scored_folder_of_images_is_refused(tmp_path, photos, iqa_artifact, where):
    """A curated Parquet inside the scored folder would be read as input by the next score run over it."""
    score_folder(photos, tmp_path / "scores", iqa_artifact)
    output = {"the folder": photos, "its parent": tmp_path, "inside it": photos / "curated"}[where]
    before = files(tmp_path)
    with pytest.raises(OutputRefused, match="--output: .*(holds|lies inside) the (scored input|score tables)"):
        run_filter(str(tmp_path / "scores"), EVERYTHING, str(output), {})
    assert files(tmp_path) == before


def test_an_input_folder_named_through_a_link_is_the_folder_it_points_to(tmp_path, photos, iqa_artifact):
    """Scored through a symbolic link, the folder is still refused as an output, by its real path."""
    os.symlink(photos, tmp_path / "link")
    score_folder(tmp_path / "link", tmp_path / "scores", iqa_artifact)
    with pytest.raises(OutputRefused, match="lies inside the scored input"):
        run_filter(str(tmp_path / "scores"), EVERYTHING, str(photos / "curated"), {})
    cfg = ScoreConfig(input=[str(tmp_path / "link")], output=str(photos / "scores"), models=[iqa_artifact])
    with pytest.raises(OutputRefused, match="lies inside the input folder"):
        run_score(cfg)
    assert not (photos / "scores").exists()


@pytest.mark.parametrize("where", ["parent", "same"])
def test_a_score_output_around_or_equal_to_the_input_folder_is_refused(tmp_path, photos, iqa_artifact, where):
    output = tmp_path if where == "parent" else photos
    before = files(tmp_path)
    with pytest.raises(OutputRefused, match=f"output: {output} holds"):
        run_score(ScoreConfig(input=[str(photos)], output=str(output), models=[iqa_artifact]))
    assert files(tmp_path) == before


def test_a_table_whose_images_lie_in_the_output_is_refused(tmp_path, iqa_artifact):
    write_image_files(tmp_path / "out" / "imgs", ["a.jpg", "b.jpg"])
    (tmp_path / "list.csv").write_text("path\nout/imgs/a.jpg\nout/imgs/b.jpg\n")
    before = files(tmp_path)
    with pytest.raises(OutputRefused, match="holds images that the table .*list.csv names"):
        run_score(ScoreConfig(input=[str(tmp_path / "list.csv")], output=str(tmp_path / "out"),
                              models=[iqa_artifact]))
    assert files(tmp_path) == before


# --- case 2: a filter rerun with another --format ------------------------------------------------------------

def test_a_filter_rerun_with_another_format_is_refused_and_overwrite_leaves_only_the_new_curation(
        tmp_path, photos, iqa_artifact):
    score_folder(photos, tmp_path / "scores", iqa_artifact)
    curated = tmp_path / "curated"
    first = run_filter(str(tmp_path / "scores"), EVERYTHING, str(curated), {})
    assert first.ok and [p for p in files(curated) if not p.startswith("_")] == ["photos-000000.parquet"]
    with pytest.raises(OutputRefused, match="format: auto -> webdataset"):
        run_filter(str(tmp_path / "scores"), EVERYTHING, str(curated), {}, form="webdataset")
    assert [p for p in files(curated) if not p.startswith("_")] == ["photos-000000.parquet"]

    again = run_filter(str(tmp_path / "scores"), EVERYTHING, str(curated), {}, form="webdataset", overwrite=True)
    assert again.ok and len(again.done) == 1
    assert [p for p in files(curated) if not p.startswith("_")] == ["photos-000000.tar"]
    record = json.loads((curated / "_output.json").read_text())
    assert record["settings"] == {"where": EVERYTHING, "format": "webdataset"}


def test_overwrite_removes_only_what_the_earlier_run_made(tmp_path, photos, iqa_artifact):
    score_folder(photos, tmp_path / "scores", iqa_artifact)
    curated = tmp_path / "curated"
    run_filter(str(tmp_path / "scores"), EVERYTHING, str(curated), {})
    (curated / "notes.txt").write_text("the curator's own file")
    run_filter(str(tmp_path / "scores"), "iqa > 1000", str(curated), {}, overwrite=True)
    assert (curated / "notes.txt").read_text() == "the curator's own file"


# --- case 3: a scoring rerun with other weights for the same task ---------------------------------------------

def test_a_scoring_rerun_with_other_weights_is_refused_naming_them(tmp_path, photos, iqa_artifact):
    dest = tmp_path / "scores"
    score_folder(photos, dest, iqa_artifact)
    make_tiny_artifact(str(tmp_path / "other-iqa"), task="iqa", seed=9)
    old_weights = json.loads((dest / "_output.json").read_text())["settings"]["models"]["iqa"]["weights"]
    new_weights = json.loads((tmp_path / "other-iqa" / "config.json").read_text())["weights"]["sha256"]
    before = {p: (dest / p).read_bytes() for p in files(dest)}
    write_image_files(photos, ["d.jpg"])                     # a new image: the rerun would score it
    cfg = ScoreConfig(input=[str(photos)], output=str(dest), models=[f"iqa={tmp_path / 'other-iqa'}"])
    with pytest.raises(OutputRefused, match=f"models.iqa.weights: {old_weights[:6]} -> {new_weights[:6]}"):
        run_score(cfg)
    assert {p: (dest / p).read_bytes() for p in files(dest)} == before

    # --overwrite: the earlier tables go, and every table then holds the new model's scores
    score_here([str(photos)], [f"iqa={tmp_path / 'other-iqa'}"], str(dest), overwrite=True)
    tables = [p for p in files(dest) if p.endswith(".parquet") and not p.startswith("_")]
    assert tables
    for table in tables:
        models = json.loads(pq.read_schema(dest / table).metadata[b"perceptclip"])["models"]
        assert [m["weights_sha256"] for m in models] == [new_weights]


def test_an_output_scored_before_records_is_checked_by_its_markers(tmp_path, photos, iqa_artifact):
    """Outputs written before ``_output.json`` existed: the weights their markers name are the record."""
    dest = tmp_path / "scores"
    score_folder(photos, dest, iqa_artifact)
    (dest / "_output.json").unlink()
    other = make_tiny_artifact(str(tmp_path / "other-iqa"), task="iqa", seed=9)
    with pytest.raises(OutputRefused, match="models.iqa.weights"):
        run_score(ScoreConfig(input=[str(photos)], output=str(dest), models=[f"iqa={other}"]))


# --- case 4: conversions into one output with other split settings --------------------------------------------

def write_manifest(folder, n: int = 20):
    (folder / "pics").mkdir(parents=True)
    lines = ["path,label"]
    for i in range(n):
        (folder / "pics" / f"p{i:02d}.jpg").write_bytes(image_bytes(make_image(700 + i, (24, 16))))
        lines.append(f"pics/p{i:02d}.jpg,{i / n:.2f}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder / "labels.csv"


@pytest.mark.parametrize("other", [["--seed", "1"], ["--fractions", "train=0.5,val=0.25,test=0.25"]])
def test_a_conversion_with_other_split_settings_into_the_same_output_is_refused(tmp_path, other):
    """A sample would be in two splits: the test split of seed 1 overlaps the train split of seed 0."""
    manifest = write_manifest(tmp_path)
    out = tmp_path / "labelled"
    first = CliRunner().invoke(main, ["convert", "manifest", str(manifest), "--split", "train", "--output", str(out)])
    assert first.exit_code == 0, first.output
    before = files(out)
    for overwrite in ([], ["--overwrite"]):
        refused = CliRunner().invoke(main, ["convert", "manifest", str(manifest), "--split", "test", "--output",
                                            str(out), *other, *overwrite])
        assert refused.exit_code != 0
        assert "two splits" in refused.output and "partition." in refused.output
        assert files(out) == before
    same = CliRunner().invoke(main, ["convert", "manifest", str(manifest), "--split", "test", "--output", str(out)])
    assert same.exit_code == 0, same.output


# --- case 5: a refused run writes nothing ---------------------------------------------------------------------

def test_a_refused_run_leaves_no_trace_even_inside_an_input_folder(tmp_path, photos, iqa_artifact):
    before = files(tmp_path)
    result = CliRunner().invoke(main, ["score", "--input", str(photos), "--output", str(photos / "scores"),
                                       "--model", iqa_artifact])
    assert result.exit_code != 0 and "lies inside the input folder" in result.output
    assert files(tmp_path) == before and not (photos / "scores").exists()


def test_an_output_of_another_command_is_refused(tmp_path, photos, iqa_artifact):
    score_folder(photos, tmp_path / "scores", iqa_artifact)
    run_filter(str(tmp_path / "scores"), EVERYTHING, str(tmp_path / "curated"), {})
    with pytest.raises(OutputRefused, match="holds the output of `perceptclip filter`"):
        run_score(ScoreConfig(input=[str(photos)], output=str(tmp_path / "curated"), models=[iqa_artifact]))
