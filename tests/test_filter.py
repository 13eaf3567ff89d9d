"""Curation: the keep-expression language, and filter end to end on real shards scored by the job's stages in this
process (``support.scoring``)."""

import ast
import io
import json
import shutil
import threading
import weakref

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from perceptclip.cli import main
from perceptclip.core.storage import read_parquet
from perceptclip.curation.expression import ExpressionError, kept_rows, parse_expression
from perceptclip.curation.filter import safe_member_name
from perceptclip.inputs.shards import read_shard, write_shard
from support.images import image_bytes, make_image
from support.scoring import score_here

TABLE = pa.table({
    "key": ["a", "b", "c", "d", "e"],
    "status": ["ok", "ok", "error", "ok", "ok"],
    "iqa": pa.array([0.7, 0.5, None, 0.9, -0.2], pa.float32()),
    "emotion": ["awe", "fear", None, "awe", "anger"],
    "width": pa.array([10, 20, None, 30, 40], pa.int32()),
})


def test_a_parquet_file_read_whole_is_let_go_by_the_time_the_read_returns():
    """``read_parquet`` (score tables, listings and manifests read whole): Arrow holds nothing of the file
    once it returns, so no Arrow thread lets go of it later, while a command's process exits (which
    aborts the process, exit 134, after its work is done)."""
    buf = io.BytesIO()
    pq.write_table(TABLE, buf)
    released_in = []

    class File(io.BytesIO):
        def __del__(self):
            released_in.append(threading.current_thread().name)

    for _ in range(50):
        file = File(buf.getvalue())
        held = weakref.ref(file)
        assert read_parquet(file, columns=["key", "iqa"]).equals(TABLE.select(["key", "iqa"]))
        del file
        assert held() is None
    assert released_in == [threading.current_thread().name] * 50


@pytest.mark.parametrize("where,kept", [
    ('iqa > 0.6 and emotion != "fear"', ["a", "d"]),
    ("emotion not in ['fear', 'anger']", ["a", "d"]),
    ("not iqa > 0.6", ["b", "e"]),
    ("0.4 < iqa <= 0.8", ["a", "b"]),
    ('iqa > 0.8 or (emotion in ("fear",) and width >= 20)', ["b", "d"]),
    ("iqa < -0.1", ["e"]),
    ("not (emotion == 'awe')", ["b", "e"]),       # the error row (c) is never kept, even where null negates
])
def test_expressions_select_rows(where, kept):
    expression = parse_expression(where)
    expression.check(TABLE.schema)
    assert kept_rows(TABLE, expression)["key"].to_pylist() == kept


@pytest.mark.parametrize("where,message", [
    ("iqa >", "cannot parse"),
    ("iqa = 0.5", "cannot parse"),
    ('__import__("os").system("true")', "only comparisons"),
    ("iqa + 1 > 2", "expected a column, a number"),
    ("iqa", "bare column"),
    ("emotion == 3", "emotion is text; compare it with a quoted string"),
    ("iqa > 'high'", "iqa is number; compare it with a number"),
    ("emotion in ['awe', 1]", "emotion is text"),
    ("sharpness > 0.5", "no column 'sharpness'"),
    ("", "empty"),
    ("iqa in emotion", "'in' takes a column on the left and a list"),
    ("0.5 < 0.7", "needs a column"),
    ("[x for x in y]", "only comparisons"),
    # nothing that could reach code: attributes, subscripts, calls, lambdas, f-strings, walrus, unpacking
    ("iqa.__class__ > 1", "expected a column"),
    ("key[0] == 'a'", "expected a column"),
    ("iqa > float('nan')", "expected a column"),
    ("(lambda: 1)() > iqa", "expected a column"),
    ("f'{iqa}' == 'x'", "expected a column"),
    ("(x := 1) > iqa", "expected a column"),
    ("iqa in [*emotion]", "expected a column"),
    ("iqa if iqa > 1 else iqa < 0", "only comparisons"),
    ("iqa > 1; import os", "cannot parse"),
    ("iqa\0 > 1", "cannot parse"),
    ("not " * 5000 + "iqa > 1", "nested more than 100 levels"),     # Python's parser gives up with RecursionError
    ("not " * 150 + "iqa > 1", "nested more than 100 levels"),
])
def test_bad_expressions_name_the_problem(where, message):
    with pytest.raises(ExpressionError, match=message):
        parse_expression(where).check(TABLE.schema)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, iqa_artifact, emotion_artifact):
    """Two shards of 8 samples (one not an image, one without its .json) scored with an IQA and an emotion
    model by the job's stages in this process (``support.scoring``)."""
    root = tmp_path_factory.mktemp("filter")
    shards = {}
    for s in range(2):
        samples = []
        for i in range(8):
            key = f"{s}{i:03d}"
            sample = {"__key__": key, "jpg": image_bytes(make_image(300 + 10 * s + i, (64, 48))),
                      "json": json.dumps({"url": f"https://example.com/{key}.jpg", "caption": "x"}).encode()}
            if i == 5:
                sample["jpg"] = b"not an image"
            if i == 6:
                del sample["json"]                     # no .json yet: the filter creates one
            samples.append(sample)
        shards[f"shard-{s}"] = samples
        write_shard(str(root / "shards" / f"shard-{s}.tar"), samples)
    results = score_here([str(root / "shards" / "*.tar")], [iqa_artifact, emotion_artifact], str(root / "scores"))
    assert [r.failed for r in results] == [None, None]
    return root, shards


