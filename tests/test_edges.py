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
    """In a fresh interpreter (the test session may hold a cluster already): no Ray, nothing written."""
    import subprocess
    import sys

    code = ("import perceptclip, ray, sys\n"
            "try:\n"
            "    perceptclip.score(input=sys.argv[1], output=sys.argv[2], models=[sys.argv[3]])\n"
            "except ValueError as e:\n"
            "    print(e)\n"
            "print('ray started' if ray.is_initialized() else 'no ray')\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "no-such-shards" / "part-000.tar"),
                          str(tmp_path / "out"), iqa_artifact], capture_output=True, text=True, check=True).stdout
    assert out.startswith("input: nothing there: ") and "no-such-shards" in out
    assert out.rstrip().endswith("no ray")
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


@pytest.mark.parametrize("where", ["--address", "RAY_ADDRESS"])
def test_num_cpus_for_a_cluster_joined_is_refused_at_start_naming_it(where, tmp_path, iqa_artifact, monkeypatch):
    """``num_cpus`` sizes the local cluster a run starts; with a cluster named (the flag, or the environment
    that ``ray job submit`` sets), it is refused before any work, naming the cluster."""
    write_image_files(tmp_path / "imgs", ["a.jpg"])
    (tmp_path / "score.yaml").write_text("num_cpus: 2\n")
    args = ["score", "--config", str(tmp_path / "score.yaml"), "--input", str(tmp_path / "imgs"), "--output",
            str(tmp_path / "out"), "--model", iqa_artifact]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if where == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    else:
        args += ["--address", "10.1.2.3:6379"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert "num_cpus: only for a local cluster; this job joins 10.1.2.3:6379" in result.output
    assert not (tmp_path / "out").exists()


# --- input kinds that cannot be mistaken -------------------------------------------------------------------

def test_a_table_whose_location_column_holds_images_is_refused_at_start_naming_the_kind(tmp_path, iqa_artifact):
    from perceptclip.scoring.config import ScoreConfig
    from perceptclip.scoring.job import run_score
    from support.images import image_bytes, make_image
    from support.inputs import write_image_parquet

    hf = write_image_parquet(tmp_path / "hf-000.parquet", [image_bytes(make_image(1))])
    cfg = ScoreConfig(input=[hf], output=str(tmp_path / "out"), models=[iqa_artifact], input_kind="table")
    with pytest.raises(ValueError, match=r"column 'image' holds struct<.*not image locations.*--input-kind parquet"):
        run_score(cfg)
    assert not (tmp_path / "out").exists()            # nothing committed, nothing to skip on the corrected rerun


def test_a_jsonl_tables_columns_come_from_all_its_records(tmp_path, iqa_artifact):
    from support.scoring import score_here

    write_image_files(tmp_path / "imgs", ["a.jpg"])
    (tmp_path / "t.jsonl").write_text('{"id": "x", "note": "no image here"}\n{"id": "y", "path": "imgs/a.jpg"}\n')
    results = score_here([str(tmp_path / "t.jsonl")], [iqa_artifact], str(tmp_path / "scores"))
    assert [(r.rows, r.ok, dict(r.errors)) for r in results] == [(2, 1, {"no_image": 1})]


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_a_row_number_standing_in_for_a_key_never_passes_for_a_real_key(tmp_path, iqa_artifact, kind):
    """Numeric ids: row 1 has no id, so its number stands in, and row 0's real id is 1: both are
    duplicate_key, never one ok row and one error row under the same key."""
    import pyarrow.parquet as pq

    from perceptclip.inputs.base import InputSpec
    from support.images import image_bytes, make_image
    from support.inputs import write_image_parquet
    from support.scoring import score_here

    if kind == "csv":
        write_image_files(tmp_path / "imgs", ["a.jpg", "b.jpg", "c.jpg"])
        (tmp_path / "t.csv").write_text("id,path\n1,imgs/a.jpg\n,imgs/b.jpg\n7,imgs/c.jpg\n")
        shard = str(tmp_path / "t.csv")
    else:
        images = [image_bytes(make_image(i)) for i in range(3)]
        shard = write_image_parquet(tmp_path / "p-000.parquet", images, {"id": [1, None, 7]})
    score_here([shard], [iqa_artifact], str(tmp_path / "scores"), inputs=InputSpec(key_column="id"))
    table = pq.read_table(tmp_path / "scores" / f"{shard.rsplit('/', 1)[1].rsplit('.', 1)[0]}.parquet")
    rows = list(zip(table["key"].to_pylist(), table["status"].to_pylist(),
                    [e and e.split(":")[0] for e in table["error"].to_pylist()]))
    assert rows == [("1", "error", "duplicate_key"), ("1", "error", "duplicate_key"), ("7", "ok", None)]


def test_an_input_on_a_store_whose_library_is_missing_fails_at_start_naming_it(tmp_path):
    """A table of https URLs where aiohttp (fsspec's HTTP filesystem) is absent: one error at start, not
    one failed row per image."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['aiohttp'] = None\n"
            "from perceptclip.core.storage import check_protocols\n"
            "check_protocols(['/data/list.csv'])\n"
            "try:\n    check_protocols(['https://example.org/a.jpg'])\nexcept Exception as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("https:// URLs need a package that is not installed here") and "aiohttp" in out


# --- the user's columns --------------------------------------------------------------------------------------

def test_an_input_caption_fills_the_score_tables_caption(tmp_path, iqa_artifact):
    """Parquet rows carry their own caption: carried under its name, it fills the base column."""
    import pyarrow.parquet as pq

    from perceptclip.inputs.base import InputSpec
    from support.images import image_bytes, make_image
    from support.inputs import write_image_parquet
    from support.scoring import score_here

    shard = write_image_parquet(tmp_path / "p-000.parquet", [image_bytes(make_image(i)) for i in range(2)],
                                {"caption": ["a red door", None], "url": ["https://ex.org/0.jpg", "https://ex.org/1.jpg"]})
    score_here([shard], [iqa_artifact], str(tmp_path / "scores"), inputs=InputSpec(carry_columns=("caption", "url")))
    table = pq.read_table(tmp_path / "scores" / "p-000.parquet")
    assert table["caption"].to_pylist() == ["a red door", None]
    assert table["url"].to_pylist() == ["https://ex.org/0.jpg", "https://ex.org/1.jpg"]
    assert table.column_names.count("caption") == 1 and table.column_names.count("url") == 1


def test_a_parquet_input_with_its_own_score_named_column_is_refused_at_start(tmp_path, iqa_artifact):
    from perceptclip.scoring.config import ScoreConfig
    from perceptclip.scoring.job import run_score
    from support.images import image_bytes, make_image
    from support.inputs import write_image_parquet

    shard = write_image_parquet(tmp_path / "p-000.parquet", [image_bytes(make_image(1))], {"iqa": [0.3]})
    with pytest.raises(ValueError, match=r"column of its own named 'iqa'.*--model iqa_score="):
        run_score(ScoreConfig(input=[shard], output=str(tmp_path / "out"), models=[iqa_artifact]))
    assert not (tmp_path / "out").exists()


@pytest.fixture
def binary_files(tmp_path):
    write_image_files(tmp_path / "imgs", ["a.jpg", "b.jpg"])
    return str(tmp_path / "imgs")


@pytest.mark.slow
def test_add_scores_never_overwrites_a_column_of_a_dataset_whose_schema_is_not_known(binary_files, iqa_artifact,
                                                                                   ray_local):
    ds = ray_local.data.read_binary_files(binary_files).map(lambda row: {**row, "iqa": 1.0})
    assert ds.schema(fetch_if_missing=False) is None            # the premise: not known up front
    with pytest.raises(ValueError, match="already has a column 'iqa'"):
        perceptclip.add_scores(ds, [iqa_artifact], image_column="bytes")


@pytest.mark.slow
def test_add_scores_with_a_wrong_image_column_raises_at_the_call_naming_the_columns(binary_files, iqa_artifact,
                                                                                  ray_local):
    ds = ray_local.data.read_binary_files(binary_files)
    with pytest.raises(ValueError, match="image_column: the dataset has no column 'image'; its columns: bytes"):
        perceptclip.add_scores(ds, [iqa_artifact])


# --- the console ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ctrl_c_says_where_the_run_stood_then_why_it_stopped_and_prints_the_summary(tmp_path, iqa_artifact):
    import json
    import signal
    import subprocess
    import sys

    from perceptclip.inputs.shards import write_shard
    from support.images import image_bytes, make_image

    for s in range(300):
        write_shard(str(tmp_path / "shards" / f"part-{s:04d}.tar"),
                    [{"__key__": f"k{s}", "jpg": image_bytes(make_image(s, (24, 16)))}])
    proc = subprocess.Popen([sys.executable, "-c", "from perceptclip.cli import main; main()", "score", "--input",
                             str(tmp_path / "shards"), "--output", str(tmp_path / "out"), "--model", iqa_artifact],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:                     # a log (not a terminal): a line at the first shard done
        seen.append(line.rstrip("\n"))
        if line.startswith("[") and " shards, " in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    lines = seen + err.splitlines()
    assert proc.returncode == 130 and "Aborted!" not in err
    progress = [i for i, line in enumerate(lines) if line.startswith("[") and " shards, " in line]
    stopped = [i for i, line in enumerate(lines) if line.startswith("stopped with ")]
    assert stopped and progress and stopped[-1] > progress[-1] and stopped[-1] == len(lines) - 1, lines
    summary = json.loads(out)
    assert summary["aborted"].startswith("KeyboardInterrupt") and summary["shards"]["planned"] == 300
