"""Inputs other than a list of tars: a folder or prefix of shards, Parquet files with the images inside,
tables of image locations, folders of image files. Real files written here, tiny real models; the
quick tests run the job's stages in this process, one test per kind runs the whole job on Ray (slow)."""

import json

import pytest

from perceptclip.inputs.shards import EmptyFolderError, expand_shards, write_shard
from support.images import image_bytes, make_image
from support.shards import write_labelled_shard


def tar_samples(n, prefix="s"):
    return [{"__key__": f"{prefix}{i:03d}", "jpg": image_bytes(make_image(i, (40, 32)))} for i in range(n)]


# --- a folder of shards means its shards ------------------------------------------------------------

def test_a_folder_means_its_shards_at_any_depth_sorted_and_bookkeeping_left_out(tmp_path):
    root = tmp_path / "labelled"
    for name in ["train-000001.tar", "train-000000.tar", "more/extra-000000.tar.gz", "part-0.parquet"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    # what convert and score write beside shards, hidden files and notes: not shards
    for name in ["_conversions/train.json", "_markers/a.tar", ".cache/b.tar", ".hidden.tar", "README.md",
                 "labels.csv"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    expected = [str(root / n) for n in ["more/extra-000000.tar.gz", "part-0.parquet", "train-000000.tar",
                                        "train-000001.tar"]]
    assert expand_shards(str(root)) == expected
    assert expand_shards(str(root) + "/") == expected
    assert expand_shards(str(tmp_path / "lab*")) == expected                # a glob that matches the folder
    assert expand_shards([str(root / "train-000001.tar"), str(root)]) == expected[3:] + expected[:3]


def test_a_folder_without_shards_is_an_error_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("no shards here")
    for folder in ("empty", "notes"):
        with pytest.raises(EmptyFolderError, match=f"{folder}: the folder holds no shards"):
            expand_shards(str(tmp_path / folder))


def test_a_prefix_on_object_storage_means_its_shards(s3_server):
    from perceptclip.core.storage import storage_options

    bucket, options = s3_server.bucket(), storage_options()
    for i in (2, 0, 1):
        write_shard(f"{bucket}/shards/shard-{i:06d}.tar", tar_samples(1), options)
    write_shard(f"{bucket}/shards/_markers/x.tar", tar_samples(1), options)
    expected = [f"{bucket}/shards/shard-{i:06d}.tar" for i in range(3)]
    assert expand_shards(f"{bucket}/shards", options) == expected
    assert expand_shards(f"{bucket}/shards/", options) == expected
    s3_server.filesystem().pipe_file(f"{bucket[5:]}/nothing/README", b"x")
    with pytest.raises(EmptyFolderError, match="holds no shards"):
        expand_shards(f"{bucket}/nothing", options)


def test_evaluate_and_train_take_a_folder_of_labelled_shards(iqa_artifact, tmp_path):
    from perceptclip.training.config import TrainConfig
    from perceptclip.training.evaluate import evaluate
    from perceptclip.training.train import worker_plan

    root = tmp_path / "labelled"
    for s in range(2):
        write_labelled_shard(root / f"val-{s:06d}.tar", [
            (f"k{s}{i}", image_bytes(make_image(10 * s + i, (48, 40))), {"label": (s * 5 + i) / 10})
            for i in range(5)])
    by_folder = evaluate(iqa_artifact, str(root), device="cpu", resamples=0)
    by_glob = evaluate(iqa_artifact, str(root / "*.tar"), device="cpu", resamples=0)
    assert by_folder == by_glob and by_folder["errors"] == 0
    plan = worker_plan(TrainConfig(task="iqa", init=iqa_artifact), {"default": str(root)}, {"default": str(root)},
                       str(tmp_path / "run"), {})
    assert plan.train["default"] == [str(root / f"val-{s:06d}.tar") for s in range(2)]
    (tmp_path / "none").mkdir()
    with pytest.raises(EmptyFolderError):
        worker_plan(TrainConfig(task="iqa", init=iqa_artifact), {"default": str(tmp_path / "none")}, {},
                    str(tmp_path / "run"), {})


def test_score_takes_a_folder_of_shards(tmp_path, iqa_artifact):
    from perceptclip.scoring.config import ScoreConfig
    from perceptclip.scoring.plan import plan_shards

    root = tmp_path / "shards"
    for i in range(3):
        write_shard(str(root / f"part-{i:03d}.tar"), tar_samples(2))
    cfg = ScoreConfig(input=[str(root)], output=str(tmp_path / "scores"), models=[iqa_artifact])
    assert plan_shards(cfg, {}).todo == [str(root / f"part-{i:03d}.tar") for i in range(3)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no shards"):
        plan_shards(ScoreConfig(input=[str(tmp_path / "empty")], output=str(tmp_path / "o"), models=["m"]), {})
    assert json.dumps(cfg.to_mapping())           # the config stays plain data


# --- parquet with the images inside ----------------------------------------------------------------

def jpeg(i, size=(40, 32)):
    return image_bytes(make_image(i, size))


def scored(dest, name):
    import pyarrow.parquet as pq

    return pq.read_table(str(dest / f"{name}.parquet")).to_pylist()


def test_parquet_with_images_inside_is_one_score_row_per_row(tmp_path, iqa_artifact):
    from perceptclip.inputs.base import InputSpec
    from support.inputs import write_image_parquet
    from support.scoring import score_here

    images = [jpeg(i) for i in range(10)]
    images[3], images[5], images[7] = None, b"", b"\xff\xd8\xff not a jpeg"
    ids = [f"id-{i}" for i in range(10)]
    hf = write_image_parquet(tmp_path / "in" / "hf-000.parquet", images, {"id": ids}, layout="hf", row_group_size=4)
    plain = write_image_parquet(tmp_path / "in" / "plain-000.parquet", [jpeg(20), jpeg(21), jpeg(22)],
                                layout="binary", image_column="jpg", row_group_size=2)
    write_shard(str(tmp_path / "in" / "tar-000.tar"), [{"__key__": k, "jpg": b} for k, b in
                                                      zip(ids, images) if b])
    dest = tmp_path / "scores"
    results = score_here([hf, plain, str(tmp_path / "in" / "tar-000.tar")], [iqa_artifact], str(dest),
                         block_rows=3, inputs=InputSpec())
    assert [(r.shard, r.rows, r.failed) for r in results] == [(hf, 10, None), (plain, 3, None),
                                                              (str(tmp_path / "in" / "tar-000.tar"), 8, None)]
    rows = scored(dest, "hf-000")
    assert [r["key"] for r in rows] == ids                      # the id column is the key, in row order
    errors = {r["key"]: r["error"].split(":")[0] for r in rows if r["status"] == "error"}
    assert errors == {"id-3": "no_image", "id-5": "empty", "id-7": "not_an_image"}
    assert [r["url"] for r in rows] == [f"img-{i}.jpg" if images[i] is not None else None for i in range(10)]
    # one image, one score: the same bytes in a tar score the same
    by_tar = {r["key"]: r["iqa"] for r in scored(dest, "tar-000")}
    assert all(r["iqa"] == by_tar[r["key"]] for r in rows if r["status"] == "ok")
    assert [r["key"] for r in scored(dest, "plain-000")] == ["0", "1", "2"]   # no key column: the row number


def test_parquet_duplicate_and_null_keys_are_error_rows(tmp_path, iqa_artifact):
    from perceptclip.inputs.base import InputSpec
    from support.inputs import write_image_parquet
    from support.scoring import score_here

    keys = ["a", "b", "a", None, "c", "b", "d"]
    path = write_image_parquet(tmp_path / "dup.parquet", [jpeg(i) for i in range(7)], {"key": keys})
    score_here([path], [iqa_artifact], str(tmp_path / "scores"), inputs=InputSpec())
    rows = scored(tmp_path / "scores", "dup")
    assert [(r["key"], (r["error"] or "ok").split(":")[0]) for r in rows] == [
        ("a", "duplicate_key"), ("b", "duplicate_key"), ("a", "duplicate_key"), ("3", "no_key"), ("c", "ok"),
        ("b", "duplicate_key"), ("d", "ok")]


def test_parquet_files_that_cannot_be_read_fail_their_shard(tmp_path, iqa_artifact):
    from perceptclip.inputs.base import InputSpec
    from support.inputs import write_image_parquet
    from support.scoring import score_here

    good = write_image_parquet(tmp_path / "good.parquet", [jpeg(i) for i in range(3)])
    data = open(good, "rb").read()
    broken = {"truncated": data[: len(data) // 2], "not_parquet": b"<html>403 Forbidden</html>" * 20,
              "empty": b""}
    for name, content in broken.items():
        (tmp_path / f"{name}.parquet").write_bytes(content)
    urls = [str(tmp_path / f"{n}.parquet") for n in [*broken, "missing"]] + [good]
    results = score_here(urls, [iqa_artifact], str(tmp_path / "scores"), inputs=InputSpec())
    failed = {r.shard.rsplit("/", 1)[1]: r.failed.split(":")[0] for r in results if r.failed}
    assert failed == {"truncated.parquet": "truncated", "not_parquet.parquet": "not_parquet",
                      "empty.parquet": "not_parquet", "missing.parquet": "missing"}
    assert sorted(p.name for p in (tmp_path / "scores").glob("*.parquet")) == ["good.parquet"]


def test_an_unreadable_row_group_is_error_rows_and_the_rest_scores(tmp_path, iqa_artifact):
    import pyarrow.parquet as pq

    from perceptclip.inputs.base import InputSpec
    from support.inputs import write_image_parquet
    from support.scoring import score_here

    path = write_image_parquet(tmp_path / "hurt.parquet", [jpeg(i) for i in range(9)], row_group_size=3)
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    data = bytearray(open(path, "rb").read())
    data[column.data_page_offset:column.data_page_offset + 24] = b"\xee" * 24     # its page header, garbled
    open(path, "wb").write(bytes(data))
    score_here([path], [iqa_artifact], str(tmp_path / "scores"), inputs=InputSpec())
    rows = scored(tmp_path / "scores", "hurt")
    assert [r["key"] for r in rows] == [str(i) for i in range(9)]
    assert [r["status"] for r in rows] == ["ok"] * 3 + ["error"] * 3 + ["ok"] * 3
    assert all(r["error"].startswith("unreadable: row group 1 of ") for r in rows[3:6])


def test_parquet_columns_that_cannot_be_told_fail_at_start_naming_the_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from perceptclip.scoring.config import ScoreConfig
    from perceptclip.scoring.plan import plan_shards

    pq.write_table(pa.table({"a": pa.array([b"x"]), "b": pa.array([b"y"]), "n": [1]}), tmp_path / "two.parquet")
    pq.write_table(pa.table({"caption": ["x"], "n": [1]}), tmp_path / "none.parquet")

    def plan(path, **settings):
        return plan_shards(ScoreConfig(input=[str(path)], output=str(tmp_path / "out"), models=["m"], **settings), {})

    with pytest.raises(ValueError, match=r"2 columns hold bytes \(a, b\); name it with --image-column "
                                         r"\(image_column: in a score config\); its columns: a \(binary\), "
                                         r"b \(binary\), n \(int64\)"):
        plan(tmp_path / "two.parquet")
    assert plan(tmp_path / "two.parquet", image_column="b").todo == [str(tmp_path / "two.parquet")]
    with pytest.raises(ValueError, match="no column holds image bytes.*its columns: caption"):
        plan(tmp_path / "none.parquet")
    for settings, message in [({"image_column": "img"}, "no image_column 'img'"),
                              ({"image_column": "n"}, "image_column 'n' holds no image bytes"),
                              ({"image_column": "a", "key_column": "id"}, "no key_column 'id'"),
                              ({"image_column": "a", "carry_columns": ["n", "x"]}, "no carry_columns 'x'")]:
        with pytest.raises(ValueError, match=message):
            plan(tmp_path / "two.parquet", **settings)


def test_input_settings_are_checked_at_the_edge(tmp_path):
    from click.testing import CliRunner

    from perceptclip.cli import main
    from perceptclip.scoring.config import load_score_config

    with pytest.raises(ValueError, match="^input_kind: must be one of"):
        load_score_config(None, input=["a"], output="o", models=["m"], input_kind="zip")
    with pytest.raises(ValueError, match="^carry_columns: key, status: already a column"):
        load_score_config(None, input=["a"], output="o", models=["m"], carry_columns=["key", "status", "x"])
    result = CliRunner().invoke(main, ["score", "--input", "a", "--output", "o", "--model", "m",
                                       "--input-kind", "zip"])
    assert result.exit_code != 0 and "zip" in result.output


@pytest.mark.slow
def test_parquet_on_object_storage_end_to_end_and_rerun(s3_server, iqa_artifact, ray_local, tmp_path):
    import pyarrow.parquet as pq

    from perceptclip.scoring.config import load_score_config
    from perceptclip.scoring.job import run_score
    from support.inputs import write_image_parquet

    bucket, fs = s3_server.bucket(), s3_server.filesystem()
    images = {f"part-{p:03d}": [jpeg(10 * p + i) for i in range(5)] for p in range(3)}
    images["part-001"][2] = b"\xff\xd8\xff broken"
    for name, rows in images.items():
        local = write_image_parquet(tmp_path / f"{name}.parquet", rows, row_group_size=2)
        fs.put_file(local, f"{bucket[5:]}/data/{name}.parquet")
    (tmp_path / "cut.parquet").write_bytes(open(local, "rb").read()[:300])
    fs.put_file(str(tmp_path / "cut.parquet"), f"{bucket[5:]}/data/cut.parquet")
    cfg = load_score_config(None, input=[f"{bucket}/data/"], output=f"{bucket}/scores", models=[iqa_artifact],
                            num_cpus=2)
    summary = run_score(cfg).to_dict()
    assert summary["shards"] == {"planned": 4, "done": 3, "skipped": 0, "failed": 1}
    assert summary["failed_shards"][0]["reason"] == "truncated"
    assert summary["samples"] == {"total": 15, "ok": 14, "error": 1, "errors_by_reason": {"not_an_image": 1}}
    for name in images:
        with fs.open(f"{bucket[5:]}/scores/{name}.parquet", "rb") as f:
            table = pq.read_table(f)
        assert table["key"].to_pylist() == [str(i) for i in range(5)]        # every row, once, in order
    again = run_score(cfg).to_dict()
    assert again["shards"] == {"planned": 4, "done": 0, "skipped": 3, "failed": 1}


# --- carried columns -----------------------------------------------------------------------------

def test_carried_columns_join_scores_back_to_the_input_with_their_types(tmp_path, iqa_artifact):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    from perceptclip.inputs.base import InputSpec
    from support.inputs import write_image_parquet
    from support.scoring import score_here

    when = [datetime.datetime(2026, 1, 1 + i) for i in range(5)]
    columns = {"id": [f"id-{i}" for i in range(5)], "n": [10, 11, None, 13, 14], "when": when,
               "tags": [["a"], [], ["b", "c"], None, ["d"]], "caption": [f"a picture {i}" for i in range(5)]}
    images = [jpeg(i) for i in range(5)]
    images[1] = None
    path = write_image_parquet(tmp_path / "carry.parquet", images, columns, row_group_size=2)
    write_shard(str(tmp_path / "carry-tar.tar"), [
        {"__key__": f"k{i}", "jpg": jpeg(i), "json": json.dumps({"id": f"t-{i}", "n": i}).encode()}
        for i in range(3)] + [{"__key__": "nojson", "jpg": jpeg(9)}])
    spec = InputSpec(carry_columns=("id", "n", "when", "tags"))
    score_here([path, str(tmp_path / "carry-tar.tar")], [iqa_artifact], str(tmp_path / "scores"), block_rows=2,
               inputs=spec)
    table = pq.read_table(tmp_path / "scores" / "carry.parquet")
    assert table.column_names[:12] == ["key", "shard", "status", "error", "width", "height", "url", "caption",
                                       "id", "n", "when", "tags"]
    assert table.column_names[12:] == ["iqa"]
    assert table["id"].to_pylist() == columns["id"] and table["n"].to_pylist() == columns["n"]
    assert table.schema.field("n").type == pa.int64() and table["tags"].to_pylist() == columns["tags"]
    assert table["when"].to_pylist() == [w.isoformat() for w in when]            # times as ISO 8601 text
    assert table["status"].to_pylist() == ["ok", "error", "ok", "ok", "ok"]      # error rows carry theirs too
    tar = pq.read_table(tmp_path / "scores" / "carry-tar.parquet")
    assert tar["id"].to_pylist() == ["t-0", "t-1", "t-2", None] and tar["n"].to_pylist() == [0, 1, 2, None]


# --- tables of image locations -------------------------------------------------------------------

def test_a_csv_table_of_paths_is_one_row_per_line_with_a_reason_for_each_failure(tmp_path, iqa_artifact):
    import pyarrow.parquet as pq

    from perceptclip.inputs.base import InputSpec
    from support.scoring import score_here

    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for i in range(3):
        (images / f"a{i}.jpg").write_bytes(jpeg(i))
    (images / "sub" / "b.png").write_bytes(image_bytes(make_image(7, (30, 20)), "PNG"))
    (images / "notes.jpg").write_text("not an image")
    lines = ["path,note,id",
             "images/a0.jpg,first,x0",                      # relative to the table's folder
             f"{images}/a1.jpg,second,x1",                  # absolute
             "images/sub/b.png,third,x2",
             "images/gone.jpg,vanished,x3",                 # not_found
             "images/sub,a folder,x4",                      # not_a_file
             "images/notes.jpg,text,x5",                    # not_an_image
             "images/a2.jpg,too,many,fields",               # malformed line 8
             ",no path,x7",                                 # no_image
             'images/a2.jpg,"a ""quoted"", caption",x8']
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    score_here([str(tmp_path / "list.csv")], [iqa_artifact], str(tmp_path / "scores"), block_rows=3,
               inputs=InputSpec(key_column="id", carry_columns=("note",)))
    rows = pq.read_table(tmp_path / "scores" / "list.parquet").to_pylist()
    got = [(r["key"], r["status"] if r["status"] == "ok" else r["error"].split(":")[0]) for r in rows]
    assert got == [("x0", "ok"), ("x1", "ok"), ("x2", "ok"), ("x3", "not_found"), ("x4", "not_a_file"),
                   ("x5", "not_an_image"), ("6", "malformed_line"), ("x7", "no_image"), ("x8", "ok")]
    assert "line 8: 4 fields, the header has 3" in rows[6]["error"]
    assert rows[0]["url"] == str(tmp_path / "images" / "a0.jpg") and rows[1]["url"] == f"{images}/a1.jpg"
    assert (rows[2]["width"], rows[2]["height"]) == (30, 20)
    assert rows[8]["note"] == 'a "quoted", caption' and rows[6]["note"] is None
    assert [r["note"] for r in rows[:3]] == ["first", "second", "third"]


def test_jsonl_and_parquet_tables_and_duplicate_keys(tmp_path, iqa_artifact):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from perceptclip.inputs.base import InputSpec
    from support.scoring import score_here

    for i in range(3):
        (tmp_path / f"i{i}.jpg").write_bytes(jpeg(i))
    (tmp_path / "t.jsonl").write_text('{"image": "i0.jpg", "key": "a"}\n{not json\n\n'
                                      '{"image": "i1.jpg", "key": "b"}\n["a list"]\n{"image": "i2.jpg", "key": "a"}\n')
    pq.write_table(pa.table({"file_name": ["i2.jpg", "i1.jpg"], "score": [1.5, 2.5]}), tmp_path / "t2.parquet")
    score_here([str(tmp_path / "t.jsonl"), str(tmp_path / "t2.parquet")], [iqa_artifact],
               str(tmp_path / "scores"), inputs=InputSpec())
    rows = pq.read_table(tmp_path / "scores" / "t.parquet").to_pylist()
    assert [(r["key"], (r["error"] or "ok").split(":")[0]) for r in rows] == [
        ("a", "duplicate_key"), ("1", "malformed_line"), ("b", "ok"), ("3", "malformed_line"), ("a", "duplicate_key")]
    assert "line 2: not JSON" in rows[1]["error"] and "line 5: not a JSON object" in rows[3]["error"]
    table = pq.read_table(tmp_path / "scores" / "t2.parquet")      # a Parquet table of locations, told by content
    assert table["key"].to_pylist() == ["0", "1"] and table["status"].to_pylist() == ["ok", "ok"]


def test_a_url_that_hangs_is_an_error_row_after_the_timeout(tmp_path, iqa_artifact):
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import pyarrow.parquet as pq

    from perceptclip.inputs.base import InputSpec
    from support.scoring import score_here

    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if "hang" in self.path:
                release.wait(30)
            if "missing" in self.path:
                self.send_error(404)
                return
            body = jpeg(3)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    (tmp_path / "urls.csv").write_text(f"url\n{base}/ok.jpg\n{base}/hang.jpg\n{base}/missing.jpg\n")
    started = time.monotonic()
    try:
        score_here([str(tmp_path / "urls.csv")], [iqa_artifact], str(tmp_path / "scores"),
                   inputs=InputSpec(fetch_timeout_s=1.0))
    finally:
        release.set()
        server.shutdown()
    assert time.monotonic() - started < 20
    rows = pq.read_table(tmp_path / "scores" / "urls.parquet").to_pylist()
    assert [(r["status"] if r["status"] == "ok" else r["error"].split(":")[0]) for r in rows] == [
        "ok", "fetch_timeout", "not_found"]


@pytest.mark.slow
def test_a_long_table_is_streamed_its_memory_flat_in_its_length(tmp_path):
    """The read task's memory does not grow with the table: held whole, 10,000 rows would take about 5 MB;
    read as the task reads them, the peak is the same for 10,000 rows as for 1,000 (8 bytes a row stay, to
    find keys seen twice). benchmarks/table_memory.py does the same with a million rows. (Slow: 11,000
    fetches traced by tracemalloc.)"""
    import tracemalloc

    from perceptclip.inputs.base import InputSpec
    from perceptclip.inputs.tables import TableReader

    (tmp_path / "0.jpg").write_bytes(jpeg(0))
    peaks = {}
    for rows in (1_000, 10_000):
        url = tmp_path / f"{rows}.csv"
        url.write_text("key,path,caption\n" + "".join(f"{r},0.jpg,caption {r}\n" for r in range(rows)))
        with TableReader(str(url), InputSpec(carry_columns=("caption",), fetch_workers=4), {}) as reader:
            tracemalloc.start()
            try:
                read = sum(len(block) for block in reader.blocks(64))
                peaks[rows] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        assert read == rows
    assert peaks[10_000] < 2_000_000, peaks
    assert peaks[10_000] < 1.5 * peaks[1_000] + 200_000, peaks


def test_table_columns_that_cannot_be_found_fail_at_start(tmp_path):
    from perceptclip.scoring.config import ScoreConfig
    from perceptclip.scoring.plan import plan_shards

    (tmp_path / "t.csv").write_text("name,label\na.jpg,1\n")

    def plan(**settings):
        return plan_shards(ScoreConfig(input=[str(tmp_path / "t.csv")], output=str(tmp_path / "o"), models=["m"],
                                       **settings), {})

    with pytest.raises(ValueError, match=r"no column of image locations \(path, image_path, file_name, url, "
                                         r"image\); name it with --image-column \(image_column: in a score config\); "
                                         r"its columns: name, label"):
        plan()
    assert plan(image_column="name").todo == [str(tmp_path / "t.csv")]
    with pytest.raises(ValueError, match="no carry_columns 'x'"):
        plan(image_column="name", carry_columns=["x"])


@pytest.mark.slow
def test_a_table_on_object_storage_fetches_its_images_there(s3_server, iqa_artifact, ray_local):
    import pyarrow.parquet as pq

    from perceptclip.scoring.config import load_score_config
    from perceptclip.scoring.job import run_score

    bucket, fs = s3_server.bucket(), s3_server.filesystem()
    for i in range(4):
        fs.pipe_file(f"{bucket[5:]}/images/{i}.jpg", jpeg(i))
    lines = ["path,id", "images/0.jpg,a", f"{bucket}/images/1.jpg,b", "images/2.jpg,c", "images/gone.jpg,d",
             "images/3.jpg,e"]
    fs.pipe_file(f"{bucket[5:]}/list.csv", ("\n".join(lines) + "\n").encode())
    cfg = load_score_config(None, input=[f"{bucket}/list.csv"], output=f"{bucket}/scores", models=[iqa_artifact],
                            carry_columns=["id"], num_cpus=2)
    summary = run_score(cfg).to_dict()
    assert summary["samples"] == {"total": 5, "ok": 4, "error": 1, "errors_by_reason": {"not_found": 1}}
    with fs.open(f"{bucket[5:]}/scores/list.parquet", "rb") as f:
        table = pq.read_table(f)
    assert table["id"].to_pylist() == ["a", "b", "c", "d", "e"]
    assert table["url"].to_pylist()[:2] == [f"{bucket}/images/0.jpg", f"{bucket}/images/1.jpg"]
    assert run_score(cfg).to_dict()["shards"]["skipped"] == 1


# --- folders of image files: virtual shards ------------------------------------------------------

def files_config(root, dest, artifact, **settings):
    from perceptclip.scoring.config import ScoreConfig

    return ScoreConfig(input=[str(root)], output=str(dest), models=[artifact], **settings)


def score_files(cfg, options=None):
    """Plan as the job does (recording the grouping), then score what is left in this process."""
    from perceptclip.scoring.plan import plan_shards
    from support.scoring import score_here

    plan = plan_shards(cfg, options or {})
    results = score_here(plan.todo, cfg.models, cfg.output, block_rows=2, inputs=cfg.input_spec()) if plan.todo else []
    return plan, results


def committed_rows(dest) -> dict:
    """key -> status or error reason, over every score table under local ``dest``; a key twice fails."""
    import pyarrow.parquet as pq

    rows = {}
    for path in sorted(dest.glob("*.parquet")):
        for r in pq.read_table(path).to_pylist():
            assert r["key"] not in rows, f"{r['key']} scored twice"
            rows[r["key"]] = r["status"] if r["status"] == "ok" else r["error"].split(":")[0]
    return rows


def test_a_folder_of_image_files_is_scored_as_virtual_shards_recorded_under_the_output(tmp_path, iqa_artifact):
    import pyarrow.parquet as pq

    from support.inputs import write_image_files

    root, dest = tmp_path / "photos", tmp_path / "scores"
    names = write_image_files(root, ["a.jpg", "b/c.JPG", "b/d.png", "e/f/g.jpeg", "z.webp"])
    (root / "notes.txt").write_text("not an image: not listed")
    write_image_files(root, ["_thumbs/x.jpg", ".cache/y.jpg"])          # bookkeeping: not listed
    cfg = files_config(root, dest, iqa_artifact, files_per_shard=2)
    (root / "z.webp").write_bytes(b"RIFF not a webp")                    # listed, not an image
    plan, results = score_files(cfg)
    listing = dest / "_inputs" / "photos" / "listing-000000.parquet"
    assert plan.todo == [f"{listing}#photos-{i:06d}" for i in range(3)]
    assert pq.read_table(listing).to_pydict() == {                     # the grouping, readable by anyone
        "shard": ["photos-000000"] * 2 + ["photos-000001"] * 2 + ["photos-000002"], "key": sorted(names)}
    assert [(r.rows, r.failed) for r in results] == [(2, None), (2, None), (1, None)]
    assert committed_rows(dest) == {"a.jpg": "ok", "b/c.JPG": "ok", "b/d.png": "ok", "e/f/g.jpeg": "ok",
                                    "z.webp": "not_an_image"}
    table = pq.read_table(dest / "photos-000001.parquet")
    assert table["url"].to_pylist() == [str(root / "b/d.png"), str(root / "e/f/g.jpeg")]
    assert table["shard"].to_pylist() == [f"{listing}#photos-000001"] * 2

    # a rerun keeps the grouping and scores nothing; files added later (one sorting first) form new shards
    assert score_files(cfg)[0].todo == [] and len(score_files(cfg)[0].skipped) == 3
    write_image_files(root, ["0-first.jpg", "b/new.jpg", "y.png"])
    (root / "a.jpg").unlink()                                            # scored already: stays as scored
    cfg.files_per_shard = 5                                              # new shards take the new size
    plan, results = score_files(cfg)
    second = dest / "_inputs" / "photos" / "listing-000001.parquet"
    assert plan.todo == [f"{second}#photos-000003"] and len(plan.skipped) == 3
    assert pq.read_table(second)["key"].to_pylist() == ["0-first.jpg", "b/new.jpg", "y.png"]
    # a file gone before its shard was scored is an error row
    write_image_files(root, ["late-1.jpg", "late-2.jpg"])
    from perceptclip.scoring.plan import plan_shards

    todo = plan_shards(cfg, {}).todo                                     # recorded, not yet scored
    (root / "late-2.jpg").unlink()
    from support.scoring import score_here

    score_here(todo, cfg.models, str(dest), inputs=cfg.input_spec())
    rows = committed_rows(dest)
    assert rows.pop("late-2.jpg") == "not_found" and rows.pop("late-1.jpg") == "ok"
    assert rows == {"a.jpg": "ok", "b/c.JPG": "ok", "b/d.png": "ok", "e/f/g.jpeg": "ok", "z.webp": "not_an_image",
                    "0-first.jpg": "ok", "b/new.jpg": "ok", "y.png": "ok"}
    assert score_files(cfg)[0].todo == []


def test_auto_tells_a_folder_of_image_files_from_a_folder_of_shards(tmp_path, iqa_artifact):
    from perceptclip.scoring.config import load_score_config
    from perceptclip.scoring.plan import plan_shards
    from support.inputs import write_image_files

    write_image_files(tmp_path / "photos", ["a.jpg", "b.png", "c/d.jpg"])
    write_image_files(tmp_path / "mixed", ["loose.jpg"])
    write_shard(str(tmp_path / "mixed" / "part-000.tar"), tar_samples(2))

    def todo(source, **settings):
        return plan_shards(files_config(source, tmp_path / f"out-{len(settings)}-{abs(hash(source))}",
                                        iqa_artifact, **settings), {}).todo

    assert [u.rsplit("#", 1)[-1] for u in todo(tmp_path / "photos")] == ["photos-000000"]
    assert todo(tmp_path / "mixed") == [str(tmp_path / "mixed" / "part-000.tar")]      # shards win
    assert [u.rsplit("#", 1)[-1] for u in todo(tmp_path / "mixed", input_kind="files")] == ["mixed-000000"]
    by_glob = todo(f"{tmp_path}/photos/**/*.jpg", files_per_shard=1)
    assert [u.rsplit("#", 1)[-1] for u in by_glob] == ["photos-000000", "photos-000001"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README").write_text("x")
    with pytest.raises(ValueError, match="holds no shards.*nor image files"):
        todo(tmp_path / "empty")
    with pytest.raises(ValueError, match="no image files"):
        todo(tmp_path / "empty", input_kind="files")
    with pytest.raises(ValueError, match="carry_columns: image files have no columns"):
        todo(tmp_path / "photos", carry_columns=["id"])
    with pytest.raises(ValueError, match="^files_per_shard: "):
        load_score_config(None, input=["a"], output="o", models=["m"], files_per_shard=0)
    # a destination records the files of one root under a name: another root of that name is refused
    write_image_files(tmp_path / "elsewhere" / "photos", ["x.jpg"])
    dest = tmp_path / "shared-dest"
    plan_shards(files_config(tmp_path / "photos", dest, iqa_artifact), {})
    with pytest.raises(ValueError, match="records the files of .*photos as photos, not those of"):
        plan_shards(files_config(tmp_path / "elsewhere" / "photos", dest, iqa_artifact), {})


def test_runs_racing_to_record_a_grouping_end_with_one(tmp_path):
    """Runs that list a growing folder at the same time, each with its own view of it: every file ends in
    exactly one recorded shard, and each run scores shards of the grouping that was recorded."""
    import threading

    import pyarrow.parquet as pq

    from perceptclip.inputs.files import FileSource, create, virtual_shards
    from perceptclip.output.layout import listings_dir

    for attempt in range(5):
        dest = tmp_path / f"dest-{attempt}"
        views = [sorted(f"{i:03d}.jpg" for i in range(n)) for n in (5, 7, 7, 9, 3, 12)]
        barrier, results = threading.Barrier(len(views)), {}

        def run(i, barrier=barrier, results=results, views=views, dest=dest):
            barrier.wait()
            results[i] = virtual_shards(FileSource("src", str(tmp_path / "photos"), views[i]), listings_dir(str(dest)),
                                        2, {})

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(views))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        listings = sorted((dest / "_inputs" / "photos").glob("listing-*.parquet"))
        recorded = [pq.read_table(p).to_pydict() for p in listings]
        keys = [k for r in recorded for k in r["key"]]
        assert sorted(keys) == sorted(set(keys)) == views[3][:9] + ["009.jpg", "010.jpg", "011.jpg"]
        final = [f"{p}#{name}" for p, r in zip(listings, recorded) for name in dict.fromkeys(r["shard"])]
        for _i, shards in results.items():
            assert shards == final[:len(shards)]                  # a prefix of the one grouping
        assert not list((dest / "_inputs" / "photos").glob("*.tmp"))
    with pytest.raises(FileExistsError):
        create(str(listings[0]), b"another grouping", {})


def test_files_on_an_object_store_prefix_record_and_score_there(s3_server, iqa_artifact, tmp_path):
    from perceptclip.core.storage import storage_options
    from perceptclip.inputs.files import create
    from perceptclip.scoring.config import ScoreConfig
    from perceptclip.scoring.plan import plan_shards
    from support.inputs import write_image_files
    from support.scoring import score_here

    bucket, fs, options = s3_server.bucket(), s3_server.filesystem(), storage_options()
    write_image_files(f"{bucket[5:]}/photos", ["a.jpg", "b/c.png", "d.jpg"], fs=fs)
    fs.pipe_file(f"{bucket[5:]}/photos/readme.md", b"x")
    cfg = ScoreConfig(input=[f"{bucket}/photos/"], output=f"{bucket}/scores", models=[iqa_artifact],
                      files_per_shard=2)
    todo = plan_shards(cfg, options).todo
    assert todo == [f"{bucket}/scores/_inputs/photos/listing-000000.parquet#photos-{i:06d}" for i in range(2)]
    fs.rm_file(f"{bucket[5:]}/photos/d.jpg")
    # the images are read from the store; the score tables go to a local folder here (the slow test: the store)
    results = score_here(todo, [iqa_artifact], str(tmp_path / "scores"), inputs=cfg.input_spec())
    assert [(r.rows, r.ok, dict(r.errors)) for r in results] == [(2, 2, {}), (1, 0, {"not_found": 1})]
    with pytest.raises(FileExistsError):                # S3's conditional put: a listing is never replaced
        create(todo[0].split("#")[0], b"another grouping", options)


def test_each_image_on_an_object_store_is_one_request(s3_server, iqa_artifact, tmp_path, monkeypatch):
    """A loose image costs one GET: not a HEAD for its size first, a second round trip for every image."""
    import s3fs

    from perceptclip.core.storage import storage_options
    from perceptclip.scoring.config import ScoreConfig
    from perceptclip.scoring.plan import plan_shards
    from support.inputs import write_image_files
    from support.scoring import score_here
    from support.store_proxy import StoreProxy

    bucket, fs = s3_server.bucket(), s3_server.filesystem()
    names = [f"{i}.jpg" for i in range(5)]
    write_image_files(f"{bucket[5:]}/photos", names, fs=fs)
    cfg = ScoreConfig(input=[f"{bucket}/photos/"], output=f"{bucket}/scores", models=[iqa_artifact])
    todo = plan_shards(cfg, storage_options()).todo
    proxy = StoreProxy(s3_server.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)     # the read tasks' client now goes through it
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        results = score_here(todo, [iqa_artifact], str(tmp_path / "scores"), inputs=cfg.input_spec())
    finally:
        proxy.stop()
    assert [(r.rows, r.ok) for r in results] == [(5, 5)]
    images = sorted((method, path.split("?")[0]) for method, path, _ in proxy.log
                    if path.startswith(f"/{bucket[5:]}/photos/"))
    assert images == [("GET", f"/{bucket[5:]}/photos/{name}") for name in names]


@pytest.mark.slow
def test_a_growing_prefix_of_image_files_end_to_end(s3_server, iqa_artifact, ray_local):
    """The nightly job over a prefix: each run scores the files added since, and nothing else."""
    import pyarrow.parquet as pq

    from perceptclip.scoring.config import load_score_config
    from perceptclip.scoring.job import run_score
    from support.inputs import write_image_files

    bucket, fs = s3_server.bucket(), s3_server.filesystem()
    night1 = [f"2026-11-01/{i:02d}.jpg" for i in range(5)] + ["2026-11-01/broken.jpg"]
    write_image_files(f"{bucket[5:]}/photos", night1, fs=fs)
    fs.pipe_file(f"{bucket[5:]}/photos/2026-11-01/broken.jpg", b"\xff\xd8\xff cut")
    cfg = load_score_config(None, input=[f"{bucket}/photos"], output=f"{bucket}/scores", models=[iqa_artifact],
                            files_per_shard=4, num_cpus=2)
    first = run_score(cfg).to_dict()
    assert first["shards"] == {"planned": 2, "done": 2, "skipped": 0, "failed": 0}
    assert first["samples"] == {"total": 6, "ok": 5, "error": 1, "errors_by_reason": {"not_an_image": 1}}
    night2 = [f"2026-11-02/{i:02d}.png" for i in range(3)]
    write_image_files(f"{bucket[5:]}/photos", night2, fs=fs)
    second = run_score(cfg).to_dict()
    assert second["shards"] == {"planned": 3, "done": 1, "skipped": 2, "failed": 0}
    assert second["samples"]["total"] == 3
    assert run_score(cfg).to_dict()["shards"] == {"planned": 3, "done": 0, "skipped": 3, "failed": 0}
    rows = {}
    for name in ("photos-000000", "photos-000001", "photos-000002"):
        with fs.open(f"{bucket[5:]}/scores/{name}.parquet", "rb") as f:
            for r in pq.read_table(f).to_pylist():
                assert r["key"] not in rows and r["url"] == f"{bucket}/photos/{r['key']}"
                rows[r["key"]] = r["status"]
    assert rows == {key: "error" if "broken" in key else "ok" for key in night1 + night2}     # image by image
