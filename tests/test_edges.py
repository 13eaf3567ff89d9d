"""The edges a user meets first: the package's names, flags that reach the config, inputs that cannot
be mistaken, and errors that say how to fix them, all before any work starts."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import perceptclip
from perceptclip.cli import main
from support.inputs import write_image_files


def test_the_package_lists_its_public_names():
    assert {"score", "add_scores", "Scorer", "__version__"} <= set(dir(perceptclip))


def test_score_from_python_on_an_input_that_is_not_there_raises_before_starting_ray(tmp_path, iqa_artifact):
    import ray

    with pytest.raises(ValueError, match="input: nothing there: .*no-such-shards"):
        perceptclip.score(input=str(tmp_path / "no-such-shards" / "part-000.tar"), output=str(tmp_path / "out"),
                          models=[iqa_artifact])
    assert not ray.is_initialized()
    assert not (tmp_path / "out").exists()


def test_score_help_describes_every_input_kind():
    text = CliRunner().invoke(main, ["score", "--help"]).output
    for kind in ("webdataset", "parquet", "table", "files", "auto"):
        assert kind in text
    assert "--image-column" in text and "--key-column" in text and "--carry-column" in text


@pytest.mark.parametrize("flag, value, message", [
    ("--image-column", "picture", "no image_column 'picture'"),
    ("--key-column", "ident", "no key_column 'ident'"),
    ("--carry-column", "note", "no carry_columns 'note'"),
])
def test_the_column_flags_reach_the_run(tmp_path, iqa_artifact, flag, value, message):
    """Each flag sets its config key: a column the table lacks is refused at start, naming it."""
    write_image_files(tmp_path / "imgs", ["a.jpg"])
    (tmp_path / "list.csv").write_text("path,id\nimgs/a.jpg,1\n")
    result = CliRunner().invoke(main, ["score", "--input", str(tmp_path / "list.csv"), "--output",
                                       str(tmp_path / "out"), "--model", iqa_artifact, flag, value])
    assert result.exit_code != 0 and message in result.output
    assert not (tmp_path / "out").exists()