def expected_keys(scores, name, threshold):
    rows = pq.read_table(scores / f"{name}.parquet").to_pylist()
    return [r["key"] for r in rows if r["status"] == "ok" and r["iqa"] > threshold]


def test_filter_writes_only_kept_samples_with_their_scores(scored):
    root, shards = scored
    scores, out = root / "scores", root / "curated"
    all_iqa = sorted(v for v in pq.read_table(scores / "shard-0.parquet")["iqa"].to_pylist() if v is not None)
    threshold = all_iqa[len(all_iqa) // 2]
    result = CliRunner().invoke(main, ["filter", "--scores", str(scores), "--where", f"iqa > {threshold!r}",
                                       "--output", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["shards"] == {"planned": 2, "done": 2, "skipped": 0, "failed": 0}
    for name, samples in shards.items():
        keep = expected_keys(scores, name, threshold)
        table = {r["key"]: r for r in pq.read_table(scores / f"{name}.parquet").to_pylist()}
        curated = read_shard(str(out / f"{name}.tar"))
        assert [s["__key__"] for s in curated] == keep and keep
        originals = {s["__key__"]: s for s in samples}
        for sample in curated:
            original = originals[sample["__key__"]]
            assert sample["jpg"] == original["jpg"]
            meta = json.loads(sample["json"])
            if "json" in original:
                assert meta["url"] == json.loads(original["json"])["url"]
            row = table[sample["__key__"]]
            assert meta["iqa"] == pytest.approx(row["iqa"]) and meta["emotion"] == row["emotion"]
            assert meta["emotion_awe"] == pytest.approx(row["emotion_awe"])
        marker = json.loads((out / "_markers" / f"{name}.json").read_text())
        assert marker["kept"] == len(keep) and marker["of"] == len(samples)


def test_filter_resumes_per_shard(scored):
    root, _ = scored
    scores, out = root / "scores", root / "curated-resume"
    args = ["filter", "--scores", str(scores), "--where", "emotion != 'fear'", "--output", str(out)]
    assert CliRunner().invoke(main, args).exit_code == 0
    untouched = (out / "shard-0.tar").stat().st_mtime_ns
    (out / "_markers" / "shard-1.json").unlink()
    result = CliRunner().invoke(main, args)
    assert json.loads(result.stdout)["shards"] == {"planned": 2, "done": 1, "skipped": 1, "failed": 0}
    assert (out / "shard-0.tar").stat().st_mtime_ns == untouched
    assert (out / "_markers" / "shard-1.json").exists()


def test_bad_expression_fails_before_any_work(scored):
    root, _ = scored
    result = CliRunner().invoke(main, ["filter", "--scores", str(root / "scores"), "--where", "quality > 0.5",
                                       "--output", str(root / "never")])
    assert result.exit_code != 0 and "no column 'quality'" in result.output
    assert not (root / "never").exists()


def test_a_vanished_shard_fails_and_is_retried(scored, tmp_path):
    root, shards = scored
    moved = root / "shards" / "shard-1.tar"
    data = moved.read_bytes()
    moved.unlink()
    try:
        result = CliRunner().invoke(main, ["filter", "--scores", str(root / "scores"), "--where", "iqa > -100",
                                           "--output", str(tmp_path)])
    finally:
        moved.write_bytes(data)
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["failed_shards"][0]["reason"] == "missing"
    assert not (tmp_path / "_markers" / "shard-1.json").exists()
    result = CliRunner().invoke(main, ["filter", "--scores", str(root / "scores"), "--where", "iqa > -100",
                                       "--output", str(tmp_path)])
    assert json.loads(result.stdout)["shards"]["done"] == 1
    assert len(read_shard(str(tmp_path / "shard-1.tar"))) == len(shards["shard-1"]) - 1     # all but the bad image


OPS = {"<": float.__lt__, "<=": float.__le__, ">": float.__gt__, ">=": float.__ge__, "==": float.__eq__,
       "!=": float.__ne__}


def test_expressions_agree_with_a_python_reference():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    value = st.one_of(st.none(), st.floats(-2, 2, width=32))
    label = st.sampled_from(["awe", "fear", "anger"])

    @settings(max_examples=150, deadline=None)
    @given(rows=st.lists(st.tuples(value, label), max_size=12), a=st.floats(-2, 2, width=32),
           b=st.floats(-2, 2, width=32), op1=st.sampled_from(sorted(OPS)), op2=st.sampled_from(sorted(OPS)),
           joiner=st.sampled_from(["and", "or"]), negate=st.booleans(), labels=st.sets(label, min_size=1))
    def check(rows, a, b, op1, op2, joiner, negate, labels):
        table = pa.table({"key": [str(i) for i in range(len(rows))],
                          "status": ["error" if v is None else "ok" for v, _ in rows],
                          "iqa": pa.array([v for v, _ in rows], pa.float32()),
                          "emotion": pa.array([None if v is None else e for v, e in rows], pa.string())})
        where = f"({'not ' if negate else ''}iqa {op1} {a!r}) {joiner} (iqa {op2} {b!r} and emotion in {sorted(labels)!r})"
        expression = parse_expression(where)
        expression.check(table.schema)

        def keep(v, e):
            first = OPS[op1](float(v), a) != negate
            second = OPS[op2](float(v), b) and e in labels
            return first and second if joiner == "and" else first or second

        expected = [str(i) for i, (v, e) in enumerate(rows) if v is not None and keep(v, e)]
        assert kept_rows(table, expression)["key"].to_pylist() == expected

    check()


@pytest.mark.parametrize("name,safe", [
    ("k.jpg", True), ("dir/sub/k.jpg", True), ("..k.jpg", True), ("k...jpg", True), ("café/東京.jpg", True),
    ("../k.jpg", False), ("a/../../k.jpg", False), ("/abs/k.jpg", False), ("a\\..\\k.jpg", False),
    ("\\k.jpg", False), ("C:k.jpg", False), ("k\0.jpg", False),
])
def test_member_names_that_would_extract_outside_the_folder(name, safe):
    assert safe_member_name(name) is safe


def test_safe_member_names_stay_inside_for_python_tarfile_too(tmp_path):
    import tarfile

    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=300, deadline=None)
    @given(name=st.text(alphabet="./\\a:C", min_size=1, max_size=12))
    def check(name):
        if not safe_member_name(name):
            return
        try:
            tarfile.data_filter(tarfile.TarInfo(name), str(tmp_path))
        except (tarfile.AbsolutePathError, tarfile.OutsideDestinationError) as e:
            pytest.fail(f"{name!r} passed as safe, but {e}")

    check()


@pytest.mark.parametrize("shard,name", [
    ("s3://bucket/x/shard-000001.tar", "shard-000001"), ("/data/part.tar.gz", "part"), ("/data/.hidden.tar", ".hidden"),
    ("/data/..", None), ("s3://bucket/x/../", None), ("/data/a\\..\\b.tar", None), ("s3://b/C:x.tar", None),
])
def test_curated_shards_are_named_only_after_a_plain_shard_file_name(shard, name):
    from perceptclip.curation.filter import output_name
    from perceptclip.inputs.shards import ShardError

    if name is not None:
        assert output_name(shard) == name
        return
    with pytest.raises(ShardError) as e:
        output_name(shard)
    assert e.value.reason == "unsafe_name"


ALLOWED_NODES = (ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.UAdd, ast.Compare, ast.Lt, ast.LtE,
                 ast.Gt, ast.GtE, ast.Eq, ast.NotEq, ast.In, ast.NotIn, ast.Name, ast.Load, ast.Constant, ast.List,
                 ast.Tuple, ast.Set)


def test_no_text_gets_past_the_parser_but_the_language():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    tokens = st.sampled_from(["iqa", "emotion", "key", "__import__", "os", "system", "open", "eval", ".", ",", "(",
                              ")", "[", "]", "{", "}", ":", "lambda", "not", "and", "or", "in", "if", "else", "for",
                              "<", "==", ">", "!=", "-", "+", "*", "**", "=", ":=", "'x'", "1", "0.5", "true", "\\",
                              "f'{iqa}'", "@", ";", "\n", " "])

    @settings(max_examples=400, deadline=None)
    @given(text=st.one_of(st.lists(tokens, max_size=14).map(" ".join), st.text(max_size=40)))
    def check(text):
        try:
            expression = parse_expression(text)
        except ExpressionError:
            return
        assert all(isinstance(node, ALLOWED_NODES) for node in ast.walk(expression.tree)), ast.dump(expression.tree)

    check()


# --- no silent harm: the output never holds the inputs, a rerun never mixes two curations ------------

def _filter(scores, where, output, *extra):
    return CliRunner().invoke(main, ["filter", "--scores", str(scores), "--where", where, "--output", str(output),
                                     *extra])


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target", ["shards", "scores", "root", "inside-scores"])
def test_an_output_that_holds_the_inputs_is_refused_before_any_write(scored, target):
    root, _ = scored
    output = {"shards": root / "shards", "scores": root / "scores", "root": root,
              "inside-scores": root / "scores" / "curated"}[target]
    before = _snapshot(root)
    for extra in ((), ("--overwrite",)):
        result = _filter(root / "scores", "iqa > -100", output, *extra)
        assert result.exit_code != 0, result.output
        assert "--output" in result.output and ("holds" in result.output or "lies inside" in result.output)
    assert _snapshot(root) == before                       # not one byte of the shards or the scores changed


def test_a_rerun_with_another_expression_is_refused_unless_overwrite(scored, tmp_path):
    root, _ = scored
    out = tmp_path / "curated"
    assert _filter(root / "scores", "iqa > -100", out).exit_code == 0
    (out / "_markers" / "shard-1.json").unlink()           # half done, as after an interrupted run
    result = _filter(root / "scores", "emotion != 'fear'", out)
    assert result.exit_code != 0 and "where: iqa > -100 -> " in result.output and "--overwrite" in result.output
    assert not (out / "_markers" / "shard-1.json").exists()
    result = _filter(root / "scores", "emotion != 'fear'", out, "--overwrite")
    assert result.exit_code == 0, result.output
    wheres = {json.loads(p.read_text())["where"] for p in (out / "_markers").glob("*.json")}
    assert wheres == {"emotion != 'fear'"}


def test_tables_with_different_models_are_all_checked_before_any_work(scored, tmp_path):
    root, _ = scored
    scores = tmp_path / "scores"
    shutil.copytree(root / "scores", scores)
    table = pq.read_table(scores / "shard-1.parquet")           # a later run scored this shard with iqa only
    meta = json.loads(table.schema.metadata[b"perceptclip"])
    meta["models"] = [m for m in meta["models"] if m["name"] != "emotion"]
    keep = [c for c in table.column_names if not c.startswith("emotion")]
    table = table.select(keep).replace_schema_metadata({b"perceptclip": json.dumps(meta).encode()})
    pq.write_table(table, scores / "shard-1.parquet")
    result = _filter(scores, "emotion != 'fear'", tmp_path / "out")
    assert result.exit_code != 0
    assert "no column 'emotion' in the score table of shard-1" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    assert _filter(scores, "iqa > -100", tmp_path / "out").exit_code == 0    # a column every table has


@pytest.mark.parametrize("where,message", [
    ('emotion != "Fear"', "'Fear' is not a class of emotion; its classes: amusement, awe"),
    ('emotion == "feer"', "'feer' is not a class of emotion"),
    ('emotion in ["awe", "joy"]', "'joy' is not a class of emotion"),
    ("iqa > true", "iqa is number; compare it with a number"),
    ("emotion in []", "'in' needs at least one value"),
])
def test_expressions_that_could_only_keep_all_or_nothing_are_refused(scored, tmp_path, where, message):
    root, _ = scored
    result = _filter(root / "scores", where, tmp_path / "out")
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_quantiles_checks_class_names_too(scored):
    root, _ = scored
    result = CliRunner().invoke(main, ["quantiles", "--scores", str(root / "scores"), "--where", 'emotion == "Awe"'])
    assert result.exit_code != 0 and "'Awe' is not a class of emotion" in result.output


@pytest.mark.parametrize("where,kept", [
    ("width > 99999999999999999999999999", []),
    ("width < 99999999999999999999999999", ["a", "b", "d", "e"]),
    ("width > -99999999999999999999999999", ["a", "b", "d", "e"]),
    ("true", ["a", "b", "d", "e"]),                   # every scored sample; error rows never
    ("false", []),
    ("not false and iqa > 0.6", ["a", "d"]),
])
def test_huge_numbers_and_the_true_false_literals_work(where, kept):
    expression = parse_expression(where)
    expression.check(TABLE.schema)
    assert kept_rows(TABLE, expression)["key"].to_pylist() == kept


@pytest.mark.parametrize("where,column", [("iqa >", 6), ("iqa = 0.5", 5), ("  iqa >", 6), ("iqa\0 > 1", 4)])
def test_error_positions_count_from_one(where, column):
    with pytest.raises(ExpressionError, match=f"at column {column}:"):
        parse_expression(where)


def test_filter_writes_each_input_kind_as_its_own_kind_or_as_tars(iqa_artifact, tmp_path):
    """Parquet with the images -> Parquet of the kept rows with scores; a table and a folder of image files
    -> a Parquet table of locations and scores; --format webdataset -> tars from any kind."""
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from perceptclip.cli import main
    from perceptclip.inputs.shards import read_shard
    from perceptclip.scoring.config import ScoreConfig
    from perceptclip.scoring.plan import plan_shards
    from support.images import image_bytes, make_image
    from support.inputs import write_image_files, write_image_parquet
    from support.scoring import score_here

    data = tmp_path / "data"
    images = [image_bytes(make_image(30 + i, (40, 30))) for i in range(4)]
    parquet = write_image_parquet(data / "hf-000.parquet", images, {"id": ["p0", "p1", "p2", "p3"]})
    write_image_files(data / "listed", ["a.jpg", "b.png"])
    (data / "list.csv").write_text("path,id\nlisted/a.jpg,t0\nlisted/b.png,t1\nlisted/gone.jpg,t2\n")
    write_image_files(tmp_path / "photos", ["x.jpg", "y/z.png"])
    dest = tmp_path / "scores"
    folder = plan_shards(ScoreConfig(input=[str(tmp_path / "photos")], output=str(dest), models=[iqa_artifact]), {})
    score_here([parquet, str(data / "list.csv"), *folder.todo], [iqa_artifact], str(dest))
    everything = "iqa > -1000"
    for form in ("auto", "webdataset"):
        out = tmp_path / f"curated-{form}"
        result = CliRunner().invoke(main, ["filter", "--scores", str(dest), "--where", everything, "--output",
                                           str(out), "--format", form])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["samples"] == {"seen": 9, "kept": 8} and summary["shards"]["done"] == 3
    auto = tmp_path / "curated-auto"
    kept = pq.read_table(auto / "hf-000.parquet")
    assert kept["id"].to_pylist() == ["p0", "p1", "p2", "p3"] and kept["image"].to_pylist()[0]["bytes"] == images[0]
    assert kept.schema.metadata[b"huggingface"]                     # still a datasets Image column
    scored_iqa = pq.read_table(dest / "hf-000.parquet")["iqa"].to_pylist()
    assert kept["iqa"].to_pylist() == scored_iqa
    located = pq.read_table(auto / "list.parquet").to_pylist()
    assert [(r["key"], r["url"]) for r in located] == [("t0", str(data / "listed/a.jpg")),    # the id column keys it
                                                       ("t1", str(data / "listed/b.png"))]
    assert [r["key"] for r in pq.read_table(auto / "photos-000000.parquet").to_pylist()] == ["x.jpg", "y/z.png"]
    tars = tmp_path / "curated-webdataset"
    files = read_shard(str(tars / "photos-000000.tar"))
    assert [(s["__key__"], sorted(k for k in s if k != "__key__")) for s in files] == [
        ("x_jpg", ["jpg", "json"]), ("y/z_png", ["json", "png"])]
    meta = json.loads(files[1]["json"])
    assert meta["key"] == "y/z.png" and meta["url"] == str(tmp_path / "photos" / "y/z.png") and "iqa" in meta
    assert [s["__key__"] for s in read_shard(str(tars / "hf-000.tar"))] == ["p0", "p1", "p2", "p3"]
    assert read_shard(str(tars / "list.tar"))[1]["png"] == (data / "listed/b.png").read_bytes()
